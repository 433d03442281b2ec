"""The fault matrix of training jobs (docs/faults.md): stop signals mid-step with exact resume, a
killed rank, a process killed inside a checkpoint write, a corrupt checkpoint, a full disk, a requeue
on the 2-node SLURM cluster, and ``hfhpc export`` of the checkpoints this leaves.

Two ways to run the SFT recipe here:

* ``hfhpc run`` as a user does, for what the CLI and the node agent do with signals and statuses;
* the *driver*: the ranks the node agent would start (same command, environment, seal), running the
  recipe through a script that also records which documents each rank trained on at each step, and
  injects a fault at an exact point (a signal during step N, SIGKILL during the save of step N).

Exactness is checked against an uninterrupted run of the same spec: per-step losses and the final
weights compare equal (bit for bit), and each step trained exactly the same documents, once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MODEL_ID
from hfhpc.run import checkpoints as ck
from tests.conftest import hfhpc, offline_python

pytestmark = pytest.mark.slow


SPEC = """\
name: {name}
recipe: sft
model: {model}
dataset: {{id: {dataset}, split: train_sft, max_samples: 48}}
train: {{max_length: 128, max_steps: {steps}, learning_rate: 3.0e-3, per_device_batch_size: 4, logging_steps: 1,
        save_steps: {save}, save_total_limit: 2}}
launch: {{strategy: {strategy}, mixed_precision: "no"}}
resources: {{nodes: {nodes}, gpus_per_node: 0, procs_per_node: {procs}, cpus_per_gpu: 1, time: '10'}}
"""

# Test driver: the recipe's own entry point, with a trace and faults. FAULT* are variables of this
# test only; the node agent passes the environment through to the ranks.
DRIVER = '''\
import hashlib, json, os, signal, sys
from pathlib import Path

import trl

from hfhpc.recipes import run
from hfhpc.run import checkpoints

run_dir = Path(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
fault, at = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_STEP", "0"))
fault_rank = int(os.environ.get("FAULT_RANK", "0"))
trace = run_dir / f"trace-rank{rank}.jsonl"
original_step = trl.SFTTrainer.training_step


def documents(inputs):
    """One hash per document of the padding-free batch: position ids restart at 0 for each."""
    ids, pos = inputs["input_ids"].flatten().tolist(), inputs["position_ids"].flatten().tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    return [hashlib.sha1(str(ids[a:b]).encode()).hexdigest()[:12] for a, b in zip(starts, starts[1:])]


def training_step(self, model, inputs, num_items_in_batch=None):
    step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
    with open(trace, "a") as f:
        f.write(json.dumps({"step": step, "docs": documents(inputs)}) + "\\n")
    if fault == "signal" and step == at and rank == fault_rank:
        os.kill(os.getpid(), signal.SIGUSR1)  # during the step, before its forward pass
    return original_step(self, model, inputs, num_items_in_batch)


trl.SFTTrainer.training_step = training_step

if fault == "kill-in-save":
    # SIGKILL when the staged checkpoint of step FAULT_STEP is fully written, just before its marker.
    original_marker = checkpoints.write_marker

    def write_marker(folder, step, **fields):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_marker(folder, step, **fields)

    checkpoints.write_marker = write_marker

run.exit_rank(run.main([str(run_dir)]))
'''


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(hub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    spec = _spec(folder, "stage")
    store = folder / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    (folder / "driver.py").write_text(DRIVER)
    return {"folder": folder, "store": store, "lock": spec.with_suffix(".lock"), "driver": folder / "driver.py"}


def _spec(folder: Path, name: str, *, steps: int = 10, save: int = 4, procs: int = 1, nodes: int = 1,
          lock: Path | None = None, extra: str = "") -> Path:
    spec = folder / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, model=MODEL_ID, dataset=CHAT_DATASET_ID, steps=steps, save=save, procs=procs,
                                nodes=nodes, strategy="ddp" if procs * nodes > 1 else "single") + extra)
    if lock is not None:
        shutil.copyfile(lock, spec.with_suffix(".lock"))
    return spec


def _variant(staged: dict[str, Path], name: str, **kw) -> Path:
    return _spec(staged["folder"], name, lock=staged["lock"], **kw)


def _run_dir(spec: Path) -> Path:
    return spec.parent / "runs" / spec.stem


def _drive(staged: dict[str, Path], spec: Path, **fault: str) -> subprocess.CompletedProcess:
    """Start this node's ranks exactly as the node agent would, with the driver as their script."""
    from hfhpc.launch import node
    from hfhpc.launch.executor import LocalExecutor
    from hfhpc.scheduler.environment import JobEnvironment
    from hfhpc.spec import load_spec

    job = LocalExecutor().prepare(load_spec(str(spec)), staged["store"])
    topo = node.topology(job, JobEnvironment(), local=True)
    cmd = node.ranks_command(job, topo, node.rendezvous_port(job, topo), job.store)
    at = cmd.index("hfhpc.recipes.run")
    cmd[at - 1:at + 1] = [str(staged["driver"])]  # `-m hfhpc.recipes.run` → the driver
    env = node.ranks_environ(job, topo, job.store, dict(os.environ, **fault))
    return subprocess.run(cmd, env=env, cwd=job.run_dir, capture_output=True, text=True, timeout=600)


