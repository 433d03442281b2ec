"""The batch script (golden files, hostile values, no secrets), the SLURM output parsers, and the job
bookkeeping (remembered jobs, progress from metrics.jsonl, ETA against the time limit).

``UPDATE_GOLDEN=1 pytest tests/unit/test_sbatch.py`` rewrites the golden files; review the diff.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.errors import HfhpcError, SlurmError, SpecError, UsageError
from hfhpc.launch import executor, jobs, sbatch, slurm
from hfhpc.launch.jobs import JobRecord, JobStatus
from hfhpc.run.jobfile import JobFile
from hfhpc.run.progress import Progress
from hfhpc.spec import parse_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SAMPLES = GOLDEN / "slurm"  # captured from the throwaway cluster (SLURM 22.05)
RUN_DIR = Path("/scratch/someone/runs/zephyr-sft")
STORE = Path("/project/def-someone/hf-store")
PYTHON = "/opt/hfhpc/bin/python3"  # not a virtualenv: called by absolute path

ZEPHYR = {  # the README's spec
    "name": "zephyr-sft", "recipe": "sft", "model": "HuggingFaceH4/zephyr-7b-beta",
    "dataset": {"id": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "eval_split": "test_sft"},
    "metrics": ["accuracy"],
    "train": {"max_length": 2048, "packing": True, "epochs": 1, "learning_rate": 2.0e-5},
    "launch": {"strategy": "fsdp", "mixed_precision": "bf16"},
    "resources": {"nodes": 1, "gpus_per_node": 4, "cpus_per_gpu": 12, "time": "0-03:00:00",
                  "account": "def-someone"},
    "site": {"preamble": ["module load python/3.11 gcc arrow"], "venv": "/home/someone/venvs/hf"},
    "output_dir": "runs/zephyr-sft",
}
CPU_2NODES = {
    "name": "cifar-ddp", "recipe": "script", "script": "cifar10_train.py", "args": ["--epochs", "2"],
    "launch": {"strategy": "ddp"},
    "resources": {"nodes": 2, "gpus_per_node": 0, "procs_per_node": 2, "cpus_per_gpu": 4, "time": "30"},
}
REQUIREMENTS = {
    "name": "infer-venv", "recipe": "infer", "model": "org/model", "dataset": "org/data",
    "resources": {"nodes": 2, "gpus_per_node": 2, "time": "0-06:00:00", "account": "def-someone"},
    "site": {"preamble": ["module load python/3.11 gcc arrow"], "requirements": "requirements.txt",
             "wheelhouse": "/project/def-someone/wheels"},
}
GPU_TYPE = {
    "name": "sft-a100", "recipe": "sft", "model": "org/model", "dataset": "org/data",
    "launch": {"strategy": "ddp", "signal_delay_s": 600},
    "resources": {"nodes": 4, "gpus_per_node": 4, "gpu_type": "a100", "cpus_per_gpu": 6, "mem_gb": 498,
                  "time": "2-00:00:00", "account": "def-someone", "partition": "gpubase_bynode_b3",
                  "qos": "high", "extra_sbatch": ["--constraint=cascade", "--exclusive"]},
    "site": {"allow_hosts": ["wandb.internal.example.org"]},
}


def make_job(data: dict, *, run_dir: Path = RUN_DIR, store: Path = STORE, spec_path: str = "/home/someone/jobs/job.yaml",
             python: str = PYTHON) -> JobFile:
    spec = parse_spec(data, spec_path)
    spec._source = Path(spec_path)
    return JobFile(spec=spec, spec_path=spec_path, assets=[], store=store, run_dir=run_dir, python=python,
                   created="2026-11-25T12:00:00+00:00")


@pytest.fixture
def stable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The value that depends on the installation, fixed so golden files are stable. (The seal's
    guard folder is another: the script asks the job's Python for it, and never names it.)"""
    monkeypatch.setattr(sbatch, "__version__", "X.Y.Z")


