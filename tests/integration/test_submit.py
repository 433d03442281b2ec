"""`hfhpc submit`, `status`, `logs` and `cancel` against the real throwaway SLURM cluster.

Jobs run the real batch script and the real node agent (``python -m hfhpc.launch.node``) with a
``recipe: script`` job whose script reports where it ran. Nothing is faked; tests poll for job
states and never assume a job runs at once.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from hfhpc.store.lock import LOCK_VERSION
from tests.conftest import hfhpc

pytestmark = pytest.mark.slurm

TOKEN = "hf_test_secret_never_in_a_job"

# Each rank writes where it ran; rank 0 logs one metrics line. Options: --sleep S, --until-usr1
# (the first run waits for the time-limit warning and exits 3, as a recipe does after its
# checkpoint; a requeued run finishes at once).
PROBE = textwrap.dedent("""\
    import json, os, signal, socket, sys, time
    from pathlib import Path

    run_dir = Path(os.environ["HFHPC_RUN_DIR"])
    rank = os.environ.get("RANK", "0")
    restart = int(os.environ.get("HFHPC_RESTART_COUNT", "0"))
    keys = ("SLURM_NODEID", "SLURM_JOB_ID", "RANK", "WORLD_SIZE", "HF_HOME", "HF_HUB_OFFLINE", "HFHPC_SEAL",
            "CUDA_VISIBLE_DEVICES")
    record = {k: os.environ.get(k) for k in keys}
    token = any(v in os.environ for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"))
    record.update(hostname=socket.gethostname(), token=token, restart=restart)
    (run_dir / "probe").mkdir(exist_ok=True)
    (run_dir / "probe" / f"rank-{rank}-restart-{restart}.json").write_text(json.dumps(record))
    if rank == "0":
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 5, "epoch": 0.5, "loss": 1.25, "learning_rate": 1e-4, "tokens_per_s": 321.0,
                                "elapsed_s": 50.0, "step_s": 10.0, "max_steps": 1000}) + "\\n")
    print(f"probe rank {rank} on {socket.gethostname()} restart {restart}", flush=True)
    if "--until-usr1" in sys.argv and restart == 0:
        def stop(*_):
            # As a recipe does once it has its checkpoint: a second warning must not kill the
            # exit (Python restores the default action, death, while it shuts down).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            sys.exit(3)

        signal.signal(signal.SIGUSR1, stop)
        time.sleep(300)
    if "--sleep" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
""")


def _project(folder: Path, name: str, resources: str, *, args: str = "[]", output_dir: str | None = None,
             extra: str = "") -> Path:
    """A staged `recipe: script` spec (it needs no assets: the lockfile is empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.py").write_text(PROBE)
    spec = folder / "job.yaml"
    out = f"output_dir: {json.dumps(output_dir)}\n" if output_dir else ""
    spec.write_text(f"name: {name}\nrecipe: script\nscript: probe.py\nargs: {args}\nresources: {resources}\n{out}{extra}")
    (folder / "job.lock").write_text(json.dumps({"version": LOCK_VERSION, "assets": []}))
    return spec


def _cli(cluster, *args: str, path: str | None = None):
    env = cluster.env()
    env["HF_TOKEN"] = TOKEN  # a user's login shell has one: it must never reach a job
    if path is not None:
        env["PATH"] = path
    return hfhpc(*args, env=env, timeout=180)


def _submit(cluster, store: Path, spec: Path) -> str:
    out = _cli(cluster, "--store", str(store), "submit", "--parsable", str(spec))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _probes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "probe").glob("*.json"))]


