"""The CIFAR-10 example (examples/cifar10): its spec validates, and its script trains on synthetic
CIFAR-format data with plain python and with two gloo ranks under torchrun, and fails in one line
when the data is missing."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.spec import load_spec
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "cifar10"
SCRIPT = EXAMPLE / "cifar10_train.py"
WIDTH = 16  # half the default: the same network shape, quick on two cores
# 2 epochs of the 512 synthetic images; logging every 8 steps gives several lines per run.
TRAIN_ARGS = ["--epochs", "2", "--width", str(WIDTH), "--log-every", "8", "--seed", "0"]
# The synthetic classes are learned to ~100 % in two epochs; chance is 0.1.
MIN_ACCURACY = 0.6
METRIC_KEYS = {"step", "epoch", "loss", "elapsed_s", "samples_per_s"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 training batches × 256 images and a 256-image test batch, in the archive's format."""
    dest = tmp_path_factory.mktemp("cifar")
    out = subprocess.run([sys.executable, str(EXAMPLE / "make_synthetic_cifar.py"), str(dest)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert folder == dest / "cifar-10-batches-py"
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(launcher: list[str], data: Path, out: Path, env: dict[str, str] | None = None,
           extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [*launcher, str(SCRIPT), "--data-dir", str(data), "--output-dir", str(out), *TRAIN_ARGS, *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def _check_run(out: Path) -> dict:
    """The run folder's three outputs are complete and consistent; returns summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"test_accuracy", "epochs", "world_size", "steps"}
    assert summary["epochs"] == 2

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(set(r) == METRIC_KEYS for r in records)
    steps = [r["step"] for r in records]
    # Strictly increasing: only the main process writes (two writers would repeat every step).
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"]
    assert {r["epoch"] for r in records} == {1, 2}
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]

    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
        # save_model unwrapped DDP: plain parameter names, not module.…
        assert not any(k.startswith("module.") for k in keys)
        assert f.get_slice("classifier.weight").get_shape() == [10, 2 * WIDTH * 8 * 8]
    return summary


def test_spec_validates_and_points_at_the_script() -> None:
    spec = load_spec(EXAMPLE / "cifar10.yaml")
    assert spec.recipe == "script" and spec.launch.strategy == "ddp"
    assert spec.resolve_path(spec.script) == SCRIPT
    assert spec.resources.nodes == 2 and spec.resources.gpus_per_node == 4
    args = dict(zip(spec.args[::2], spec.args[1::2]))
    # The script runs from the spec's folder, so its --output-dir must be the spec's run folder.
    assert spec.resolve_path(args["--output-dir"]).absolute() == spec.run_dir()
    assert "--data-dir" in args


def test_prepare_script_is_valid_bash() -> None:
    # Only parsed: it downloads from the internet, which tests never reach.
    out = subprocess.run(["bash", "-n", str(EXAMPLE / "prepare_cifar10.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_trains_with_plain_python(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _train([sys.executable], synthetic, out, extra=["--batch-size", "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_run(out)
    assert summary["world_size"] == 1
    assert summary["test_accuracy"] >= MIN_ACCURACY, proc.stdout
    assert "epoch 2/2" in proc.stdout


@pytest.mark.slow
def test_trains_on_two_gloo_ranks(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # `accelerate launch --cpu --num_processes 2` would silently start one process; torchrun starts
    # two, and ACCELERATE_USE_CPU makes accelerate join them over gloo.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    # 16 per rank keeps the global batch at the single-process run's 32.
    proc = _train(launcher, synthetic, out, env={"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""},
                  extra=["--batch-size", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_run(out)
    assert summary["world_size"] == 2
    assert summary["test_accuracy"] >= MIN_ACCURACY, proc.stdout
    # Each rank saw half of every global batch: 512 images / 32 per step = 16 steps per epoch.
    assert summary["steps"] == 32


def test_missing_data_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    proc = _train([sys.executable], missing, tmp_path / "run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(missing) in lines[0] and "prepare_cifar10.sh" in lines[0] and "login node" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_runs_through_hfhpc_run_on_two_cpu_ranks(synthetic: Path, tmp_path: Path) -> None:
    """The shipped spec, switched to CPU ranks, through the same entry point `hfhpc submit` uses."""
    import shutil

    import yaml

    from tests.conftest import hfhpc

    work = tmp_path / "cifar10"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("data", "runs"))
    spec = yaml.safe_load((work / "cifar10.yaml").read_text())
    spec["args"] = ["--data-dir", str(synthetic), "--output-dir", "runs/cifar10", "--epochs", "2", "--batch-size", "32"]
    spec["resources"] = {"nodes": 1, "gpus_per_node": 0, "procs_per_node": 2, "cpus_per_gpu": 1}
    (work / "cpu.yaml").write_text(yaml.safe_dump(spec))
    out = hfhpc("--store", str(tmp_path / "store"), "run", str(work / "cpu.yaml"), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((work / "runs" / "cifar10" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["test_accuracy"] >= 0.6