@pytest.mark.parametrize("name, data", [
    ("a_zephyr_fsdp_1node", ZEPHYR),
    ("b_cpu_2nodes", CPU_2NODES),
    ("c_requirements_venv", REQUIREMENTS),
    ("d_gpu_type_partition_qos_extra", GPU_TYPE),
])  # fmt: skip
def test_golden(stable, name: str, data: dict) -> None:
    script = sbatch.render_sbatch(make_job(data))
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(script)
    assert script == path.read_text(), f"rendered script differs from {path}: review, then UPDATE_GOLDEN=1"
    from hfhpc.offline.seal import GUARD_DIR

    assert GUARD_DIR not in script and "_guard" not in script  # resolved when the job runs
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_directives_follow_the_resources() -> None:
    lines = sbatch.render_sbatch(make_job(CPU_2NODES)).splitlines()
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=cifar-ddp", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=4G", "--time=30",
        "--output=logs/%x-%j.out", "--error=logs/%x-%j.out", "--signal=B:USR1@60", "--requeue",
        "--open-mode=append",
    ]
    gpu = sbatch.render_sbatch(make_job(GPU_TYPE))
    assert "#SBATCH --gres=gpu:a100:4\n" in gpu and "--gpus-per-node" not in gpu
    assert "#SBATCH --mem=498G\n#SBATCH --time=2-00:00:00\n" in gpu
    assert gpu.index("--open-mode=append") < gpu.index("#SBATCH --exclusive")  # extra lines last: they win


def test_default_signal_delay_fits_short_jobs() -> None:
    short = {**ZEPHYR, "resources": {**ZEPHYR["resources"], "time": "4"}}
    assert sbatch.signal_delay_s(parse_spec(short)) == 120  # half of 4 minutes, not 300 s
    assert sbatch.signal_delay_s(parse_spec(ZEPHYR)) == 300
    with pytest.raises(SpecError, match="not shorter than resources.time") as e:
        sbatch.render_sbatch(make_job({**short, "launch": {"strategy": "fsdp", "signal_delay_s": 240}}))
    assert e.value.key == "launch.signal_delay_s"


def test_a_run_with_a_checkpoint_gets_the_warning_its_marker_measured(tmp_path: Path) -> None:
    from hfhpc.run import checkpoints as checkpoint

    spec = parse_spec(ZEPHYR)  # 3 h on GPUs: the default would be 300 s
    folder = tmp_path / "checkpoint-50"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    checkpoint.write_marker(folder, 50, save_s=140.0, max_step_s=6.0)
    assert sbatch.signal_delay_s(spec, tmp_path) == 2 * (140 + 6) + 30
    assert sbatch.signal_delay_s(spec, tmp_path / "no-checkpoint-yet") == 300
    assert "#SBATCH --signal=B:USR1@322\n" in sbatch.render_sbatch(make_job(ZEPHYR, run_dir=tmp_path))
    # The spec's own value wins over the measurement.
    fixed = parse_spec({**ZEPHYR, "launch": {**ZEPHYR["launch"], "signal_delay_s": 200}})
    assert sbatch.signal_delay_s(fixed, tmp_path) == 200


@pytest.mark.parametrize("resources, key", [
    ({"extra_sbatch": ["-C v100"]}, "resources.extra_sbatch[0]"),
    ({"extra_sbatch": ["--constraint=v100", "--comment=x\n#SBATCH --account=other"]}, "resources.extra_sbatch[1]"),
    ({"account": "def-x\n#SBATCH --qos=high"}, "resources.account"),
    ({"partition": "gpu base"}, "resources.partition"),
    ({"gpus_per_node": 1, "gpu_type": "a100'"}, "resources.gpu_type"),
])  # fmt: skip
def test_values_that_cannot_go_into_sbatch_lines_are_refused(resources: dict, key: str) -> None:
    data = {**CPU_2NODES, "resources": {**CPU_2NODES["resources"], **resources}}
    with pytest.raises(SpecError) as e:
        sbatch.render_sbatch(make_job(data))
    assert e.value.key == key and e.value.path == "/home/someone/jobs/job.yaml"


def test_venv_of_the_submitting_interpreter_is_activated(tmp_path: Path) -> None:
    venv = tmp_path / "my venv"  # what makes a folder a virtualenv, as far as the script cares
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "activate").write_text("")
    script = sbatch.render_sbatch(make_job(CPU_2NODES, python=str(venv / "bin" / "python")))
    assert f"source '{venv}/bin/activate'\n" in script
    assert "\n  python -m hfhpc.launch.node " in script
    plain = sbatch.render_sbatch(make_job(CPU_2NODES))
    assert "source " not in plain and f"\n  {PYTHON} -m hfhpc.launch.node " in plain


HOSTILE = "a b'c\"d $(touch pwned) `touch pwned2` ;x\nnewline\\ $HOME *"