def _out(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged twice (trained twice) fails here."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _trace(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"trace-rank{rank}.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"final weights differ by up to {diff}"


def _assert_clean(run_dir: Path, keep: int = 2) -> None:
    """Retention kept ``keep`` complete checkpoints; nothing half-written or half-deleted is left."""
    complete = ck.complete_checkpoints(run_dir)
    assert len(complete) == keep and len(ck.checkpoint_dirs(run_dir)) == keep
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint")] == []


@pytest.fixture(scope="module")
def references(staged: dict[str, Path]):
    """Uninterrupted runs, one per rank count, made on first use: {procs: run_dir}."""
    made: dict[int, Path] = {}

    def get(procs: int) -> Path:
        if procs not in made:
            spec = _variant(staged, f"reference-{procs}", **PLANS[procs]["spec"])
            out = _drive(staged, spec)
            assert out.returncode == 0, _out(out)[-4000:]
            made[procs] = _run_dir(spec)
        return made[procs]

    return get


# 1 rank: 5 steps per epoch, 2 epochs, stopped in the second; 2 ranks: 3 steps per epoch, stopped in
# the second, only rank 1 signalled (rank 0 must stop at the same step).
PLANS = {
    1: {"spec": {"steps": 10, "save": 4, "procs": 1}, "stop": 7, "rank": 0},
    2: {"spec": {"steps": 6, "save": 2, "procs": 2}, "stop": 4, "rank": 1},
}


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= n):
        assert proc.poll() is None, f"the run ended before step {n}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _start(staged: dict[str, Path], spec: Path, log: Path) -> subprocess.Popen:
    # Output to a file: nobody reads a pipe while the test waits, and a full pipe would block the run.
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(staged["store"]), "run", str(spec)],
                                stdout=f, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()


# -- 1. a stop signal mid-step; the resumed run is the uninterrupted one, bit for bit -----------------

@pytest.mark.parametrize("procs", [1, 2], ids=["1-rank", "2-ranks-gloo"])
def test_stop_signal_mid_step_then_resume_is_bit_exact(staged, references, procs: int):
    plan = PLANS[procs]
    reference = references(procs)
    spec = _variant(staged, f"stop-{procs}", **plan["spec"])
    run_dir = _run_dir(spec)
    stop = plan["stop"]

    first = _drive(staged, spec, FAULT="signal", FAULT_STEP=str(stop), FAULT_RANK=str(plan["rank"]))
    # One rank exits 3 itself; torchrun reports 1 when its ranks exit 3 (the node agent maps it back).
    assert first.returncode == (3 if procs == 1 else 1), _out(first)[-4000:]
    assert f"rank {plan['rank']} got SIGUSR1: checkpointing after this step" in first.stdout
    assert f"stopped at step {stop} with a checkpoint" in first.stdout
    marker = ck.read_marker(run_dir / f"checkpoint-{stop}")
    # Rank 0 writes the marker: with two ranks it stopped because its peer was signalled.
    assert marker["stop"]["signal"] == ("SIGUSR1" if plan["rank"] == 0 else "peer")
    assert ck.problem(run_dir / f"checkpoint-{stop}") is None
    for rank in range(procs):
        assert sorted({t["step"] for t in _trace(run_dir, rank)}) == list(range(1, stop + 1))

    second = _drive(staged, spec)
    assert second.returncode == 0, _out(second)[-4000:]
    assert f"resuming from {run_dir / f'checkpoint-{stop}'}" in second.stdout

    ref_losses, losses = _losses(reference), _losses(run_dir)
    assert sorted(losses) == list(range(1, plan["spec"]["steps"] + 1))
    worst = max(abs(ref_losses[s] - losses[s]) for s in ref_losses)
    assert losses == ref_losses, f"per-step losses differ by up to {worst}"
    for rank in range(procs):
        # The same documents at every step, in order: nothing seen twice, nothing skipped.
        assert _trace(run_dir, rank) == _trace(reference, rank)
    _assert_same_weights(reference / "model", run_dir / "model")
    _assert_clean(run_dir)


