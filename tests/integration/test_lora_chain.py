"""SFT with LoRA → DPO is two specs: the second names the first's run folder, whose model/ holds only
adapters. Stage pins the adapters by content and the base they were trained on as that run's own
job.json pinned it; check verifies both; the job starts from the base with the adapters merged in."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MODEL_ID, PREFS_DATASET_ID
from hfhpc.store.layout import snapshot_dir
from tests.conftest import hfhpc

SFT = f"""\
name: sft-lora
recipe: sft
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft}}
train: {{max_length: 128, max_steps: 4, learning_rate: 1.0e-2, per_device_batch_size: 8, logging_steps: 2,
        save_steps: 100, lora: {{r: 4, lora_alpha: 8}}}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0}}
"""

# A learning rate far below float32's resolution of the weights: the final weights are the starting ones.
DPO = f"""\
name: dpo-from-lora
recipe: dpo
model: {{from_run: runs/sft-lora}}
dataset: {{id: {PREFS_DATASET_ID}, split: train_prefs}}
train: {{beta: 0.1, max_length: 128, max_prompt_length: 64, max_steps: 1, learning_rate: 1.0e-20, per_device_batch_size: 4,
        save_steps: 1}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0}}
"""

WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def chained(hub, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("lora-chain")
    store = folder / "store"
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    sft = folder / "sft.yaml"
    sft.write_text(SFT)
    assert (out := hfhpc("--store", str(store), "stage", str(sft), env=env)).returncode == 0, out.stderr
    out = hfhpc("--store", str(store), "run", str(sft), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (folder / "runs" / "sft-lora" / "model" / "adapter_model.safetensors").is_file()
    dpo = folder / "dpo.yaml"
    dpo.write_text(DPO)
    staged = hfhpc("--store", str(store), "stage", str(dpo), env=env)
    assert staged.returncode == 0, staged.stderr
    return folder, store, sft, dpo, staged


def _lock(spec) -> dict:
    return {a["id"]: a for a in json.loads(spec.with_suffix(".lock").read_text())["assets"]}


def test_stage_pins_the_adapters_and_the_base_their_run_trained_on(chained):
    folder, _, sft, dpo, staged = chained
    run = folder / "runs" / "sft-lora"
    # The run folder names a base that is not where it was trained: what peft wrote is never followed.
    config = json.loads((run / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lock = _lock(dpo)
    base = _lock(sft)[MODEL_ID]
    assert lock["run/sft-lora"]["base"] == MODEL_ID
    assert {f["path"] for f in lock["run/sft-lora"]["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (lock[MODEL_ID]["commit"], lock[MODEL_ID]["files"]) == (base["commit"], base["files"])
    assert f"imported from {run / 'model'}" in staged.stdout
    assert "the base of the adapters of run/sft-lora, at the commit their run trained on" in staged.stdout


def test_check_verifies_the_adapters_and_their_base(chained):
    _, store, _, dpo, _ = chained
    checked = hfhpc("--store", str(store), "check", str(dpo))
    assert checked.returncode == 0 and "ready:" in checked.stdout, checked.stdout + checked.stderr


def test_plan_reads_the_shape_of_the_base(chained):
    _, store, _, dpo, _ = chained
    commit = _lock(dpo)[MODEL_ID]["commit"]
    planned = hfhpc("--store", str(store), "plan", str(dpo))
    assert planned.returncode == 0, planned.stderr
    assert f"{snapshot_dir(store, 'model', MODEL_ID, commit) / 'config.json'}" in planned.stdout


def test_the_job_starts_from_the_base_with_the_adapters_merged(chained):
    import torch
    from safetensors.torch import load_file

    folder, store, _, dpo, _ = chained
    out = hfhpc("--store", str(store), "run", str(dpo), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = folder / "runs" / "dpo-from-lora"
    job = json.loads((run / "job.json").read_text())
    assert {a["id"] for a in job["assets"]} >= {"run/sft-lora", MODEL_ID}

    # W + (alpha / r) · B·A, from the files themselves: the learning rate was 1e-20, so the DPO run's
    # final weights are the weights it started from (to float32 resolution).
    lock = _lock(dpo)
    base = load_file(snapshot_dir(store, "model", MODEL_ID, lock[MODEL_ID]["commit"]) / "model.safetensors")[WEIGHT]
    adapters = load_file(folder / "runs" / "sft-lora" / "model" / "adapter_model.safetensors")
    prefix = f"base_model.model.{WEIGHT.removesuffix('.weight')}"
    a, b = adapters[f"{prefix}.lora_A.weight"], adapters[f"{prefix}.lora_B.weight"]
    expected = base + (8 / 4) * (b @ a)
    started = load_file(run / "model" / "model.safetensors")[WEIGHT]
    assert not torch.allclose(expected, base)  # the adapters learned something
    assert torch.allclose(started.float(), expected.float(), atol=1e-6)

    # The report reads the base's config (for MFU); its checkpoint exports with it.
    from hfhpc.report import load_run, model_config_path

    path, where = model_config_path(load_run(run))
    assert path == snapshot_dir(store, "model", MODEL_ID, lock[MODEL_ID]["commit"]) / "config.json", where
    out = hfhpc("export", str(run))
    assert out.returncode == 0, out.stderr
    exported = next((run / "export").iterdir())
    assert {"model.safetensors", "config.json"} <= {p.name for p in exported.iterdir()}


def test_the_jobs_own_lora_adds_fresh_adapters_on_the_merged_model(chained):
    folder, store, _, dpo, _ = chained
    spec = dpo.with_name("dpo-lora.yaml")
    spec.write_text(DPO.replace("name: dpo-from-lora", "name: dpo-lora-from-lora")
                    .replace("learning_rate: 1.0e-20", "learning_rate: 1.0e-3, lora: {r: 4}"))
    shutil.copy(dpo.with_suffix(".lock"), spec.with_suffix(".lock"))
    out = hfhpc("--store", str(store), "run", str(spec), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = folder / "runs" / "dpo-lora-from-lora"
    assert json.loads((run / "summary.json").read_text())["reference"] == "base without adapters"
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_check_reports_adapters_changed_and_a_base_gone_from_the_store(chained, hub):
    folder, store, _, dpo, _ = chained
    config = folder / "runs" / "sft-lora" / "model" / "adapter_config.json"
    original = config.read_text()
    config.write_text(original + "\n")
    try:
        changed = hfhpc("--store", str(store), "check", "--no-probe", str(dpo))
        assert changed.returncode == 1, changed.stdout + changed.stderr
        assert "changed since it was staged (adapter_config.json changed)" in changed.stdout
        assert f"hfhpc stage {dpo}" in changed.stdout
    finally:
        config.write_text(original)

    # The base gone from the store: check names its files, and staging fetches them again at the pinned commit.
    pinned = _lock(dpo)[MODEL_ID]
    shutil.rmtree(snapshot_dir(store, "model", MODEL_ID, pinned["commit"]).parent.parent)
    gone = hfhpc("--store", str(store), "check", "--no-probe", str(dpo))
    assert gone.returncode == 1 and f"model {MODEL_ID}: model.safetensors: missing" in gone.stdout, gone.stdout
    assert f"hfhpc stage {dpo}" in gone.stdout
    again = hfhpc("--store", str(store), "stage", str(dpo), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert again.returncode == 0, again.stderr
    assert f"model   {MODEL_ID}@main → {pinned['commit'][:12]} ({len(pinned['files'])} files" in again.stdout
    assert _lock(dpo)[MODEL_ID] == pinned
    assert hfhpc("--store", str(store), "check", str(dpo)).returncode == 0


def test_infer_generates_with_the_merged_model(chained, hub):
    folder, store, _, _, _ = chained
    spec = folder / "infer.yaml"
    spec.write_text(f"""\