def _env_and_cd_part(script: str) -> str:
    """The script from its offline environment section up to (not including) the srun line."""
    start = script.index("# -- offline, sealed environment")
    end = script.index("\nsrun --ntasks-per-node=1")
    return script[start:end]


def test_hostile_paths_survive_quoting(tmp_path: Path) -> None:
    base = tmp_path / HOSTILE
    run_dir, store, python = base / "run dir", base / "store", str(base / "bin" / "python")
    run_dir.mkdir(parents=True)
    # The job's Python, at the hostile path: the script asks it for the seal's guard.
    Path(python).parent.mkdir()
    Path(python).write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    Path(python).chmod(0o755)
    data = {**CPU_2NODES, "site": {"preamble": ["echo preamble ran"]}}
    script = sbatch.render_sbatch(make_job(data, run_dir=run_dir, store=store, spec_path=str(base / "job.yaml"),
                                           python=python))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            assert HOSTILE not in line and "\\n" not in line
    # Comments keep a newline escaped: the header cannot end early and run the rest of a path.
    header = script.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith("#") for line in header)

    probe = _env_and_cd_part(script) + '\nprintf "%s\\0" "$HF_HOME" "$HFHPC_STORE" "$PWD" "${HF_TOKEN-unset}" >&2\n'
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_TOKEN": "hf_secret", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, check=True)
    values = proc.stderr.split(b"\0")[:4]
    assert [v.decode() for v in values] == [str(store), str(store), str(run_dir), "unset"]
    assert not list(tmp_path.rglob("pwned*"))


