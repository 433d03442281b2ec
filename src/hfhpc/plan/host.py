"""Host memory per node (SLURM's ``--mem``) when the spec sets none: read by ``launch/sbatch.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hfhpc.plan.gpus import GIB

HOST_RUNTIME_GIB = 3.0  # per GPU rank: Python, torch and its CUDA libraries, NCCL buffers (not measured here)
HOST_CPU_RUNTIME_GIB = 1.5  # per CPU rank: Python and torch without the CUDA libraries (not measured here)
HOST_WORKER_GIB = 1.0  # per dataloader worker: a forked rank whose pages diverge as refcounts change
HOST_DATA_GIB = 2.0  # per node with a dataset: the tokenizer, datasets' Arrow tables (memory-mapped), indices
HOST_HEADROOM = 1.25  # the terms are estimates: exceeding --mem kills the job (OOM), unused memory does not
HOST_MIN_GB = 4
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "float8_e4m3fn": 1}


def host_memory_gb(spec: Any, store: Path) -> int:
    """Host memory one node of the job needs, in GB (what ``--mem`` asks for when the spec sets none).

    Why each term is there:
    - the weight files once per node: safetensors are memory-mapped, and the page cache of a mapped
      file is charged to the job's memory cgroup, shared by the node's ranks;
    - one CPU copy of the model per rank: every rank calls ``from_pretrained`` (recipes/sft.py,
      classify.py, infer.py), which builds the model on the CPU before it moves to the GPU or is
      sharded (FSDP2 shards after loading; accelerate's ``fsdp_cpu_ram_efficient_loading`` spares
      the other ranks only for FSDP1 scripts, so this counts every rank). Its dtype is fp32 for full
      fine-tuning (master weights) and on CPU, half precision for inference or LoRA on GPUs;
    - each rank's runtime (:data:`HOST_RUNTIME_GIB` on GPUs, :data:`HOST_CPU_RUNTIME_GIB` on CPU) and
      its dataloader workers (``train.dataloader_num_workers``, :data:`HOST_WORKER_GIB` each);
    - the tokenizer and datasets' tables once per node when there is a dataset (:data:`HOST_DATA_GIB`).
    """
    from hfhpc.store.layout import snapshot_dir
    from hfhpc.store.lock import base_chain, load_lock

    res = spec.resources
    procs = res.procs
    file_bytes, bytes_per_param = 0, 2  # unknown dtype: assume half precision, the Hub's usual
    if spec.model is not None:
        lock = load_lock(spec.lock_path(), missing_ok=True)
        locked = lock.get("model", spec.model.id)
        if locked is not None:
            try:  # LoRA adapters: the node holds their base, which they are merged into
                locked = (base_chain(locked, lock.assets) or [locked])[-1]
            except ValueError:
                pass
            weights = [f.size for f in locked.files if f.path.endswith(".safetensors")]
            weights = weights or [f.size for f in locked.files if f.path.endswith((".bin", ".pt", ".pth"))]
            file_bytes = sum(weights)
            try:
                config = json.loads((snapshot_dir(store, "model", locked.id, locked.commit) / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            saved = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
            bytes_per_param = _DTYPE_BYTES.get(str(saved), bytes_per_param)
    half = spec.launch.mixed_precision in ("bf16", "fp16") and res.gpus_per_node > 0
    train = getattr(spec, "train", None)  # recipes without training have none
    # Inference (no train: section) and LoRA's frozen base load in the compute dtype; full
    # fine-tuning keeps fp32 weights.
    lora = getattr(train, "lora", None) is not None
    load_bytes_per_param = 2 if half and (train is None or lora) else 4
    cpu_copy = file_bytes / bytes_per_param * load_bytes_per_param
    extra = (getattr(train, "model_extra", None) or {}) if train is not None else {}
    workers = extra.get("dataloader_num_workers") or 0
    workers = workers if isinstance(workers, int) and workers > 0 else 0
    runtime = HOST_RUNTIME_GIB if res.gpus_per_node > 0 else HOST_CPU_RUNTIME_GIB
    data = HOST_DATA_GIB if getattr(spec, "dataset", None) is not None else 0.0
    total = (
        file_bytes
        + procs * cpu_copy
        + procs * (runtime + workers * HOST_WORKER_GIB) * GIB
        + data * GIB
    )
    return max(HOST_MIN_GB, math.ceil(total * HOST_HEADROOM / GIB))  # SLURM's G is GiB
