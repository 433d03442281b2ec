"""The accelerate config a job launches with, read back through accelerate's own launcher.

What the ranks finally see is the environment `accelerate launch` derives from the config file, and
the FSDP plugin built from it: both are checked here, as accelerate itself builds them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfhpc.launch.accelerate import accelerate_config, write_config
from hfhpc.spec import JobSpec


def _spec(recipe: str = "sft", **launch) -> JobSpec:
    needs = {"script": "train.py"} if recipe == "script" else {"model": "org/model", "dataset": "org/data"}
    return JobSpec.model_validate({
        "name": "x", "recipe": recipe, **needs,
        "launch": {"strategy": "fsdp", **launch}, "resources": {"gpus_per_node": 4},
    })


def _launcher_env(spec: JobSpec, tmp_path: Path) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = accelerate_config(spec, num_machines=1, num_processes=4, machine_rank=0, main_process_ip="127.0.0.1",
                            main_process_port=29555, layer_cls="MistralDecoderLayer")
    path = write_config(cfg, tmp_path / "accelerate.yaml")
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    return prepare_multi_gpu_env(_validate_launch_command(args)[0])


def test_fsdp2_is_the_default_and_accelerate_builds_its_plugin(tmp_path, monkeypatch):
    env = _launcher_env(_spec(), tmp_path)
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # full shard
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MistralDecoderLayer"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # raises on settings FSDP2 does not take (forward prefetch …)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading and plugin.activation_checkpointing
    assert plugin.transformer_cls_names_to_wrap == ["MistralDecoderLayer"]


def test_fsdp1_keeps_the_pages_flat_parameter_settings(tmp_path):
    env = _launcher_env(_spec(fsdp_version=1, activation_checkpointing=False), tmp_path)
    assert env["FSDP_VERSION"] == "1"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_BACKWARD_PREFETCH"] == "BACKWARD_PRE"
    assert env["FSDP_FORWARD_PREFETCH"] == "true"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"


def test_a_users_script_keeps_accelerates_fsdp1_unless_asked(tmp_path):
    assert _launcher_env(_spec("script"), tmp_path)["FSDP_VERSION"] == "1"
    assert _launcher_env(_spec("script", fsdp_version=2), tmp_path)["FSDP_VERSION"] == "2"


def test_lora_stays_on_fsdp1():
    spec = JobSpec.model_validate({"name": "x", "recipe": "sft", "model": "o/m", "dataset": "o/d", "train": {"lora": {"r": 8}},
                                   "launch": {"strategy": "fsdp"}, "resources": {"gpus_per_node": 2}})
    assert spec.fsdp_version == 1


def test_an_fsdp_version_other_than_1_or_2_is_refused():
    with pytest.raises(ValueError, match="fsdp_version"):
        _spec(fsdp_version=3)
