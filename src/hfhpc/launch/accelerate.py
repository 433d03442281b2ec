"""The accelerate config a GPU job launches with, generated from the spec (never hand-edited).

FSDP defaults are the page's ``fsdp.yaml`` (full shard, transformer-based wrap, sharded state dict,
CPU-RAM-efficient loading); the layer class to wrap is read from the model. FSDP2 (the built-in
recipes' default) shards with PyTorch's ``fully_shard`` (per-parameter sharding, which composes with
``torch.compile`` per decoder layer); FSDP1 (a script's default, or ``launch.fsdp_version: 1``) is the
page's flat-parameter FSDP with its prefetch settings.
"""

from __future__ import annotations

import ast
import importlib.util
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
    """The decoder layer class of a staged model (``MistralDecoderLayer`` …), from its config.

    Read from transformers' source (the ``_no_split_modules`` of the architecture's class and its
    bases in the same module), not by importing it: the node agent would otherwise spend seconds
    importing torch and transformers before it starts the ranks, which import them anyway. None
    where the source does not say (a model type whose classes live in another model's module):
    accelerate then wraps the classes the loaded model names in its ``_no_split_modules``.
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    source = _modeling_source(config.get("model_type"))
    if source is None:
        return None
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in config.get("architectures") or []:
        modules = _no_split_modules(classes, name)
        if modules:
            return ",".join(modules)
    return None


def is_transformers_model(model_dir: Path) -> bool:
    """A model transformers loads (its config names a model type): FSDP can wrap its layers."""
    try:
        return bool(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type"))
    except (FileNotFoundError, ValueError, AttributeError):
        return False


def _modeling_source(model_type: str | None) -> Path | None:
    """transformers' ``modeling_<type>.py`` for a model type, found without importing transformers."""
    if not model_type:
        return None
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    module = model_type.replace("-", "_")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / module / f"modeling_{module}.py"
    return path if path.is_file() else None


def _no_split_modules(classes: dict[str, ast.ClassDef], name: str, depth: int = 0) -> list[str] | None:
    node = classes.get(name)
    if node is None or depth > 8:
        return None
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_no_split_modules" for t in targets):
            try:
                value = ast.literal_eval(stmt.value)
            except ValueError:
                return None
            return [str(v) for v in value] if isinstance(value, (list, tuple)) and value else None
    for base in node.bases:
        if isinstance(base, ast.Name) and (found := _no_split_modules(classes, base.id, depth + 1)):
            return found
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
    transformers_model: bool = False,
) -> dict[str, Any]:
    """The config for one node. Under FSDP, each decoder layer is its own unit: ``layer_cls`` names
    the class, or for a transformers model whose class is not named, accelerate takes the model's
    ``_no_split_modules``; other models are wrapped by size."""
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
        elif not transformers_model:
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

    from hfhpc.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=True))
    return path