# -- 2. `hfhpc run`: SIGTERM / SIGUSR1 → exit 3; the same command finishes the job ---------------------

@pytest.mark.parametrize(
    ("signum", "procs"),
    [(signal.SIGTERM, 1), (signal.SIGUSR1, 2)],
    ids=["sigterm-1-rank", "sigusr1-2-ranks"],
)
def test_hfhpc_run_stops_with_status_3_and_the_same_command_resumes(staged, tmp_path: Path, signum, procs: int):
    spec = _variant(staged, f"run-{signum.name.lower()}-{procs}", steps=40, save=10, procs=procs)
    run_dir = _run_dir(spec)
    log = tmp_path / "first.log"
    proc = _start(staged, spec, log)
    _wait_for_steps(run_dir, 3, proc, log)
    proc.send_signal(signum)
    code, out = _finish(proc, log)
    assert code == 3, out[-4000:]
    assert "run the same command again to resume" in out
    stopped = ck.stopped_on_signal(run_dir)
    assert stopped is not None and 3 <= stopped.step < 40, out[-4000:]
    assert stopped.marker["stop"]["signal"] in (signum.name, "peer")

    again = hfhpc("--store", str(staged["store"]), "run", str(spec), timeout=600)
    assert again.returncode == 0, _out(again)[-4000:]
    assert f"resuming from {stopped.path}" in again.stdout
    assert sorted(_losses(run_dir)) == list(range(1, 41))  # every step once: none repeated, none skipped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from"] == str(stopped.path)


# -- 3. kill -9 of one rank: the job fails at once and names the rank and the host --------------------

def _rank_pid(run_dir: Path, rank: int) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and f"HFHPC_RUN_DIR={run_dir}".encode() in environ \
                and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return int(entry)
    return None


def test_kill_9_of_one_rank_fails_the_run_naming_rank_and_host(staged, tmp_path: Path):
    spec = _variant(staged, "kill-rank", steps=400, save=100, procs=2)
    run_dir = _run_dir(spec)
    log = tmp_path / "run.log"
    proc = _start(staged, spec, log)
    _wait_for_steps(run_dir, 3, proc, log)
    pid = _rank_pid(run_dir, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    code, out = _finish(proc, log, timeout=120)
    assert code == 1, out[-4000:]
    # torchrun's report: the first failure is the root cause, with the rank, the host and the signal.
    root = out[out.index("Root Cause (first observed failure):"):]
    assert "rank      : 1 (local_rank: 1)" in root
    assert f"host      : {socket.getfqdn()}" in root
    assert f"exitcode  : -9 (pid: {pid})" in root and f"Signal 9 (SIGKILL) received by PID {pid}" in root
    assert "ranks exited with status 1" in out
    assert ck.stopped_on_signal(run_dir) is None  # a failure, not a stop: status 1, no requeue
    assert all(ck.problem(p) is None for _, p in ck.checkpoint_dirs(run_dir))


# -- 4. kill -9 inside a checkpoint write, and a corrupt newer checkpoint: the last good one is used ---

def test_killed_checkpoint_write_and_truncated_checkpoint_fall_back_to_the_previous(staged, references):
    reference = references(1)
    spec = _variant(staged, "kill-in-save", **PLANS[1]["spec"])
    run_dir = _run_dir(spec)
    first = _drive(staged, spec, FAULT="kill-in-save", FAULT_STEP="8")
    assert first.returncode == -signal.SIGKILL, _out(first)[-4000:]
    staged_files = {p.name for p in (run_dir / ".checkpoint-8.tmp" / "checkpoint-8").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= staged_files and ck.MARKER not in staged_files
    assert not (run_dir / "checkpoint-8").exists()
    assert [c.step for c in ck.complete_checkpoints(run_dir)] == [4]

    # A newer checkpoint whose optimizer state was cut short (a disk that lost the tail of a file).
    corrupt = run_dir / "checkpoint-9"
    shutil.copytree(run_dir / "checkpoint-4", corrupt)
    (corrupt / ck.MARKER).unlink()
    ck.write_marker(corrupt, 9)
    with open(corrupt / "optimizer.pt", "r+b") as f:
        f.truncate(1000)

    trained_before = len(_trace(run_dir, 0))
    second = _drive(staged, spec)
    assert second.returncode == 0, _out(second)[-4000:]
    assert "hfhpc: warning: skipping checkpoint-9: optimizer.pt has 1000 bytes" in second.stdout
    assert f"resuming from {run_dir / 'checkpoint-4'}" in second.stdout
    # Steps 5-10 again, on the same documents as the uninterrupted run; the same final model.
    assert _trace(run_dir, 0)[trained_before:] == [t for t in _trace(reference, 0) if t["step"] > 4]
    _assert_same_weights(reference / "model", run_dir / "model")
    _assert_clean(run_dir)  # the staging leftover and the superseded corrupt checkpoint are gone


# -- 5. no space left while writing a checkpoint: one line, the older checkpoint intact ---------------

@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    # A run folder with its logs and one checkpoint (~2.6 MB) fits; a second checkpoint does not.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_no_space_left_during_a_checkpoint_is_one_line_and_keeps_the_older_one(staged, small_disk: Path):
    out_dir = small_disk / "run"
    spec = _variant(staged, "disk-full", steps=10, save=2, extra=f"output_dir: {json.dumps(str(out_dir))}\n")
    out = hfhpc("--store", str(staged["store"]), "run", str(spec), timeout=600)
    text = _out(out)
    assert out.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("hfhpc: error:")]
    assert errors == [f"hfhpc: error: no space left on the device holding {out_dir} while writing a checkpoint; "
                      "the previous checkpoint checkpoint-2 is intact; free space (or lower train.save_total_limit) "
                      "and run the same command again to resume"], text[-4000:]
    assert "Traceback" not in text
    assert [c.step for c in ck.complete_checkpoints(out_dir)] == [2]
    assert ck.checkpoint_dirs(out_dir) == [(2, out_dir / "checkpoint-2")]
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".checkpoint")] == []  # the partial one is gone


