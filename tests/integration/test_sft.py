"""The SFT recipe end to end on the tiny chat model: loss falls, the model loads, data is prepared once."""

from __future__ import annotations

import json
import os
import re

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MODEL_ID
from tests.conftest import hfhpc, offline_python

SPEC = f"""\
name: tiny-sft
recipe: sft
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft, eval_split: test_sft}}
train: {{max_length: 256, max_steps: 40, learning_rate: 3.0e-3, per_device_batch_size: 8, logging_steps: 5, save_steps: 20}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0}}
"""


@pytest.fixture(scope="module")
def sft_run(hub, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sft")
    spec = folder / "job.yaml"
    spec.write_text(SPEC)
    store = folder / "store"
    staged = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert staged.returncode == 0, staged.stderr
    out = hfhpc("--store", str(store), "run", str(spec), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return spec, store, folder / "runs" / "tiny-sft", out


def test_loss_falls_well_below_its_start_within_40_steps(sft_run):
    _, _, run_dir, _ = sft_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[-1]["step"] == 40
    assert losses[-1] < 0.6 * losses[0], losses
    assert any("tokens_per_s" in r for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["assistant_only_loss"] is True
    assert "eval_loss" in json.loads((run_dir / "eval.json").read_text())


def test_final_model_loads_with_from_pretrained_and_chats(sft_run):
    _, store, run_dir, _ = sft_run
    assert (run_dir / "model" / "model.safetensors").exists()
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'model')!r}); t = AutoTokenizer.from_pretrained({str(run_dir / 'model')!r})
ids = t.apply_chat_template([{{"role": "user", "content": "What is 2 plus 3?"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = m.generate(**ids, max_new_tokens=5, do_sample=False)
print("generated", out.shape[1] > ids["input_ids"].shape[1])
"""
    res = offline_python(store, code)
    assert res.returncode == 0, res.stderr
    assert "generated True" in res.stdout


def test_prepared_data_is_reused_by_the_next_job(sft_run):
    spec, store, run_dir, first = sft_run
    # 512 conversations, templated, tokenized and packed into rows of max_length once.
    packed = re.search(r"train_sft: (\d+) packed rows prepared", first.stdout)
    assert packed and 0 < int(packed.group(1)) < 512, first.stdout[-3000:]
    again = spec.with_name("again.yaml")
    again.write_text(SPEC.replace("name: tiny-sft", "name: tiny-sft-again").replace("max_steps: 40", "max_steps: 2"))
    again.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    out = hfhpc("--store", str(store), "run", str(again), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"train_sft: {packed.group(1)} packed rows from the prepared cache" in out.stdout


def test_two_cpu_ranks_train_with_ddp(sft_run):
    spec, store, _, _ = sft_run
    ddp = spec.with_name("ddp.yaml")
    ddp.write_text(SPEC.replace("name: tiny-sft", "name: tiny-sft-ddp").replace("max_steps: 40", "max_steps: 6")
                   .replace("strategy: single", "strategy: ddp").replace("gpus_per_node: 0", "gpus_per_node: 0, procs_per_node: 2"))
    ddp.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    out = hfhpc("--store", str(store), "run", str(ddp), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((spec.parent / "runs" / "tiny-sft-ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
