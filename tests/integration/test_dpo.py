"""The DPO recipe end to end on the tiny chat model and the tiny preference pairs: the reward
accuracy on held-out pairs rises above chance, the rewards reach metrics.jsonl and eval.json, the
pairs are prepared once, two CPU ranks train, LoRA trains against the base, and the reference's
log-probs are computed once and kept beside the prepared pairs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hfhpc.demo.build import MODEL_ID, PREFS_DATASET_ID
from tests.conftest import hfhpc

SPEC = f"""\
name: tiny-dpo
recipe: dpo
model: {MODEL_ID}
dataset: {{id: {PREFS_DATASET_ID}, split: train_prefs, eval_split: test_prefs}}
train: {{beta: 0.1, max_length: 128, max_prompt_length: 64, max_steps: 30, learning_rate: 1.0e-3, per_device_batch_size: 8,
        logging_steps: 5, save_steps: 15}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0}}
"""


def _variant(spec, name: str, **replace: str):
    text = SPEC.replace("name: tiny-dpo", f"name: {name}")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = spec.with_name(f"{name}.yaml")
    path.write_text(text)
    path.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    return path


@pytest.fixture(scope="module")
def dpo_run(hub, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("dpo")
    spec = folder / "job.yaml"
    spec.write_text(SPEC)
    store = folder / "store"
    staged = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert staged.returncode == 0, staged.stderr
    out = hfhpc("--store", str(store), "run", str(spec), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return spec, store, folder / "runs" / "tiny-dpo", out


def test_held_out_reward_accuracy_rises_above_chance(dpo_run):
    _, _, run_dir, _ = dpo_run
    scores = json.loads((run_dir / "eval.json").read_text())
    assert scores["pairs"] == 64
    assert scores["reward_accuracy"] == scores["eval_rewards/accuracies"] > 0.75, scores
    assert scores["eval_rewards/margins"] > 0


def test_metrics_carry_loss_and_the_four_rewards(dpo_run):
    _, _, run_dir, _ = dpo_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["step"] == 30
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(key in r for r in steps), key
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert any("tokens_per_s" in r for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["reference"] == "frozen copy of the starting weights"
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_prepared_pairs_are_reused_by_the_next_job(dpo_run):
    spec, store, _, first = dpo_run
    assert re.search(r"train_prefs: 256 pairs prepared", first.stdout), first.stdout[-3000:]
    again = _variant(spec, "tiny-dpo-again", **{"max_steps: 30": "max_steps: 2"})
    out = hfhpc("--store", str(store), "run", str(again), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "train_prefs: 256 pairs from the prepared cache" in out.stdout


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _wait_for_steps(metrics, n: int, proc, log, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= n):
        assert proc.poll() is None, f"the run ended before step {n}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def test_a_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(dpo_run, tmp_path):
    import torch

    from hfhpc.run import checkpoints as ck

    spec, store, _, _ = dpo_run
    steps = {"max_steps: 30": "max_steps: 8", "logging_steps: 5": "logging_steps: 1", "save_steps: 15": "save_steps: 100",
             "per_device_batch_size: 8": "per_device_batch_size: 4"}
    whole = _variant(spec, "tiny-dpo-whole", **steps)
    stopped = _variant(spec, "tiny-dpo-stopped", **steps)
    out = hfhpc("--store", str(store), "run", str(whole), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    run_dir = spec.parent / "runs" / "tiny-dpo-stopped"
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(store), "run", str(stopped)],
                                stdout=f, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(run_dir / "metrics.jsonl", 3, proc, log)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 3, log.read_text()[-4000:]
    mark = ck.stopped_on_signal(run_dir)
    assert mark is not None and 3 <= mark.step < 8

    again = hfhpc("--store", str(store), "run", str(stopped), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {mark.path}" in again.stdout
    a, b = _weights(spec.parent / "runs" / "tiny-dpo-whole" / "model"), _weights(run_dir / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The final checkpoint exports to a plain model with the trained weights.
    exported = hfhpc("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr
    folder = run_dir / "export" / "checkpoint-8"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    c = _weights(folder)
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_two_cpu_ranks_train_against_precomputed_reference_log_probs_cached_beside_the_pairs(dpo_run):
    spec, store, _, _ = dpo_run
    ddp = _variant(spec, "tiny-dpo-ddp", **{
        "max_steps: 30": "max_steps: 4, precompute_ref_log_probs: true", "strategy: single": "strategy: ddp",
        "gpus_per_node: 0": "gpus_per_node: 0, procs_per_node: 2"})
    out = hfhpc("--store", str(store), "run", str(ddp), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((spec.parent / "runs" / "tiny-dpo-ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["reference"] == "precomputed log-probs"
    cached = sorted((store / "hfhpc" / "prepared").glob("*/cache-*.arrow"))
    assert len(cached) == 2, cached  # train and test pairs, each beside its prepared folder


def test_lora_trains_adapters_against_the_base(dpo_run):
    spec, store, _, _ = dpo_run
    lora = _variant(spec, "tiny-dpo-lora", **{"max_steps: 30": "max_steps: 3, lora: {r: 4}"})
    out = hfhpc("--store", str(store), "run", str(lora), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = spec.parent / "runs" / "tiny-dpo-lora"
    assert json.loads((run_dir / "summary.json").read_text())["reference"] == "base without adapters"
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()


def test_a_finished_run_is_the_next_specs_model_pinned_by_content_and_checked(dpo_run, hub):
    """SFT → DPO is two specs: the second names the first's run folder (here a finished DPO run's
    copy); stage pins its model/ by content, check proves it loads and notices when it changes."""
    import shutil

    from hfhpc.store.layout import sha256_file

    spec, store, run_dir, _ = dpo_run
    source = spec.parent / "runs" / "source"
    shutil.copytree(run_dir, source, ignore=shutil.ignore_patterns("checkpoint-*"))
    chained = _variant(spec, "tiny-dpo-chained", **{f"model: {MODEL_ID}\n": "model: {from_run: runs/source}\n",
                                                    "max_steps: 30": "max_steps: 2", "save_steps: 15": "save_steps: 100"})
    local = spec.parent / "node-local"
    chained.write_text(chained.read_text() + f"site: {{local_dir: '{local}'}}\n")
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    staged = hfhpc("--store", str(store), "stage", str(chained), env=env)
    assert staged.returncode == 0, staged.stderr
    assert f"imported from {source / 'model'}" in staged.stdout
    lock = {a["id"]: a for a in json.loads(chained.with_suffix(".lock").read_text())["assets"]}
    pinned = lock["run/source"]
    assert {f["path"]: f["sha256"] for f in pinned["files"]}["model.safetensors"] == sha256_file(source / "model" / "model.safetensors")

    checked = hfhpc("--store", str(store), "check", str(chained))
    assert checked.returncode == 0 and "ready:" in checked.stdout, checked.stdout + checked.stderr
    out = hfhpc("--store", str(store), "run", str(chained), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "model run/source:" in out.stdout
    # Copied to node-local disk like a staged model, and loaded from there.
    assert "node-local copy done" in out.stderr
    assert (local / "hfhpc-store" / "hub" / "models--run--source" / "snapshots" / pinned["commit"] / "model.safetensors").is_file()
    job = json.loads((spec.parent / "runs" / "tiny-dpo-chained" / "job.json").read_text())
    assert job["spec"]["model"]["from_run"] == "runs/source"
    assert [a["commit"] for a in job["assets"] if a["id"] == "run/source"] == [pinned["commit"]]

    # The run's model changes after staging: check says so and how to fix it.
    config = source / "model" / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = hfhpc("--store", str(store), "check", "--no-probe", str(chained))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert f"{source / 'model'}: changed since it was staged (config.json changed)" in changed.stdout
    assert f"hfhpc stage {chained}" in changed.stdout
    # Staged again, the lockfile pins the new contents, and the finished run of the old ones is not resumed.
    again = hfhpc("--store", str(store), "stage", str(chained), env=env)
    assert again.returncode == 0, again.stderr
    assert f"updated {pinned['commit'][:12]} → " in again.stdout
    assert hfhpc("--store", str(store), "check", "--no-probe", str(chained)).returncode == 0
    rerun = hfhpc("--store", str(store), "run", str(chained))
    assert rerun.returncode == 2 and "model run/source" in rerun.stderr, rerun.stderr

    # The run folder gone: the staged copy still serves the job; check warns.
    shutil.rmtree(source)
    gone = hfhpc("--store", str(store), "check", "--no-probe", str(chained))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert f"warning: model run/source: model.from_run {source}: no such run folder" in gone.stdout
