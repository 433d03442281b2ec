"""How jobs load their assets, in one place: the recipes call these, and ``check`` probes with the
very same calls, so a passing check means the job's own loads will work.

Runs inside sealed, offline child processes (HF_HOME = the store, the offline variables set before
the libraries were imported). Every load pins the commit from the lockfile.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def load_config(model_id: str, commit: str | None):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id, revision=commit)


def load_tokenizer(model_id: str, commit: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_id, revision=commit)


def load_split(dataset_id: str, commit: str | None, split: str, config: str | None = None):
    import datasets

    # Never probe the dataset viewer's parquet export: it is a network service.
    datasets.config.USE_PARQUET_EXPORT = False
    return datasets.load_dataset(dataset_id, config, split=split, revision=commit)


def split_names(dataset_id: str, commit: str | None, config: str | None = None) -> list[str] | None:
    """The splits the staged dataset offers, or None when that cannot be told offline."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(dataset_id, config, revision=commit)
    except Exception:  # noqa: BLE001 - unknown is an answer here
        return None
    splits = builder.info.splits
    return list(splits) if splits else None


def load_metric(metric_id: str):
    import evaluate

    return evaluate.load(metric_id)


def model_file(model_id: str, commit: str | None, filename: str) -> Path:
    """One file of the model, found the way ``from_pretrained`` finds it (transformers' ``cached_file``
    calls ``hf_hub_download`` per file). Never ``snapshot_download``: offline it wants every file of
    the Hub's listing, and staging leaves other frameworks' weights (onnx/, tf_model.h5, …) out."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_id, filename, revision=commit))


def safetensors_header(path: Path) -> dict[str, Any]:
    """Read and check a .safetensors header without reading the weights.

    Checks that the header parses and that every tensor's byte range lies inside the file, which
    catches a truncated download as well as a corrupt header.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        header = json.loads(f.read(n))
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data_bytes:
            raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
    return header


def unknown_training_keys(trainer_config: str, keys: list[str]) -> list[str]:
    """The ``train:`` keys that the trainer config (``"module:Class"``) does not have."""
    from hfhpc.registry import dataclass_fields

    names = set(dataclass_fields(trainer_config))
    return sorted(k for k in keys if k not in names)
