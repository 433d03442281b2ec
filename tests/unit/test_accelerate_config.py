"""The accelerate config a job launches with, read back through accelerate's own launcher.

What the ranks finally see is the environment `accelerate launch` derives from the config file, and
the FSDP plugin built from it: both are checked here, as accelerate itself builds them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.launch.accelerate import accelerate_config, is_transformers_model, layer_class_to_wrap, write_config
from hfhpc.spec import JobSpec


def _spec(recipe: str = "sft", **launch) -> JobSpec:
    needs = {"script": "train.py"} if recipe == "script" else {"model": "org/model", "dataset": "org/data"}
    return JobSpec.model_validate({
        "name": "x", "recipe": recipe, **needs,
        "launch": {"strategy": "fsdp", **launch}, "resources": {"gpus_per_node": 4},
    })


def _launcher_env(spec: JobSpec, tmp_path: Path, cfg: dict | None = None) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = cfg or accelerate_config(spec, num_machines=1, num_processes=4, machine_rank=0, main_process_ip="127.0.0.1",
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


def test_lora_runs_on_fsdp2_unless_asked():
    spec = JobSpec.model_validate({"name": "x", "recipe": "sft", "model": "o/m", "dataset": "o/d", "train": {"lora": {"r": 8}},
                                   "launch": {"strategy": "fsdp"}, "resources": {"gpus_per_node": 2}})
    assert spec.fsdp_version == 2
    assert spec.model_copy(update={"launch": spec.launch.model_copy(update={"fsdp_version": 1})}).fsdp_version == 1


def test_an_fsdp_version_other_than_1_or_2_is_refused():
    with pytest.raises(ValueError, match="fsdp_version"):
        _spec(fsdp_version=3)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel",
                                  "Gemma2ForCausalLM", "Phi3ForCausalLM"])
def test_the_layer_class_is_read_from_transformers_source_as_the_class_itself_says(tmp_path, arch):
    import transformers

    model_type = {"GPT2LMHeadModel": "gpt2"}.get(arch, arch.split("For")[0].lower())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    assert layer_class_to_wrap(tmp_path) == ",".join(getattr(transformers, arch)._no_split_modules)


def test_the_node_agent_names_the_layer_class_without_importing_torch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    code = ("import sys; from hfhpc.launch.accelerate import layer_class_to_wrap as f; "
            f"print(f({str(tmp_path)!r}), 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["MistralDecoderLayer", "False", "False"]


def test_a_transformers_model_whose_class_is_not_named_is_wrapped_by_its_own_layers(tmp_path, monkeypatch):
    # A model type whose classes live in another model's module (exaone: Llama classes): the config
    # names no class, and accelerate wraps what the loaded model lists in _no_split_modules.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "exaone", "architectures": ["LlamaForCausalLM"]}))
    assert layer_class_to_wrap(tmp_path) is None and is_transformers_model(tmp_path)
    cfg = accelerate_config(_spec(), num_machines=1, num_processes=4, machine_rank=0, main_process_ip="127.0.0.1",
                            main_process_port=29555, transformers_model=True)
    assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg["fsdp_config"]
    env = _launcher_env(_spec(), tmp_path, cfg=cfg)
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import transformers
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_other_models_are_wrapped_by_size(tmp_path):
    assert not is_transformers_model(tmp_path)  # no config.json: a timm or plain torch model
    cfg = accelerate_config(_spec(), num_machines=1, num_processes=4, machine_rank=0, main_process_ip="127.0.0.1",
                            main_process_port=29555)
    assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"


def test_fsdp_on_one_gpu_starts_under_the_launcher_as_the_spec_asks():
    # FSDP on one GPU is still FSDP: its checkpoints sharded as FSDP writes them, resumable on more GPUs.
    from hfhpc.launch.node import uses_launcher

    one = JobSpec.model_validate({"name": "x", "recipe": "sft", "model": "o/m", "dataset": "o/d",
                                  "launch": {"strategy": "fsdp"}, "resources": {"gpus_per_node": 1}})
    assert uses_launcher(one, 1)
    assert not uses_launcher(one.model_copy(update={"launch": one.launch.model_copy(update={"strategy": "single"})}), 1)
    assert uses_launcher(_spec("sft", fsdp_version=1), 4)
    cfg = accelerate_config(one, num_machines=1, num_processes=1, machine_rank=0, main_process_ip="127.0.0.1",
                            main_process_port=29555, layer_cls="MistralDecoderLayer")
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] == 1
