"""``recipe: harness``: lm-evaluation-harness tasks staged from a loopback Hub, checked and run sealed,
with the same numbers as the harness run online on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hfhpc.demo.build import MODEL_ID, build_tiny_chat_model
from hfhpc.store.importer import import_folder
from hfhpc.store.server import StoreServer
from tests.conftest import hfhpc
from tests.harness_data import BENCHMARKS, CUSTOM_TASK_YAML

pytestmark = pytest.mark.slow
TASKS = ["hellaswag", "arc_easy", "mmlu_abstract_algebra"]


@pytest.fixture(scope="module")
def bench_hub(tmp_path_factory: pytest.TempPathFactory):
    """A Hub-compatible server of the tiny chat model and the benchmarks' tiny copies."""
    root = tmp_path_factory.mktemp("bench-upstream")
    store = root / "store"
    import_folder(store, "model", MODEL_ID, build_tiny_chat_model(root / "model"))
    for repo_type, repo_id, build in BENCHMARKS:
        import_folder(store, repo_type, repo_id, build(root / repo_id))
    with StoreServer(store) as server:
        yield server


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hfhpc state folder for the module: the tasks are resolved once (the registry's index
    costs ~16 s of CPU), as on a user's login node."""
    return tmp_path_factory.mktemp("state")


def _spec(folder: Path, tasks: list[str], name: str = "bench") -> Path:
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / "yesno_tiny.yaml").write_text(CUSTOM_TASK_YAML)
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "recipe": "harness", "model": MODEL_ID,
        "harness": {"tasks": tasks, "batch_size": 4},
        "resources": {"gpus_per_node": 0, "time": "0-00:30:00"}, "output_dir": f"runs/{name}",
    }, sort_keys=False))
    return spec


def _env(hub, state: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HFHPC_STATE_DIR": str(state), **extra}


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


ONLINE = r"""
import json, sys, lm_eval
from lm_eval.tasks import TaskManager
args = json.loads(sys.argv[1])
out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": args["model"], "dtype": "float32"},
                              tasks=args["tasks"], batch_size=4, device="cpu", log_samples=False,
                              task_manager=TaskManager())
print(json.dumps(out["results"]))
"""


def test_benchmarks_stage_check_and_run_sealed_with_the_numbers_of_an_online_run(bench_hub, state, tmp_path: Path):
    store = tmp_path / "store"
    custom = "tasks/yesno_tiny.yaml"
    spec = _spec(tmp_path, TASKS + [custom])
    env = _env(bench_hub, state)

    staged = hfhpc("--store", str(store), "stage", str(spec), env=env, timeout=900)
    _ok(staged)
    lock = json.loads(spec.with_suffix(".lock").read_text())
    locked = {a["id"] for a in lock["assets"]}
    assert {"Rowan/hellaswag", "allenai/ai2_arc", "cais/mmlu", "hfhpc-demo/yesno-tiny", MODEL_ID} <= locked

    checked = hfhpc("--store", str(store), "check", str(spec), env=env, timeout=900)
    _ok(checked)
    assert checked.stdout.startswith("ready"), checked.stdout

    ran = hfhpc("--store", str(store), "run", str(spec), env=env, timeout=900)
    _ok(ran)
    run_dir = tmp_path / "runs" / "bench"
    table = json.loads((run_dir / "eval.json").read_text())
    assert set(table) == set(TASKS) | {"yesno_tiny"}
    assert 0.0 <= table["hellaswag"]["acc_norm"]["value"] <= 1.0 and table["hellaswag"]["acc"]["stderr"] is not None
    assert (run_dir / "harness" / "results.json").is_file()
    assert (run_dir / "harness" / "samples_hellaswag.jsonl").read_text().count("\n") == 10

    # The harness itself, online against the same Hub, in a fresh cache, without hfhpc.
    fresh = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFHPC_"))}
    fresh.update(HF_ENDPOINT=bench_hub.url, HF_HOME=str(tmp_path / "online-cache"), HF_HUB_DISABLE_XET="1")
    online = subprocess.run([sys.executable, "-c", ONLINE, json.dumps({"model": MODEL_ID, "tasks": TASKS})],
                            env=fresh, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    _ok(online)
    reference = json.loads(online.stdout.strip().splitlines()[-1])
    for task in TASKS:
        expected = {k.split(",")[0]: v for k, v in reference[task].items()
                    if k.endswith(",none") and "_stderr" not in k and isinstance(v, float)}
        assert expected and {m: v["value"] for m, v in table[task].items()} == pytest.approx(expected, abs=1e-9), task


def test_a_task_whose_dataset_was_not_staged_fails_check_with_the_stage_command(bench_hub, state, tmp_path: Path):
    store = tmp_path / "store"
    env = _env(bench_hub, state)
    spec = _spec(tmp_path, ["hellaswag"])
    _ok(hfhpc("--store", str(store), "stage", str(spec), env=env, timeout=900))
    # A task added after staging, and one that would run a dataset script.
    (tmp_path / "tasks" / "scripted.yaml").write_text(
        CUSTOM_TASK_YAML.replace("task: yesno_tiny", "task: scripted")
        .replace("output_type:", "dataset_kwargs: {trust_remote_code: true}\noutput_type:"))
    spec = _spec(tmp_path, ["hellaswag", "arc_easy", "tasks/scripted.yaml"])
    out = hfhpc("--store", str(store), "check", str(spec), env=env, timeout=900)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "allenai/ai2_arc" in out.stdout and f"hfhpc stage {spec}" in out.stdout
    assert "scripted" in out.stdout and "trust_remote_code" in out.stdout
