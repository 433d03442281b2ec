"""The accelerate config a GPU job launches with, generated from the spec (never hand-edited).

FSDP defaults are the page's ``fsdp.yaml`` (full shard, transformer-based wrap, sharded state dict,
CPU-RAM-efficient loading); the layer class to wrap is read from the model. FSDP2 (the built-in
recipes' default) shards with PyTorch's ``fully_shard`` (per-parameter sharding, which composes with
``torch.compile`` per decoder layer); FSDP1 (a script's default, or ``launch.fsdp_version: 1``) is the
page's flat-parameter FSDP with its prefetch settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hfhpc.spec import JobSpec

FSDP_DEFAULTS: dict[str, Any] = {
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_offload_params": False,
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    # accelerate's launcher asks for it with CPU-RAM-efficient loading (FSDP2 does not use it).
    "fsdp_sync_module_states": True,
}
# Flat-parameter FSDP only: FSDP2 prefetches by itself and always uses the original parameters.
FSDP1_DEFAULTS: dict[str, Any] = {
    "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_forward_prefetch": True,
    "fsdp_sharding_strategy": "FULL_SHARD",
    "fsdp_use_orig_params": True,
}
FSDP2_DEFAULTS: dict[str, Any] = {
    "fsdp_reshard_after_forward": True,  # full shard
}


def layer_class_to_wrap(model_dir: Path) -> str | None:
    """The decoder layer class of a staged model (``MistralDecoderLayer`` …), from its config."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = config.get("model_type")
    names = list(config.get("architectures") or [])
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        if model_type in mapping:
            names.append(mapping[model_type])
    for name in names:
        cls = getattr(transformers, name, None)
        modules = getattr(cls, "_no_split_modules", None) if cls is not None else None
        if modules:
            return ",".join(modules)
    return None


def accelerate_config(
    spec: JobSpec,
    *,
    num_machines: int,
    num_processes: int,
    machine_rank: int,
    main_process_ip: str,
    main_process_port: int,
    layer_cls: str | None = None,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": machine_rank,
        "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
        "main_training_function": "main",
        "mixed_precision": spec.launch.mixed_precision,
        "num_machines": num_machines,
        "num_processes": num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if spec.launch.strategy == "fsdp":
        version = spec.fsdp_version
        fsdp = dict(FSDP_DEFAULTS, **(FSDP2_DEFAULTS if version == 2 else FSDP1_DEFAULTS), fsdp_version=version)
        fsdp["fsdp_activation_checkpointing"] = spec.launch.activation_checkpointing
        if layer_cls:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = layer_cls
        else:
            fsdp["fsdp_auto_wrap_policy"] = "SIZE_BASED_WRAP"
            fsdp["fsdp_min_num_params"] = 100_000_000
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = fsdp
    elif num_processes > 1:
        cfg["distributed_type"] = "MULTI_GPU"
    else:
        cfg["distributed_type"] = "NO"
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    import yaml

    from hfhpc.store.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=True))
    return path
