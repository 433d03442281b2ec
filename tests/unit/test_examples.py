"""Every shipped example parses (torchtune's test_configs idea); recipes run end to end elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfhpc.spec import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_spec_is_valid(path: Path):
    spec = load_spec(path)
    assert spec.name and spec.recipe
    if spec.recipe == "script":
        assert spec.resolve_path(spec.script).is_file()


def test_zephyr_example_is_the_page_job():
    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "zephyr-sft.yaml")
    assert spec.model.id == "HuggingFaceH4/zephyr-7b-beta"
    assert spec.dataset.id == "HuggingFaceH4/ultrachat_200k" and spec.dataset.split == "train_sft"
    assert spec.launch.strategy == "fsdp" and spec.resources.gpus_per_node == 4 and spec.resources.nodes == 1
    assert spec.train.max_length == 2048


ROOT = Path(__file__).resolve().parents[2]
ZEPHYR_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 32000, "tie_word_embeddings": False}


def test_zephyr_dpo_example_is_the_alignment_handbook_step_planned_and_rendered(tmp_path: Path):
    import json

    from hfhpc.run.jobfile import JobFile
    from hfhpc.launch.sbatch import render_sbatch
    from hfhpc.plan import make_plan

    spec = load_spec(ROOT / "examples" / "zephyr-dpo.yaml")
    assert spec.recipe == "dpo" and spec.model.id == "alignment-handbook/zephyr-7b-sft-full"
    assert spec.dataset.id == "HuggingFaceH4/ultrafeedback_binarized"
    assert (spec.dataset.split, spec.dataset.eval_split) == ("train_prefs", "test_prefs")
    t = spec.train
    assert (t.beta, t.epochs, t.learning_rate, t.max_length, t.max_prompt_length) == (0.01, 1, 5.0e-7, 1024, 512)
    assert spec.launch.strategy == "fsdp" and spec.resources.gpus_per_node == 4
    assert t.per_device_batch_size * t.gradient_accumulation_steps * spec.resources.world_size == 128

    config = tmp_path / "config.json"
    config.write_text(json.dumps(ZEPHYR_7B))
    plan = make_plan(spec, tmp_path / "store", model_config=config, gpu="h100")
    terms = {term.name for phase in plan.memory.phases for term in phase.terms}
    assert {"reference model weights", "reference forward (no grad)"} <= terms
    assert plan.fits and plan.inputs.micro_batch == 16 and plan.inputs.seq_len == 1024  # 8 pairs = 16 sequences
    assert any("reference forward" in n for n in plan.notes)

    job = JobFile(spec=spec, spec_path=str(spec.source), assets=[], store=tmp_path / "store", run_dir=tmp_path / "run",
                  python="/opt/venv/bin/python", created="2026-12-03T12:00:00+00:00")
    script = render_sbatch(job)
    assert "#SBATCH --gpus-per-node=4" in script or "#SBATCH --gres=gpu:4" in script
    assert "hfhpc.launch.node" in script


def test_each_dpo_examples_run_model_is_the_output_of_its_sft_example(tmp_path: Path):
    """examples/demo/dpo.yaml starts from demo/sft.yaml's run; zephyr-dpo.yaml's commented line from zephyr-sft.yaml's."""
    demo = load_spec(ROOT / "examples" / "demo" / "dpo.yaml")
    assert demo.model.id == "run/demo-sft"
    assert demo.resolve_path(demo.model.from_run).resolve() == load_spec(ROOT / "examples" / "demo" / "sft.yaml").run_dir()

    text = (ROOT / "examples" / "zephyr-dpo.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("model: ")]
    chained = tmp_path / "examples" / "zephyr-dpo.yaml"
    chained.parent.mkdir()
    chained.write_text("\n".join(line.removeprefix("# ") if line.startswith("# model: {from_run:") else line for line in lines))
    spec = load_spec(chained)
    assert spec.model.id == "run/zephyr-sft"
    sft = load_spec(ROOT / "examples" / "zephyr-sft.yaml")
    assert spec.resolve_path(spec.model.from_run).relative_to(tmp_path) == sft.run_dir().relative_to(ROOT)