name: infer-from-lora
recipe: infer
model: {{from_run: runs/sft-lora}}
dataset: {{id: {CHAT_DATASET_ID}, split: test_gen, max_samples: 4}}
infer: {{task: text-generation, max_new_tokens: 4, do_sample: false}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0, cpus_per_gpu: 1}}
""")
    assert (out := hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))).returncode == 0, out.stderr
    out = hfhpc("--store", str(store), "run", str(spec), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = (folder / "runs" / "infer-from-lora" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all(json.loads(r)["prediction"] for r in rows)


@pytest.mark.slow
def test_the_harness_evaluates_the_merged_model(chained, tmp_path_factory):
    """lm-evaluation-harness gets the base with the adapters merged (a model object, not an id)."""
    from hfhpc.store.importer import import_folder
    from hfhpc.store.server import StoreServer
    from tests.harness_data import CUSTOM_ID, CUSTOM_TASK_YAML, build_custom

    folder, store, _, _, _ = chained
    upstream = tmp_path_factory.mktemp("task-hub")
    import_folder(upstream / "store", "dataset", CUSTOM_ID, build_custom(upstream / "data"))
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / "yesno_tiny.yaml").write_text(CUSTOM_TASK_YAML)
    spec = folder / "harness.yaml"
    spec.write_text("""\
name: harness-from-lora
recipe: harness
model: {from_run: runs/sft-lora}
harness: {tasks: [tasks/yesno_tiny.yaml], batch_size: 4}
resources: {gpus_per_node: 0, time: "0-00:30:00"}
""")
    env = dict(os.environ, HFHPC_STATE_DIR=str(folder / "state"))
    with StoreServer(upstream / "store") as tasks_hub:
        out = hfhpc("--store", str(store), "stage", str(spec), env=dict(env, HF_ENDPOINT=tasks_hub.url), timeout=900)
    assert out.returncode == 0, out.stderr
    out = hfhpc("--store", str(store), "run", str(spec), env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = json.loads((folder / "runs" / "harness-from-lora" / "eval.json").read_text())
    assert 0.0 <= table["yesno_tiny"]["acc"]["value"] <= 1.0