# -- 6. SLURM: the time-limit warning on a 2-node CPU job → checkpoint, exit 3, requeue, resume --------

@pytest.mark.slurm
# Without both fixes the job fails after minutes of waiting: not run.
def test_two_node_job_checkpoints_on_the_warning_requeues_and_resumes(slurm_cluster2, staged):
    pytest.importorskip("torch")
    spec = _variant(staged, "slurm-requeue", steps=40, save=10, procs=1, nodes=2)
    run_dir = _run_dir(spec)
    env = slurm_cluster2.env()
    submitted = hfhpc("--store", str(staged["store"]), "submit", "--parsable", str(spec), env=env, timeout=180)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    log = run_dir / "logs" / f"slurm-requeue-{job_id}.out"
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
            assert time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else "the job never started"
            assert slurm_cluster2.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-4000:]
            time.sleep(0.2)
        # What `--signal=B:USR1@N` does at the time limit, now rather than at SLURM's next 30 s tick.
        slurm_cluster2.run("scancel", "--signal=USR1", "--batch", job_id)

        def requeued() -> bool:
            info = slurm_cluster2.run("scontrol", "show", "job", "-o", job_id).stdout
            return "JobState=PENDING" in info and "Restarts=1" in info

        deadline = time.monotonic() + 90
        while not requeued():
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        # The first allocation's checkpoint, made because of the warning (rank 0's own signal or its peer's).
        stopped = ck.stopped_on_signal(run_dir, job_id=job_id, restart=0)
        assert stopped is not None and stopped.marker["stop"]["signal"] in ("SIGUSR1", "peer"), log.read_text()[-4000:]
        time.sleep(1.2)  # see tests/cluster: a release right after the requeue can be lost
        slurm_cluster2.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        state = slurm_cluster2.wait_job(job_id, timeout=150)
    finally:
        slurm_cluster2.run("scancel", job_id, check=False)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert f"hfhpc: checkpoint written before the time limit: requeueing job {job_id}" in text
    assert "restart 1," in text and f"resuming from {stopped.path}" in text
    assert sorted(_losses(run_dir)) == list(range(1, 41))  # every step once across both allocations
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 2 and summary["resumed_from"] == str(stopped.path)


# -- 7. hfhpc export: a plain checkpoint, and FSDP shards (made on CPU in the same on-disk format) -----

