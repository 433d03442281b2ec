"""A run's checkpoint as a plain Hugging Face model folder (safetensors, config, tokenizer).

What a checkpoint holds depends on how the job trained:

* FSDP with ``SHARDED_STATE_DICT`` (the default for large models): ``pytorch_model_fsdp_0/``, a
  torch distributed checkpoint with one shard per rank. accelerate's ``merge_fsdp_weights`` (the
  library side of ``accelerate merge-weights``) gathers it into one ``model.safetensors``, on CPU.
* FSDP with ``FULL_STATE_DICT``: ``pytorch_model_fsdp.bin``, converted to safetensors.
* DDP or one process: ``model.safetensors`` (or shards and their index) already; copied.
* LoRA: ``adapter_model.safetensors``; copied as the adapter it is (load it with peft).

The config, generation config and tokenizer files come from the checkpoint, or from the job's pinned
base model in the store when the checkpoint has no config (an FSDP sharded save writes none).
Training state (optimizer, scheduler, RNG, trainer state) is left out. The folder appears complete or
not at all: written under a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hfhpc.assets import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hfhpc.errors import HfhpcError
from hfhpc.run.checkpoints import MARKER, last_complete, problem, step_of
from hfhpc.run.paths import RunDir
from hfhpc.atomic import fsync_dir

FSDP_SHARDED_DIR = "pytorch_model_fsdp_0"
FSDP_FULL_FILE = "pytorch_model_fsdp.bin"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
# Files of a checkpoint that are training state, not model.
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", MARKER, "README.md"}
TRAINING_STATE_PREFIXES = ("rng_state", "optimizer", "pytorch_model_fsdp")


class ExportError(HfhpcError):
    """Nothing exportable: no complete checkpoint, or one in a format this does not know."""


@dataclass
class ExportResult:
    output: Path
    checkpoint: Path
    source: str  # fsdp-sharded | fsdp-full | safetensors | torch-bin | adapter
    files: dict[str, int] = field(default_factory=dict)


def find_checkpoint(run_dir: Path, which: str | None = None) -> Path:
    """The checkpoint to export: ``which`` (a step, a folder name or a path), else the newest complete one."""
    run_dir = Path(run_dir)
    if which is None:
        found = last_complete(run_dir, verify=True)
        if found is None:
            raise ExportError(f"{run_dir} has no complete checkpoint", "train first, or name a folder with --checkpoint")
        return found.path
    path = Path(which)
    if which.isdigit():
        path = RunDir(run_dir).checkpoint(int(which))
    elif not path.is_absolute() and not path.exists():
        path = run_dir / which
    if not path.is_dir():
        raise ExportError(f"no checkpoint folder {path}", f"list {run_dir} for the checkpoint-N folders it has")
    why = problem(path, verify=True) if step_of(path) is not None else None
    if why:
        raise ExportError(f"{path} is not a complete checkpoint: {why}", "export an older, complete checkpoint instead")
    return path


def source_format(checkpoint: Path) -> str:
    if (checkpoint / FSDP_SHARDED_DIR).is_dir():
        return "fsdp-sharded"
    if (checkpoint / SAFE_WEIGHTS).is_file() or (checkpoint / SAFE_INDEX).is_file():
        return "safetensors"
    if (checkpoint / FSDP_FULL_FILE).is_file():
        return "fsdp-full"
    if (checkpoint / TORCH_WEIGHTS).is_file():
        return "torch-bin"
    if (checkpoint / ADAPTER_WEIGHTS).is_file():
        return "adapter"
    raise ExportError(f"{checkpoint} holds no model weights this knows (FSDP shards, safetensors, .bin or a LoRA adapter)",
                      "check that the job trained with the Trainer and saved model weights")


def _is_model_file(name: str) -> bool:
    return name not in TRAINING_STATE and not name.startswith(TRAINING_STATE_PREFIXES) and not name.startswith(".")


def _base_model_dir(run_dir: Path) -> Path | None:
    """The pinned base model's snapshot in the store, from the run's job.json."""
    from hfhpc.run.jobfile import load_job
    from hfhpc.store.layout import snapshot_dir

    try:
        job = load_job(run_dir)
    except (HfhpcError, OSError, ValueError):
        return None
    if job.spec.model is None or job.model_commit is None:
        return None
    try:  # a job started from a LoRA run's adapters: its config is their base's
        model_id, commit = (job.model_bases or [(job.spec.model.id, job.model_commit)])[-1]
    except ValueError:
        return None
    path = snapshot_dir(job.store, "model", model_id, commit)
    return path if path.is_dir() else None


def _save_safetensors(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    # Tied weights share storage; safetensors stores each tensor once, so give each its own.
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path), metadata={"format": "pt"})


def _write_weights(checkpoint: Path, fmt: str, dest: Path) -> None:
    if fmt == "fsdp-sharded":
        from accelerate.utils import merge_fsdp_weights

        merge_fsdp_weights(str(checkpoint / FSDP_SHARDED_DIR), str(dest), safe_serialization=True)
        return
    if fmt in ("fsdp-full", "torch-bin"):
        import torch

        state = torch.load(checkpoint / (FSDP_FULL_FILE if fmt == "fsdp-full" else TORCH_WEIGHTS), map_location="cpu", weights_only=True)
        _save_safetensors(state, dest / SAFE_WEIGHTS)
        return
    names = [SAFE_INDEX] if fmt == "safetensors" and (checkpoint / SAFE_INDEX).is_file() else []
    if names:
        names += sorted(set(json.loads((checkpoint / SAFE_INDEX).read_text())["weight_map"].values()))
    elif fmt == "safetensors":
        names = [SAFE_WEIGHTS]
    else:
        names = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    for name in names:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, dest / name)


def export_checkpoint(run_dir: Path, *, checkpoint: str | None = None, output: Path | None = None, overwrite: bool = False) -> ExportResult:
    """Write the chosen checkpoint of ``run_dir`` as a Hugging Face model folder.

    Default output: ``RUN_DIR/export/checkpoint-N``. An existing output is an error unless ``overwrite``.
    """
    run_dir = Path(run_dir).absolute()
    ckpt = find_checkpoint(run_dir, checkpoint)
    fmt = source_format(ckpt)
    out = Path(output).absolute() if output else RunDir(run_dir).export / ckpt.name
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists", "pass --overwrite, or choose another folder with -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_weights(ckpt, fmt, tmp)
        for entry in sorted(ckpt.iterdir()):
            if entry.is_file() and _is_model_file(entry.name) and not (tmp / entry.name).exists() \
                    and not entry.name.startswith(("model-", "model.safetensors", "adapter_model", "pytorch_model")):
                shutil.copy2(entry, tmp / entry.name)
        if fmt != "adapter" and not (tmp / "config.json").exists():
            base = _base_model_dir(run_dir)
            if base is None:
                raise ExportError(f"{ckpt} has no config.json and the run's base model is not in the store",
                                  "stage the job's model again, or copy its config.json into the checkpoint")
            for name in ("config.json", "generation_config.json"):
                if (base / name).is_file():
                    shutil.copyfile(base / name, tmp / name)
        for entry in tmp.iterdir():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return ExportResult(output=out, checkpoint=ckpt, source=fmt, files=files)