def _wait_until(what: str, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return value


def test_one_node_job_runs_and_reports(slurm_cluster, tmp_path: Path, store: Path):
    # A run dir no shell could take unquoted: sbatch runs there, the script cds there.
    hostile = "run 'one' \"two\" $(touch pwned) `touch pwned2`"
    spec = _project(tmp_path / "proj", "one-node", "{nodes: 1, gpus_per_node: 1, cpus_per_gpu: 1, time: '5'}",
                    output_dir=f"runs/{hostile}")
    run_dir = tmp_path / "proj" / "runs" / hostile

    dry = _cli(slurm_cluster, "--store", str(store), "submit", "--dry-run", str(spec))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("#!/bin/bash\n") and "#SBATCH --gpus-per-node=1" in dry.stdout
    assert not run_dir.exists() and not (Path.home() / "state").exists()  # wrote nothing

    out = _cli(slurm_cluster, "--store", str(store), "submit", str(spec))
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\d+) \(one-node\)", out.stdout).group(1)
    assert f"logs/one-node-{job_id}.out" in out.stdout and f"hfhpc logs -f {job_id}" in out.stdout
    state = slurm_cluster.wait_job(job_id, timeout=120, accounting=True)
    log = (run_dir / "logs" / f"one-node-{job_id}.out").read_text()
    assert state == "COMPLETED", log

    (probe,) = _probes(run_dir)
    assert probe["SLURM_NODEID"] == "0" and probe["hostname"] == slurm_cluster.nodes[0]
    assert probe["HF_HOME"] == str(store) and probe["HF_HUB_OFFLINE"] == "1" and probe["HFHPC_SEAL"] == "1"
    assert probe["CUDA_VISIBLE_DEVICES"] in {"0", "1"}  # the GPU request reached SLURM
    assert probe["token"] is False
    # What --dry-run printed is what was submitted, but for the time in the header.
    assert (run_dir / "job.sbatch").read_text().splitlines()[2:] == dry.stdout.splitlines()[2:]
    assert not list(tmp_path.rglob("pwned*"))

    status = _cli(slurm_cluster, "status", job_id)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id}  one-node  COMPLETED on {slurm_cluster.nodes[0]}" in status.stdout
    assert "step 5/1000 (0%), epoch 0.50, loss 1.25" in status.stdout and "321 tokens/s" in status.stdout
    by_dir = _cli(slurm_cluster, "status", str(run_dir))
    assert by_dir.stdout == status.stdout
    table = _cli(slurm_cluster, "status").stdout.splitlines()
    assert table[0].split()[:3] == ["JOB", "NAME", "STATE"]
    assert table[1].split()[:3] == [job_id, "one-node", "COMPLETED"]

    logs = _cli(slurm_cluster, "logs", job_id)
    assert logs.returncode == 0 and logs.stdout == log
    assert f"probe rank 0 on {slurm_cluster.nodes[0]} restart 0" in logs.stdout
    assert TOKEN not in log


def test_two_node_cpu_job_and_following_its_log(slurm_cluster2, tmp_path: Path, store: Path):
    pytest.importorskip("torch")  # the node agent starts CPU ranks with torchrun
    spec = _project(tmp_path, "two-nodes", "{nodes: 2, gpus_per_node: 0, procs_per_node: 2, cpus_per_gpu: 1, time: '5'}",
                    args="[--sleep, '2']")
    job_id = _submit(slurm_cluster2, store, spec)
    # Started at once, -f prints what comes and returns when the job has ended.
    follow = _cli(slurm_cluster2, "logs", "-f", job_id)
    assert follow.returncode == 0, follow.stderr
    assert f"job {job_id} has ended" in follow.stderr
    state = slurm_cluster2.wait_job(job_id, timeout=120, accounting=True)
    run_dir = tmp_path / "runs" / "two-nodes"
    log = (run_dir / "logs" / f"two-nodes-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert follow.stdout == log

    probes = _probes(run_dir)
    n1, n2 = slurm_cluster2.nodes
    assert sorted((p["RANK"], p["SLURM_NODEID"], p["hostname"]) for p in probes) == [
        ("0", "0", n1), ("1", "0", n1), ("2", "1", n2), ("3", "1", n2)]
    assert {p["WORLD_SIZE"] for p in probes} == {"4"} and not any(p["token"] for p in probes)
    for rank in range(4):
        assert f"probe rank {rank} on" in log


def test_cancel_a_sleeping_job_and_refuse_a_second_submit_meanwhile(slurm_cluster, tmp_path: Path, store: Path):
    spec = _project(tmp_path, "sleeper", "{nodes: 1, gpus_per_node: 0, cpus_per_gpu: 1, time: '10'}",
                    args="[--sleep, '600']")
    job_id = _submit(slurm_cluster, store, spec)
    run_dir = tmp_path / "runs" / "sleeper"
    try:
        _wait_until("the job to run", lambda: (run_dir / "probe").is_dir())
        again = _cli(slurm_cluster, "--store", str(store), "submit", str(spec))
        assert again.returncode == 1
        assert f"job {job_id} of {run_dir} is still RUNNING" in again.stderr and f"hfhpc cancel {job_id}" in again.stderr

        out = _cli(slurm_cluster, "cancel", job_id)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"cancelled job {job_id}")
        assert slurm_cluster.wait_job(job_id, timeout=60, accounting=True) == "CANCELLED"
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    status = _cli(slurm_cluster, "status", job_id)
    assert f"job {job_id}  sleeper  CANCELLED" in status.stdout