def test_export_of_a_plain_checkpoint_loads_with_from_pretrained(staged, references):
    reference = references(1)
    out = hfhpc("export", str(reference))
    assert out.returncode == 0, out.stderr
    exported = reference / "export" / "checkpoint-10"
    assert out.stdout.startswith(f"exported checkpoint-10 (copied) to {exported}: ")
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", ck.MARKER}
    again = hfhpc("export", str(reference))
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    code = (f"from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(exported)!r}); print('loaded', type(m).__name__)")
    res = offline_python(staged["store"], code)
    assert res.returncode == 0 and "loaded MistralForCausalLM" in res.stdout, res.stderr[-2000:]


def test_export_merges_fsdp_sharded_weights(staged, references, tmp_path: Path):
    import torch
    import torch.distributed.checkpoint as dcp

    from hfhpc.export import export_checkpoint

    reference = references(1)
    run_dir = tmp_path / "fsdp-run"
    run_dir.mkdir()
    shutil.copyfile(reference / "job.json", run_dir / "job.json")
    ckpt = run_dir / "checkpoint-10"
    shutil.copytree(reference / "checkpoint-10", ckpt)
    weights = _weights(ckpt)
    # What accelerate's save_fsdp_model writes for SHARDED_STATE_DICT: {"model": state dict} as a torch
    # distributed checkpoint in pytorch_model_fsdp_0/, and no config.json.
    for name in ("model.safetensors", "config.json", ck.MARKER):
        (ckpt / name).unlink()
    dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(str(ckpt / "pytorch_model_fsdp_0")))
    ck.write_marker(ckpt, 10)

    result = export_checkpoint(run_dir)
    assert result.source == "fsdp-sharded" and result.output == run_dir / "export" / "checkpoint-10"
    merged = _weights(result.output)
    assert merged.keys() == weights.keys() and all(torch.equal(merged[k], weights[k]) for k in weights)
    # The config comes from the run's pinned base model in the store.
    assert json.loads((result.output / "config.json").read_text())["model_type"] == "mistral"
    assert not [p for p in run_dir.joinpath("export").iterdir() if p.name.startswith(".")]


# -- 8. trust: bytes changed on disk, a loss that turns NaN, the end of training ------------------------

def _flip(path: Path, offset: int, length: int = 4096) -> None:
    """Invert ``length`` bytes in place: the size stays, the content does not."""
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_a_block_flipped_in_a_checkpoint_is_caught_and_the_run_falls_back(staged, references):
    reference = references(1)
    spec = _variant(staged, "flipped", **PLANS[1]["spec"])
    run_dir = _run_dir(spec)
    first = _drive(staged, spec, FAULT="signal", FAULT_STEP="7", FAULT_RANK="0")
    assert first.returncode == 3, _out(first)[-4000:]
    optimizer = run_dir / "checkpoint-7" / "optimizer.pt"
    size = optimizer.stat().st_size
    _flip(optimizer, size // 2)  # what a bad disk or a stray writer does: same size, other bytes
    assert optimizer.stat().st_size == size and ck.problem(run_dir / "checkpoint-7") is None

    trained_before = len(_trace(run_dir, 0))
    second = _drive(staged, spec)
    assert second.returncode == 0, _out(second)[-4000:]
    assert ("hfhpc: warning: skipping checkpoint-7: optimizer.pt does not match the sha256 written with it "
            "(changed on disk since the save); moved aside to checkpoint-7.corrupt; resuming from checkpoint-4 instead"
            in second.stdout), second.stdout[-3000:]
    assert f"resuming from {run_dir / 'checkpoint-4'}" in second.stdout
    # Steps 5-10 again, on the documents of the uninterrupted run: the same final model, bit for bit.
    assert _trace(run_dir, 0)[trained_before:] == [t for t in _trace(reference, 0) if t["step"] > 4]
    _assert_same_weights(reference / "model", run_dir / "model")
    _assert_clean(run_dir)
    assert (run_dir / "checkpoint-7.corrupt" / "optimizer.pt").stat().st_size == size  # kept to be looked at


def test_a_checkpoint_that_does_not_load_is_set_aside_for_the_previous_one(staged, references):
    reference = references(1)
    spec = _variant(staged, "unloadable", **PLANS[1]["spec"])
    run_dir = _run_dir(spec)
    first = _drive(staged, spec, FAULT="signal", FAULT_STEP="7", FAULT_RANK="0")
    assert first.returncode == 3, _out(first)[-4000:]
    # Written wrong rather than changed later: the marker's hashes match bytes that torch cannot read.
    bad = run_dir / "checkpoint-7"
    (bad / "optimizer.pt").write_bytes(b"not a torch file" * 64)
    (bad / ck.MARKER).unlink()
    ck.write_marker(bad, 7)

    second = _drive(staged, spec)
    assert second.returncode == 0, _out(second)[-4000:]
    assert "hfhpc: warning: skipping checkpoint-7: it does not load (" in second.stdout, second.stdout[-3000:]
    assert f"resuming from {run_dir / 'checkpoint-4'}" in second.stdout
    _assert_same_weights(reference / "model", run_dir / "model")


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line_and_saves_nothing_from_it(staged):
    # A learning rate of 1e30: the first update sends the weights to ~1e30, the next forward overflows.
    spec = _variant(staged, "nan-loss", steps=6, save=1,
                    extra="")
    spec.write_text(spec.read_text().replace("learning_rate: 3.0e-3", "learning_rate: 1.0e+30"))
    run_dir = _run_dir(spec)
    out = hfhpc("--store", str(staged["store"]), "run", str(spec), timeout=600)
    text = _out(out)
    assert out.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("hfhpc: error:")]
    assert len(errors) == 1 and "became NaN or infinite at step" in errors[0], text[-4000:]
    bad_step = int(errors[0].split("at step ")[1].split(":")[0])
    assert "Traceback" not in text
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
    # Every checkpoint kept was written before the loss went bad.
    assert all(step < bad_step for step, _ in ck.checkpoint_dirs(run_dir)), ck.checkpoint_dirs(run_dir)