def test_no_secret_in_the_script(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"):
        monkeypatch.setenv(var, f"hf_{var.lower()}_value")
    for data in (ZEPHYR, CPU_2NODES, REQUIREMENTS, GPU_TYPE):
        script = sbatch.render_sbatch(make_job(data))
        assert "_value" not in script
        # Only ever named to be removed.
        assert [line for line in script.splitlines() if "HF_TOKEN" in line] == [
            next(line for line in script.splitlines() if line.startswith("unset "))
        ]


def test_the_launch_forwards_signals_and_returns_sruns_status(tmp_path: Path) -> None:
    """Run the launch section for real, with ``srun`` replaced by a shell function that stands for
    the node agent: a USR1 to the batch shell reaches it, and its exit status is the job's."""
    script = sbatch.render_sbatch(make_job(CPU_2NODES, run_dir=tmp_path))
    launch = script[script.index("# -- launch"):].replace("scontrol requeue", "echo would requeue")
    agent = (
        "srun() { trap 'echo agent got USR1; exit 3' USR1; trap 'echo agent got TERM; exit 143' TERM; "
        "sleep 5 >/dev/null 2>&1 & wait; exit 0; }\n"
    )
    prog = agent + "(sleep 0.5; kill -USR1 $$) &\n" + launch
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "1"}
    proc = subprocess.run(["bash", "-c", prog], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "agent got USR1" in proc.stdout and "would requeue 7" in proc.stdout

    prog = agent + "(sleep 0.5; kill -TERM $$) &\n" + launch
    proc = subprocess.run(["bash", "-c", prog], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 143 and "agent got TERM" in proc.stdout and "requeue" not in proc.stdout


# -- SLURM output parsing -----------------------------------------------------------------------

def test_parse_duration() -> None:
    assert slurm.parse_duration("00:00:02") == 2
    assert slurm.parse_duration("1-02:03:04") == 93784
    assert slurm.parse_duration("365-00:00:00") == 365 * 86400
    assert slurm.parse_duration("05:07") == 307
    assert slurm.parse_duration("00:01:02.345") == 62
    for word in ("UNLIMITED", "Partition_Limit", "INVALID", ""):
        assert slurm.parse_duration(word) is None


def test_parse_sacct_sample() -> None:
    records = slurm.parse_sacct((SAMPLES / "sacct.txt").read_text())
    assert sorted(records) == ["11", "6", "7", "8", "9"]
    cancelled, failed, pending = records["6"], records["9"], records["11"]
    assert (cancelled.state, cancelled.elapsed_s, cancelled.time_limit_s) == ("CANCELLED", 2, 600)
    assert cancelled.nodelist == "hfhpc-n[1-2]" and cancelled.work_dir == "/tmp/cap/dir with space"
    assert (failed.state, failed.exit_code, failed.time_limit_s) == ("FAILED", "7:0", 86400)
    assert (pending.state, pending.start, pending.end, pending.nodelist) == ("PENDING", None, None, None)
    assert records["7"].start is None  # cancelled while pending: Start=None
    assert slurm.parse_sacct("7|x|RUNNING|0:0|00:00:01|UNLIMITED|a|b|n1|/a|b")["7"].work_dir == "/a|b"


def test_parse_scontrol_samples() -> None:
    running = slurm.parse_scontrol((SAMPLES / "scontrol_running.txt").read_text())
    assert running["JobState"] == "RUNNING" and running["RunTime"] == "00:00:02"
    assert running["TimeLimit"] == "00:10:00" and running["NodeList"] == "hfhpc-n[1-2]"
    assert running["WorkDir"] == "/tmp/cap/dir with space"  # a value with a space
    assert running["StdOut"] == "/tmp/cap/dir with space/out.txt" and running["Restarts"] == "0"
    assert running["AllocNode:Sid"] == "vm:3569" and running["TRES"] == "cpu=2,node=2,billing=2"
    pending = slurm.parse_scontrol((SAMPLES / "scontrol_pending.txt").read_text())
    assert (pending["JobState"], pending["Reason"], pending["NodeList"]) == ("PENDING", "BeginTime", "")
    failed = slurm.parse_scontrol((SAMPLES / "scontrol_failed.txt").read_text())
    assert (failed["JobState"], failed["ExitCode"], failed["Reason"]) == ("FAILED", "7:0", "NonZeroExitCode")
    assert slurm.parse_scontrol("") == {}


def test_status_from_samples() -> None:
    pending = executor._from_scontrol(slurm.parse_scontrol((SAMPLES / "scontrol_pending.txt").read_text()))
    assert pending == executor.SchedulerState(
        state="PENDING", reason="BeginTime", exit_code="0:0", elapsed_s=0, time_limit_s=5400, nodelist=None,
        restarts=0, work_dir="/tmp/cap/dir with space", name="wait-me")
    running = executor._from_scontrol(slurm.parse_scontrol((SAMPLES / "scontrol_running.txt").read_text()))
    assert running.reason is None and running.nodelist == "hfhpc-n[1-2]"


def test_missing_slurm_commands_say_where_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without any SLURM client
    with pytest.raises(SlurmError) as e:
        slurm.sbatch(tmp_path / "job.sbatch", cwd=tmp_path)
    assert e.value.command == "sbatch"
    assert "cluster login node" in e.value.render() and "hfhpc run" in e.value.render()
    for call in (lambda: slurm.cluster_name(), lambda: slurm.sacct_info(["1"]), lambda: slurm.scancel("1"),
                 lambda: slurm.scontrol_show_job("1")):
        with pytest.raises(SlurmError, match="not found on PATH"):
            call()


def test_slurm_clients_never_get_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_y")
    env = slurm._command_env(None)
    assert "HF_TOKEN" not in env and "HUGGING_FACE_HUB_TOKEN" not in env and env["PATH"] == os.environ["PATH"]


# -- metrics.jsonl and ETA ------------------------------------------------------------------------

def _metrics(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 1000, "loss": 2.0 - step / 1000, "learning_rate": 2e-5,
            "tokens_per_s": 12345.6, "elapsed_s": step * 2.0, "max_steps": 1000, **extra}


def test_allocations_needed_when_eta_exceeds_the_time_left() -> None:
    p = Progress(100, 1000, 0.1, 1.0, 2e-5, 1000.0, 600.0, 6.0)  # 6 s/step: 5400 s to go
    running = JobStatus("5", "j", None, "RUNNING", elapsed_s=3000, time_limit_s=3600, progress=p)
    assert running.remaining_s == 600 and running.eta_s == 5400
    assert running.allocations_needed == 2  # 4800 s more, 3600 s each
    fits = JobStatus("5", "j", None, "RUNNING", elapsed_s=0, time_limit_s=7200, progress=p)
    assert fits.allocations_needed is None
    pending = JobStatus("5", "j", None, "PENDING", elapsed_s=0, time_limit_s=3600, progress=p)
    assert pending.remaining_s == 3600 and pending.allocations_needed == 1
    done = JobStatus("5", "j", None, "COMPLETED", elapsed_s=3000, time_limit_s=3600, progress=p)
    assert done.eta_s is None and done.allocations_needed is None


def test_status_rendering_warns_with_the_number_of_allocations() -> None:
    from hfhpc.cli.status_cmd import detail_lines, duration, render_table

    p = Progress(100, 1000, 0.1, 1.2345, 2e-5, 12345.0, 600.0, 6.0)
    st = JobStatus("5", "zephyr", Path("/r"), "RUNNING", elapsed_s=3000, time_limit_s=3600, nodelist="n[1-2]", progress=p)
    text = "\n".join(detail_lines(st))
    assert "RUNNING on n[1-2]" in text and "step 100/1000 (10%)" in text and "12,345 tokens/s" in text
    assert "ETA:      1:30:00" in text and "about 2 more allocations of 1:00:00" in text
    table = render_table([st])
    assert table.splitlines()[1].split() == ["5", "zephyr", "RUNNING", "0:50:00/1:00:00", "100/1000", "1.234",
                                             "12,345", "1:30:00!"]
    assert duration(93784) == "1-02:03:04" and duration(None) == "-"


def test_status_warns_when_a_requeued_allocation_has_no_time_to_train() -> None:
    from hfhpc.cli.status_cmd import detail_lines

    p = Progress(5, 1000, None, 1.0, None, None, 50.0, 10.0)  # 9,950 s to go
    st = JobStatus("5", "j", None, "RUNNING", elapsed_s=60, time_limit_s=120, progress=p)
    assert st.forecast.more is None and st.allocations_needed is None  # 120 s less a 300 s restart
    assert "the time limit (0:02:00) leaves no time to train after a requeue: raise resources.time" in "\n".join(detail_lines(st))


# -- remembered jobs ------------------------------------------------------------------------------

def _record(job_id: str, run_dir: str = "/r", name: str = "j") -> JobRecord:
    return JobRecord(job_id, name, run_dir, None, "2026-11-25T12:00:00+00:00", 1, 0, 1, "10")


def test_jobs_are_remembered_and_the_latest_record_wins() -> None:
    assert jobs.list_jobs() == []
    jobs.remember(_record("1", "/a"))
    jobs.remember(_record("2", "/b"))
    with open(jobs.jobs_file(), "a") as f:
        f.write('{"job_id": "3", "na')  # a write cut short
    jobs.remember(_record("1", "/c"))  # the id came back on a rebuilt cluster
    assert [(r.job_id, r.run_dir) for r in jobs.list_jobs()] == [("2", "/b"), ("1", "/c")]
    assert jobs.list_jobs()[0].time_limit_s == 600


def test_resolve_ref(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"spec": {"name": "hello"}}))
    with pytest.raises(UsageError, match="neither a job id nor a run folder"):
        jobs.resolve_ref(str(tmp_path / "nope"))
    (run / "logs" / "local-20261125-120000.out").write_text("")  # what `hfhpc run` writes
    assert jobs.resolve_ref(str(run)) == (None, run, None)  # never submitted
    (run / "logs" / "hello-41.out").write_text("")  # resubmitted by hand: the log names it
    assert jobs.resolve_ref(str(run))[0] == "41"
    jobs.remember(_record("42", str(run), "hello"))
    assert jobs.resolve_ref(str(run))[:2] == ("42", run)
    (run / "logs" / "hello-100.out").write_text("")  # a later resubmission by hand
    assert jobs.resolve_ref(str(run)) == ("100", run, None)
    assert jobs.resolve_ref("42")[1] == run
    assert jobs.resolve_ref("43") == ("43", None, None)


def test_status_of_a_local_run_needs_no_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here
    (tmp_path / "job.json").write_text(json.dumps({"spec": {"name": "hello"}}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_metrics(10)) + "\n")
    st = jobs.job_status(str(tmp_path))
    assert (st.job_id, st.name, st.state, st.progress.step) == (None, "hello", "LOCAL", 10)
    with pytest.raises(UsageError, match="no submitted job is known"):
        jobs.cancel(str(tmp_path))
    with pytest.raises(HfhpcError, match="has no log yet"):
        next(jobs.follow_log(st))


def test_submit_dry_run_and_status_import_no_ml_library(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("name: x\nrecipe: script\nscript: t.py\nresources: {gpus_per_node: 0}\n")
    (tmp_path / "job.lock").write_text('{"version": 1, "assets": []}')
    heavy = ("torch", "transformers", "trl", "accelerate", "datasets", "evaluate")
    code = (
        "import sys\nfrom hfhpc.cli.main import main\n"
        f"assert main(['submit', '--dry-run', {str(tmp_path / 'job.yaml')!r}]) == 0\n"
        "assert main(['status']) == 0\n"
        f"print('HEAVY', sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "HEAVY []"
    assert not (tmp_path / "runs").exists()
