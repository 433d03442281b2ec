"""How jobs load their assets, in one place: the recipes call these, and ``check`` probes with the
very same calls, so a passing check means the job's own loads will work.

Runs inside sealed, offline child processes (HF_HOME = the store, the offline variables set before
the libraries were imported). Every load pins the commit from the lockfile.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# What a run trained with train.lora saves in its model/ (peft's save_pretrained): the adapters only.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The LoraConfig fields that say which layers carry adapters and how they scale: all a merge needs.
# Nothing else of an adapter_config.json reaches peft; base_model_name_or_path (often a node-local
# store path of the run that trained it) and revision are never followed.
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
               "use_rslora", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
               "alpha_pattern", "use_dora", "init_lora_weights")
LORA_BOOKKEEPING = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode")
MAX_ADAPTER_CONFIG_BYTES = 1 << 20

# A model given as (id, commit); a model of adapters comes with the models under them, nearest first.
Pinned = tuple[str, "str | None"]


def load_config(model_id: str, commit: str | None, bases: Sequence[Pinned] = ()):
    """The model's config; a model of adapters has its base's."""
    from transformers import AutoConfig

    model_id, commit = bases[-1] if bases else (model_id, commit)
    return AutoConfig.from_pretrained(model_id, revision=commit)


def load_tokenizer(model_id: str, commit: str | None, bases: Sequence[Pinned] = ()):
    """The model's tokenizer; for a model of adapters, the one their run saved beside them, else the base's."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoTokenizer

    chain = [(model_id, commit), *bases]
    source = next((m for m in chain[:-1] if isinstance(try_to_load_from_cache(m[0], "tokenizer_config.json", revision=m[1]), str)),
                  chain[-1])
    # A folder of adapters has no config.json, which AutoTokenizer reads first: it gets the base's.
    config = load_config(*chain[-1]) if source != chain[-1] else None
    return AutoTokenizer.from_pretrained(source[0], revision=source[1], config=config)


def load_model(auto_class: Any, model_id: str, commit: str | None, bases: Sequence[Pinned] = (), **kwargs: Any):
    """``auto_class.from_pretrained`` of the model at its locked commit. A model of LoRA adapters
    (``bases``: ``JobFile.model_bases``) is its base, loaded the same way, with the adapters applied by
    peft and merged: the job starts from the merged weights, and its own ``train.lora`` adds new ones."""
    if not bases:
        return auto_class.from_pretrained(model_id, revision=commit, **kwargs)
    model = load_model(auto_class, *bases[0], bases[1:], **kwargs)
    return merge_adapters(model, model_id, commit)


def merge_adapters(model: Any, model_id: str, commit: str | None) -> Any:
    """``model`` with the adapters of ``model_id`` (a staged folder of adapter_config.json and
    adapter_model.safetensors) merged into its weights."""
    from peft import LoraConfig, PeftModel

    from hfhpc.errors import HfhpcError

    settings, others = adapter_settings(model_file(model_id, commit, ADAPTER_CONFIG))
    unmerged = unmerged_fields(others)
    if unmerged:
        raise HfhpcError(f"the adapters of {model_id} set {', '.join(unmerged)} in {ADAPTER_CONFIG}: "
                         "hfhpc merges plain LoRA adapters only",
                         "merge them into the base yourself (peft merge_and_unload) and start from that model")
    weights = model_file(model_id, commit, ADAPTER_WEIGHTS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # The snapshot folder, not the id: peft would take a folder of that name in the working directory first.
    adapted = PeftModel.from_pretrained(model, str(weights.parent), config=LoraConfig(**settings), low_cpu_mem_usage=True)
    merged = adapted.merge_and_unload()
    # peft froze every weight but the adapters it loaded: the merged model trains as loaded models do.
    for name, p in merged.named_parameters():
        p.requires_grad_(name in trainable)
    return merged


def unmerged_fields(others: dict[str, Any]) -> list[str]:
    """The fields of an ``adapter_config.json`` beyond :data:`LORA_FIELDS` that are set to something
    other than a fresh ``LoraConfig``'s value (DoRA aside, peft's variants: QA-LoRA, layer
    replication, Megatron …): adapters that need them are not plain LoRA, and merging without them
    would be wrong."""
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    return sorted(k for k, v in others.items() if v not in (None, False) and (defaults[k] if k in defaults else None) != v)


def adapter_settings(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA settings of an ``adapter_config.json`` (:data:`LORA_FIELDS`) and its other fields,
    checked: the file comes from a run folder, so it is untrusted. ``ValueError`` saying what is wrong.
    Standard library only: ``stage`` and ``check`` call it on the login node."""
    with open(path, "rb") as f:
        raw = f.read(MAX_ADAPTER_CONFIG_BYTES + 1)
    if len(raw) > MAX_ADAPTER_CONFIG_BYTES:
        raise ValueError(f"is larger than {MAX_ADAPTER_CONFIG_BYTES >> 20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    if data.get("peft_type") != "LORA":
        raise ValueError(f"peft_type is {str(data.get('peft_type'))[:40]!r}, not 'LORA': only LoRA adapters are merged")
    targets = data.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise ValueError("target_modules is not a module name or a list of module names")
    for key in ("modules_to_save", "exclude_modules"):
        value = data.get(key)
        if not (value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
            raise ValueError(f"{key} is not a list of module names")
    r = data.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise ValueError("r is not a positive integer")
    alpha = data.get("lora_alpha", 8)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)):
        raise ValueError("lora_alpha is not a number")
    # The initialisations that rewrite the base's weights (pissa, olora, loftq, corda …) need that
    # rewritten base, which the run did not save: merged onto the original one they would be wrong.
    if data.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights {str(data['init_lora_weights'])[:40]!r} changes the base weights: "
                         "only adapters on an unchanged base are merged")
    settings = {k: data[k] for k in LORA_FIELDS if k in data}
    others = {k: v for k, v in data.items() if k not in LORA_FIELDS and k not in LORA_BOOKKEEPING}
    return settings, others


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
