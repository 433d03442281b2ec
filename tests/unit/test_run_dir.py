"""The run folder package (hfhpc.run): one owner per file name, progress and the one allocation
forecast, safe re-runs (same job resumes, complete is left alone, a changed one is refused), the
run lock, and ``hfhpc status`` and ``hfhpc report`` agreeing on a run's ETA."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.errors import RunDiffersError, RunLockedError
from hfhpc.run import progress
from hfhpc.run.jobfile import COMPLETE, NEW, RESUME, differences, fresh_run_dir, load_job, prepare_run_dir, rerun_state
from hfhpc.run.lock import RunLock
from hfhpc.run.paths import RunDir
from hfhpc.run.progress import Progress, allocations_left
from hfhpc.spec import parse_spec
from tests.conftest import hfhpc

SRC = Path(__file__).resolve().parents[2] / "src" / "hfhpc"


def _metrics(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 1000, "loss": 2.0 - step / 1000, "learning_rate": 2e-5,
            "tokens_per_s": 12345.6, "elapsed_s": step * 2.0, "max_steps": 1000, **extra}


# -- one owner per name ---------------------------------------------------------------------------

def _path_literals(path: Path) -> set[str]:
    """The string constants of a module that could build a path: no docstrings, no prose (a message
    or help text has spaces)."""
    import ast

    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs and " " not in node.value}


def test_every_run_folder_file_is_named_once_in_the_source():
    names = [RunDir.JOB, RunDir.SBATCH, RunDir.METRICS, RunDir.EVAL, RunDir.SUMMARY, RunDir.PREDICTIONS,
             RunDir.REPORT, RunDir.LOCK, RunDir.LOGS, "predictions.rank", "checkpoint-", ".port-", "accelerate-node",
             "local-", "%x-%j"]
    found: dict[str, list[str]] = {n: [] for n in names}
    for path in sorted(SRC.rglob("*.py")):
        literals = _path_literals(path)
        for n in names:
            # Short names count as whole literals (or an f-string's leading piece), longer ones anywhere.
            short = n in (RunDir.LOGS, "local-")
            if any((lit == n or lit.startswith(n + "/")) if short else n in lit for lit in literals):
                found[n].append(path.relative_to(SRC).as_posix())
    # `hfhpc logs` is a command; its messages speak of logs/.
    found[RunDir.LOGS] = [p for p in found[RunDir.LOGS] if not p.startswith("cli/")]
    assert {n: where for n, where in found.items() if where != ["run/paths.py"]} == {}


def _hfhpc_imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hfhpc"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hfhpc")}
    return out


def test_launch_and_recipes_do_not_import_each_other_and_run_imports_neither():
    def importers(folder: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
        found = {}
        for path in sorted((SRC / folder).rglob("*.py")):
            bad = {m for m in _hfhpc_imports(path) if m.startswith(forbidden)}
            if bad:
                found[path.relative_to(SRC).as_posix()] = bad
        return found

    # The registry (which recipes exist, what they need) is the one part of recipes/ the launcher
    # asks; no recipe code, and no checkpoint code, is imported by launch/ or export.
    def recipe_code(found: dict[str, set[str]]) -> dict[str, set[str]]:
        return {k: {m for m in v if not m.startswith("hfhpc.registry") and m != "hfhpc.recipes"}
                for k, v in found.items() if any(not m.startswith("hfhpc.registry") and m != "hfhpc.recipes" for m in v)}

    assert recipe_code(importers("launch", ("hfhpc.recipes",))) == {}
    assert {m for m in _hfhpc_imports(SRC / "export.py") if m.startswith("hfhpc.recipes")} == set()
    assert importers("recipes", ("hfhpc.launch",)) == {}
    assert importers("run", ("hfhpc.launch", "hfhpc.recipes", "hfhpc.report", "hfhpc.plan", "hfhpc.cli")) == {}


def test_the_run_package_imports_no_ml_library():
    code = ("import sys, hfhpc.run.paths, hfhpc.run.jobfile, hfhpc.run.progress, hfhpc.run.checkpoints, hfhpc.run.lock; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_dir_names_every_file_of_a_run(tmp_path: Path):
    run = RunDir(tmp_path)
    assert run.job_file == tmp_path / "job.json" and run.sbatch == tmp_path / "job.sbatch"
    assert run.checkpoint(30) == tmp_path / "checkpoint-30" and run.model == tmp_path / "model"
    assert run.slurm_log("zephyr", "42") == tmp_path / "logs" / "zephyr-42.out"
    assert RunDir.SLURM_LOG_PATTERN == "logs/%x-%j.out"  # what the batch script asks SLURM for
    assert not run.complete
    run.summary.write_text("{}")
    assert run.complete


# -- metrics.jsonl and the forecast -------------------------------------------------------------------

def test_last_json_line_skips_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert progress.last_json_line(path) is None
    path.write_text("")
    assert progress.last_json_line(path) is None
    lines = [json.dumps(_metrics(s)) for s in range(1, 3001)]  # > one read block
    path.write_text("\n".join(lines) + "\n")
    assert progress.last_json_line(path)["step"] == 3000
    with open(path, "a") as f:
        f.write('{"step": 3001, "loss": 1.')  # a writer mid-line
    assert progress.last_json_line(path)["step"] == 3000
    path.write_text('{"step": 1}\n' + "x" * 20000)  # a long broken tail spanning blocks
    assert progress.last_json_line(path) == {"step": 1}


def test_progress_and_eta(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_metrics(250)) + "\n")
    p = progress.read_progress(tmp_path)
    assert (p.step, p.max_steps, p.loss, p.tokens_per_s) == (250, 1000, 1.75, 12345.6)
    assert p.eta_s == 750 * 2.0  # (max_steps - step) × elapsed/step
    # After a requeue elapsed_s restarts while step does not: step_s (this allocation) wins.
    assert Progress(500, 1000, None, None, None, None, 10.0, 0.5).eta_s == 250
    assert Progress(10, -1, None, None, None, None, 10.0, None).eta_s is None  # epochs, no max_steps
    (tmp_path / "metrics.jsonl").write_text('{"eval_loss": 1.0}\n')
    assert progress.read_progress(tmp_path) is None


def test_read_metrics_keeps_step_rows_and_skips_broken_lines(tmp_path: Path) -> None:
    RunDir(tmp_path).metrics.write_text('{"step": 1, "loss": 2}\n{"eval_loss": 1}\n[1]\n{"step": 2, "lo')
    assert progress.read_metrics(tmp_path) == [{"step": 1, "loss": 2}]
    assert progress.read_metrics(tmp_path / "missing") == []


def test_allocations_left_counts_the_warning_and_each_restart() -> None:
    # 5,400 s to train; 600 s used of 3,600, warning 300 s before the limit: 2,700 s left here; then
    # 3,600 - 300 - 300 (restart) = 3,000 s per allocation: one more.
    found = allocations_left(5400, time_limit_s=3600, used_s=600, signal_delay_s=300, restart_s=300)
    assert (found.time_left_s, found.per_allocation_s, found.more) == (2700, 3000, 1)
    assert allocations_left(2700, time_limit_s=3600, used_s=600, signal_delay_s=300).more == 0
    assert allocations_left(5400, time_limit_s=600, used_s=0, signal_delay_s=300, restart_s=300).more is None


def test_plan_schedules_allocations_with_the_same_forecast() -> None:
    from hfhpc.plan import schedule

    class Shape:
        params = 1_000_000

    class Inputs:  # the few fields schedule reads
        micro_batch, grad_accum, world, seq_len, weights_dtype = 1, 1, 1, 1000, "bf16"
        shape, trainable_params, lora, master_bytes = Shape(), 1_000_000, False, 4

    class Throughput:
        tokens_per_s_per_gpu = 1000.0  # 1 s per step

    s = schedule(Inputs(), None, Throughput(), epochs=1, max_steps=10_000, spec_time_s=3600, signal_delay_s=300)
    expected = 1 + allocations_left(s.train_s + s.saves * s.save_s, time_limit_s=3600, used_s=s.startup_s,
                                    signal_delay_s=300, restart_s=s.startup_s).more
    assert s.spec_allocations == expected > 1


def _job_folder(tmp_path: Path, *, time: str = "0-01:00:00", signal_delay_s: int = 300) -> Path:
    spec = {"name": "long", "recipe": "script", "script": "t.py", "resources": {"gpus_per_node": 1, "time": time}}
    run = tmp_path / "runs" / "long"
    (run / "logs").mkdir(parents=True)
    job = {"version": 1, "created": "2026-12-03T12:00:00+00:00", "spec_path": None, "spec": spec, "assets": [],
           "store": str(tmp_path / "store"), "run_dir": str(run), "python": sys.executable, "signal_delay_s": signal_delay_s}
    RunDir(run).job_file.write_text(json.dumps(job))
    return run


def test_status_and_report_give_the_same_eta_and_allocations_left(tmp_path: Path) -> None:
    # 1,000 steps at 6 s; 200 done in 1,200 s of this allocation: 4,800 s left, 2,100 s usable here
    # (1 h limit, warning 300 s before it), then 3,000 s per allocation: 1 more.
    run = _job_folder(tmp_path)
    rows = [_metrics(s, elapsed_s=6.0 * s, step_s=6.0) for s in (100, 200)]
    RunDir(run).metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # SLURM's view of the running job, at the process boundary: its clock agrees with the log's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'JobId=77 JobName=long JobState=RUNNING Reason=None Restarts=0 ExitCode=0:0 "
                        f"RunTime=00:20:00 TimeLimit=01:00:00 NodeList=n1 WorkDir={run}'\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    status = hfhpc("status", "77", env=env)
    report = hfhpc("report", str(run), env=env)
    assert status.returncode == 0 and report.returncode == 0, status.stderr + report.stderr
    more = [re.findall(r"about (\d+) more allocation", out.stdout) for out in (status, report)]
    assert more == [["1"], ["1"]], status.stdout + report.stdout
    assert "ETA:      1:20:00" in status.stdout and "1:20:00 of training left" in report.stdout


# -- running a spec again ----------------------------------------------------------------------------

SPEC = {"name": "j", "recipe": "script", "script": "t.py", "args": ["--max-steps", "30"],
        "resources": {"gpus_per_node": 0, "time": "1:00:00"}}


def _job(tmp_path: Path, **changes):
    from hfhpc.run.jobfile import JobFile

    data = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    spec = parse_spec(data, str(tmp_path / "j.yaml"))
    return JobFile(spec, str(tmp_path / "j.yaml"), [], tmp_path / "store", tmp_path / "runs" / "j", sys.executable,
                   "2026-12-03T12:00:00+00:00")


def test_a_rerun_resumes_the_same_job_and_leaves_a_complete_one_alone(tmp_path: Path) -> None:
    job = _job(tmp_path)
    assert rerun_state(job) == NEW
    prepare_run_dir(job)
    assert rerun_state(_job(tmp_path)) == RESUME
    # Where and how long it runs may change: a longer time limit is the usual reason to resubmit.
    assert rerun_state(_job(tmp_path, resources__time="3:00:00", resources__account="def-x")) == RESUME
    job.paths.summary.write_text("{}")
    assert rerun_state(_job(tmp_path)) == COMPLETE


def test_a_changed_spec_is_refused_naming_the_keys(tmp_path: Path) -> None:
    prepare_run_dir(_job(tmp_path))
    with pytest.raises(RunDiffersError) as e:
        rerun_state(_job(tmp_path, args=["--max-steps", "60"], resources__nodes=2), "hfhpc run j.yaml")
    assert e.value.keys == ["args", "resources.nodes"]
    assert e.value.exit_code == 2
    assert e.value.render() == (f"{tmp_path / 'runs' / 'j'} holds a run of a different job (args, resources.nodes "
                                "changed since its job.json); `hfhpc run j.yaml --fresh` starts over in a new folder, "
                                "or restore the spec and lockfile to resume this run")


def test_a_changed_lockfile_commit_is_a_difference(tmp_path: Path) -> None:
    from dataclasses import replace

    from hfhpc.store.lock import LockedAsset

    old = replace(_job(tmp_path), assets=[LockedAsset("model", "org/m", "main", "a" * 40, [], [])])
    new = replace(old, assets=[LockedAsset("model", "org/m", "main", "b" * 40, [], [])])
    assert differences(old, new) == ["model org/m"]


def test_an_unreadable_job_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.paths.root.mkdir(parents=True)
    job.paths.job_file.write_text("{broken")
    with pytest.raises(RunDiffersError, match=r"job.json \(unreadable\)"):
        rerun_state(job)
    assert job.paths.job_file.read_text() == "{broken"


def test_fresh_folders_are_numbered_beside_the_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "j"
    assert fresh_run_dir(run) == run
    run.mkdir(parents=True)
    assert fresh_run_dir(run) == tmp_path / "runs" / "j-2"
    (tmp_path / "runs" / "j-2").mkdir()
    assert fresh_run_dir(run) == tmp_path / "runs" / "j-3"


def test_old_job_files_without_a_signal_delay_still_load(tmp_path: Path) -> None:
    job = _job(tmp_path)
    prepare_run_dir(job)
    data = json.loads(job.paths.job_file.read_text())
    assert data["signal_delay_s"] is None
    del data["signal_delay_s"]
    job.paths.job_file.write_text(json.dumps(data))
    assert load_job(job.paths.root).signal_delay_s is None


# -- the run lock ------------------------------------------------------------------------------------

def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "run").acquire()
        assert e.value.owner == f"{socket.gethostname()} pid {os.getpid()}"
        assert e.value.exit_code == 1
    with RunLock(tmp_path / "run"):  # released: free again
        pass
    assert not RunDir(tmp_path / "run").lock.exists()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunDir(tmp_path).lock
    lock.mkdir(parents=True)
    (lock / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
    with RunLock(tmp_path):
        assert json.loads((lock / "owner.json").read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_is_respected_until_its_heartbeat_stops(tmp_path: Path) -> None:
    from hfhpc.run import lock as run_lock

    lock = RunDir(tmp_path).lock
    lock.mkdir(parents=True)
    owner = lock / "owner.json"
    owner.write_text(json.dumps({"host": "gpu-node-7", "pid": 1234, "token": "x"}))
    with pytest.raises(RunLockedError, match="in use by gpu-node-7 pid 1234"):
        RunLock(tmp_path).acquire()
    old = os.stat(owner).st_mtime - run_lock.STALE_S - 10
    os.utime(owner, (old, old))
    os.utime(lock, (old, old))
    with RunLock(tmp_path):
        pass