def test_resuming_from_the_checkpoint_of_the_last_step_trains_no_step_past_the_end(staged):
    # 7 steps (5 per epoch): the last checkpoint lies inside the second epoch, where the Trainer
    # would start the epoch again and train step 8 before it looks at max_steps.
    spec = _variant(staged, "at-the-end", steps=7, save=7)
    run_dir = _run_dir(spec)
    first = _drive(staged, spec)
    assert first.returncode == 0, _out(first)[-4000:]
    weights = _weights(run_dir / "model")
    # Killed after its last checkpoint, before the final model and summary were written:
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    again = _drive(staged, spec)
    assert again.returncode == 0, _out(again)[-4000:]
    assert "nothing left to train: checkpoint-7 is the last step" in again.stdout
    assert max(_losses(run_dir)) == 7 and max(t["step"] for t in _trace(run_dir, 0)) == 7
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["train_loss"] is None
    import torch

    again_weights = _weights(run_dir / "model")
    assert all(torch.equal(weights[k], again_weights[k]) for k in weights)


def test_hfhpc_run_of_a_running_complete_or_changed_run_never_trains_it_again(staged, tmp_path: Path):
    spec = _variant(staged, "rerun", steps=6, save=3)
    run_dir = _run_dir(spec)
    log = tmp_path / "first.log"
    first = _start(staged, spec, log)
    deadline = time.monotonic() + 120
    while not (run_dir / ".hfhpc-run.lock" / "owner.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    # A second `hfhpc run` of the same spec a moment later: refused, naming the holder.
    second = hfhpc("--store", str(staged["store"]), "run", str(spec))
    assert second.returncode == 1, _out(second)
    assert second.stderr.strip() == (f"hfhpc: error: {run_dir} is in use by {socket.gethostname()} pid {first.pid}; "
                                     "wait for that run to finish, or give the spec another output_dir")
    code, out = _finish(first, log)
    assert code == 0, out[-4000:]
    assert sorted(_losses(run_dir)) == list(range(1, 7))

    # Complete: left untouched, one line, exit 0.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = hfhpc("--store", str(staged["store"]), "run", str(spec))
    assert again.returncode == 0, _out(again)
    assert again.stdout == (f"hfhpc: {run_dir} is already complete; `hfhpc run {spec} --fresh` starts over "
                            "in a new folder\n")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    # Changed: refused with exit 2, naming the keys.
    spec.write_text(spec.read_text().replace("max_steps: 6", "max_steps: 8"))
    changed = hfhpc("--store", str(staged["store"]), "run", str(spec))
    assert changed.returncode == 2, _out(changed)
    assert changed.stderr.startswith(f"hfhpc: error: {run_dir} holds a run of a different job (train.max_steps changed")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    # --fresh: a new folder beside it, named where the run says it goes.
    fresh = hfhpc("--store", str(staged["store"]), "run", str(spec), "--fresh", timeout=600)
    assert fresh.returncode == 0, _out(fresh)[-4000:]
    new_dir = run_dir.with_name("rerun-2")
    assert f"hfhpc: run folder {new_dir}" in fresh.stdout
    assert sorted(_losses(new_dir)) == list(range(1, 9))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