@pytest.mark.slow
def test_time_limit_warning_checkpoints_and_requeues(slurm_cluster, tmp_path: Path, store: Path):
    # USR1 is due 90 s before the 2-minute limit. slurmctld checks limits every 30 s, so it comes
    # 60-90 s before the limit: never so late that the limit ends the job before it requeues.
    spec = _project(tmp_path, "requeue", "{nodes: 1, gpus_per_node: 0, cpus_per_gpu: 1, time: '2'}",
                    args="[--until-usr1]", extra="launch: {signal_delay_s: 90}\n")
    job_id = _submit(slurm_cluster, store, spec)
    run_dir = tmp_path / "runs" / "requeue"
    try:
        _wait_until("the first run", lambda: (run_dir / "probe").is_dir())
        status = _cli(slurm_cluster, "status", job_id).stdout
        # 995 steps at 10 s each against a 2-minute limit: many allocations.
        assert "RUNNING" in status and "ETA:      2:45:50" in status and "more allocations of 0:02:00" in status, status

        def requeued() -> bool:
            info = slurm_cluster.run("scontrol", "show", "job", "-o", job_id).stdout
            return "JobState=PENDING" in info and "Restarts=1" in info

        _wait_until("the job to requeue itself", requeued, timeout=90)
        # A requeued job waits 2 minutes to start again; the fixture's trick cuts that short.
        time.sleep(1.2)
        slurm_cluster.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        state = slurm_cluster.wait_job(job_id, timeout=90)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    log = (run_dir / "logs" / f"requeue-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert f"requeueing job {job_id}" in log
    assert "probe rank 0 on" in log and "restart 0" in log and "restart 1" in log  # one log, appended
    assert sorted(p["restart"] for p in _probes(run_dir)) == [0, 1]


def test_a_job_that_can_never_start_is_refused_with_the_numbers(slurm_cluster2, tmp_path: Path, store: Path):
    # Every test node has this machine's CPUs and 2 GPUs; the partition has 2 nodes. SLURM itself
    # would queue these jobs and leave them PENDING (PartitionConfig) for ever.
    cpus = os.cpu_count() or 1
    cases = {
        "too-wide": (f"{{nodes: 1, gpus_per_node: 0, cpus_per_gpu: {cpus * 4}, time: '5'}}",
                     f"{cpus * 4} CPUs per node asked, its nodes have {cpus}"),
        "too-many-gpus": ("{nodes: 1, gpus_per_node: 3, cpus_per_gpu: 1, time: '5'}", "3 GPUs per node asked, its nodes have 2"),
        "too-many-nodes": ("{nodes: 3, gpus_per_node: 0, cpus_per_gpu: 1, time: '5'}",
                           "3 nodes asked, 2 of the partition's 2 can hold the job"),
    }
    for name, (resources, said) in cases.items():
        spec = _project(tmp_path / name, name, resources)
        out = _cli(slurm_cluster2, "--store", str(store), "submit", str(spec))
        assert out.returncode == 1, out.stdout
        assert out.stderr.startswith("hfhpc: error: the job can never start in partition debug: "), out.stderr
        assert said in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / name / "runs").exists()
    assert not (Path.home() / "state" / "jobs.jsonl").exists()  # nothing submitted, nothing remembered
    assert slurm_cluster2.run("squeue", "--noheader").stdout.strip() == ""


def test_status_explains_a_pending_job_and_lists_only_this_clusters_jobs(slurm_cluster, tmp_path: Path, store: Path):
    from hfhpc.launch.jobs import JobRecord, remember

    # A job of another cluster, remembered in the same file: its id means nothing here.
    remember(JobRecord("1", "elsewhere", str(tmp_path / "gone"), None, "2026-12-01T00:00:00+00:00", 1, 0, 1, "10",
                       cluster="narval"))
    spec = _project(tmp_path, "later", "{nodes: 1, gpus_per_node: 0, cpus_per_gpu: 1, time: '5', "
                    "extra_sbatch: ['--begin=now+3600']}")
    job_id = _submit(slurm_cluster, store, spec)
    try:
        status = _cli(slurm_cluster, "status", job_id)
        assert status.returncode == 0, status.stderr
        assert f"job {job_id}  later  PENDING (BeginTime)" in status.stdout
        assert "waiting:  it may not start before the begin time it was given" in status.stdout
        assert "to do:    `scontrol update job=ID StartTime=now` starts it sooner" in status.stdout
        table = _cli(slurm_cluster, "status").stdout.splitlines()
        assert [line.split()[0] for line in table[1:3]] == [job_id, f"{job_id}:"]
        assert table[1].split()[2:4] == ["PENDING", "(BeginTime)"]
        assert table[-1] == "(1 remembered job(s) of other clusters not shown)"
    finally:
        slurm_cluster.run("scancel", job_id, check=False)


def test_sbatch_errors_reach_the_user_with_the_fix(slurm_cluster2, tmp_path: Path, store: Path):
    spec = _project(tmp_path, "bad-partition", "{nodes: 1, gpus_per_node: 0, cpus_per_gpu: 1, time: '5', partition: nope}")
    out = _cli(slurm_cluster2, "--store", str(store), "submit", str(spec))
    assert out.returncode == 1
    assert out.stderr.startswith("hfhpc: error: sbatch failed: Batch job submission failed: Invalid partition name")
    assert "Traceback" not in out.stderr

    no_slurm = _cli(slurm_cluster2, "--store", str(store), "submit", str(spec), path=str(tmp_path / "empty"))
    assert no_slurm.returncode == 1
    assert "sbatch not found on PATH; run submit, status, logs and cancel on a cluster login node" in no_slurm.stderr
    assert not (Path.home() / "state" / "jobs.jsonl").exists()  # nothing submitted, nothing remembered

    unknown = _cli(slurm_cluster2, "status", "999999")
    assert unknown.returncode == 1 and "job 999999 is unknown to SLURM" in unknown.stderr
