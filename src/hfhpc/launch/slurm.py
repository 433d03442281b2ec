"""Thin, typed wrappers over the SLURM client commands, using their parsable output modes.

Every function takes ``env`` (default: this process's environment), so the same code talks to
whichever cluster ``SLURM_CONF`` names. A missing command or a failing one raises
:class:`~hfhpc.errors.SlurmError`; a job the cluster no longer knows is an answer (None), not an
error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hfhpc import env as hfenv
from hfhpc.errors import SlurmError
from hfhpc.scheduler.environment import without_handed_down
from hfhpc.slurmtime import parse_reported as parse_duration

TIMEOUT_S = 60
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})  # fmt: skip
# WorkDir last: it is the only field that may hold "|" (a path), so it takes the rest of the line.
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "Timelimit", "Start", "End", "NodeList", "WorkDir")
# What squeue/scontrol print (exit status 1) for a job that ended longer ago than MinJobAge.
_UNKNOWN_JOB = "Invalid job id"


@dataclass(frozen=True)
class SacctRecord:
    """One job allocation as accounting knows it (the latest run of a requeued job)."""

    job_id: str
    name: str
    state: str  # first word: "CANCELLED by 0" → "CANCELLED"
    exit_code: str  # "status:signal", e.g. "7:0"
    elapsed_s: int
    time_limit_s: int | None  # None: unlimited or the partition's limit
    start: str | None  # ISO time, None while pending
    end: str | None
    nodelist: str | None
    work_dir: str | None  # where sbatch ran: hfhpc's run dir


def _time_or_none(text: str) -> str | None:
    return None if text in ("", "Unknown", "None", "N/A") else text


def _command_env(env: Mapping[str, str] | None) -> dict[str, str]:
    # The SLURM clients copy their environment into the job (sbatch's --export=ALL) and the
    # controller stores it: a token must never reach them, nor the job variables of the job
    # this command may run in (a job that submits the next one).
    base = without_handed_down(os.environ if env is None else env)
    return {k: v for k, v in base.items() if k not in hfenv.SECRET_VARS}


def run_slurm(args: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
              ok_unknown_job: bool = False) -> str | None:
    """Run a SLURM client; return its stdout, or None when ``ok_unknown_job`` and the job is gone."""
    command = args[0]
    child_env = _command_env(env)
    exe = shutil.which(command, path=child_env.get("PATH"))
    if exe is None:
        raise SlurmError(command, f"{command} not found on PATH",
                         "run submit, status, logs and cancel on a cluster login node, or `hfhpc run SPEC` here")
    try:
        proc = subprocess.run([exe, *args[1:]], env=child_env, cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(command, f"no answer in {TIMEOUT_S} s", "the controller may be busy: try again in a minute") from None
    if proc.returncode != 0:
        if ok_unknown_job and _UNKNOWN_JOB in proc.stderr:
            return None
        raise SlurmError(command, _last_error_line(command, proc), _FIXES.get(command, _FIX_CONTROLLER))
    return proc.stdout


_FIX_CONTROLLER = "`scontrol ping` says whether the controller answers; ask the cluster's support if it does not"
_FIXES = {
    "sbatch": "check the spec's resources: `sinfo -s` lists the partitions, `sacctmgr show assoc user=$USER` the accounts",
    "scancel": "`squeue --me` lists your jobs",
}


def _last_error_line(command: str, proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {proc.returncode}"
    # "sbatch: error: Batch job submission failed: …" → the part after the prefix.
    return re.sub(rf"^{re.escape(command)}: (error|fatal): ", "", lines[-1])


def sbatch(script_path: Path, cwd: Path, *, env: Mapping[str, str] | None = None) -> str:
    """Submit ``script_path`` with ``cwd`` as the job's working folder; return the job id."""
    out = run_slurm(["sbatch", "--parsable", str(script_path)], env=env, cwd=cwd) or ""
    # --parsable prints "id" or, on a federated/multi-cluster setup, "id;cluster".
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError("sbatch", f"unexpected output {out.strip()!r}", "submit by hand to see what sbatch says")
    return job_id


def parse_sacct(text: str) -> dict[str, SacctRecord]:
    """Records of ``sacct --parsable2 --noheader --allocations -o`` :data:`SACCT_FIELDS`."""
    records: dict[str, SacctRecord] = {}
    for line in text.splitlines():
        cols = line.split("|", len(SACCT_FIELDS) - 1)
        if len(cols) != len(SACCT_FIELDS):
            continue
        job_id, name, state, exit_code, elapsed, limit, start, end, nodes, work_dir = cols
        records[job_id] = SacctRecord(
            job_id=job_id, name=name, state=state.split()[0] if state else "UNKNOWN", exit_code=exit_code,
            elapsed_s=parse_duration(elapsed) or 0, time_limit_s=parse_duration(limit),
            start=_time_or_none(start), end=_time_or_none(end),
            nodelist=None if nodes in ("", "None assigned") else nodes, work_dir=work_dir or None,
        )
    return records


def sacct_info(job_ids: Iterable[str], *, env: Mapping[str, str] | None = None) -> dict[str, SacctRecord]:
    """Accounting records of ``job_ids`` by job id (ids accounting does not know are absent)."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    out = run_slurm(["sacct", "--parsable2", "--noheader", "--allocations", "--jobs", ",".join(ids),
                     "--format", ",".join(SACCT_FIELDS)], env=env)
    return parse_sacct(out or "")


def scancel(job_id: str, signal: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
    """Cancel the job, or with ``signal`` (e.g. ``USR1``) only send it that signal.

    The signal goes to the batch shell alone (``--batch``): hfhpc's script forwards USR1 and TERM to
    srun, which passes them to every task. Sending it to the steps as well would deliver it twice.
    """
    args = ["scancel"] + ([f"--signal={signal}", "--batch"] if signal else []) + [str(job_id)]
    run_slurm(args, env=env)


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output: one line of ``Key=Value`` pairs.

    Values may contain spaces only as the last pair on a line of old versions (``Power=``); a
    value never contains ``=`` followed by a key, so splitting on `` Key=`` is safe.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields: dict[str, str] = {}
    for match in re.finditer(r"(?:^|\s)([A-Za-z/:_]+)=(.*?)(?=\s[A-Za-z/:_]+=|$)", line):
        fields[match.group(1)] = match.group(2).strip()
    return fields


def scontrol_show_job(job_id: str, *, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``scontrol show job -o`` as a dict (``JobState``, ``RunTime``, ``TimeLimit``, ``NodeList``,
    ``Restarts``, ``Reason``, …); None once the controller has forgotten the job."""
    out = run_slurm(["scontrol", "show", "job", "-o", str(job_id)], env=env, ok_unknown_job=True)
    return parse_scontrol(out) if out else None


def parse_cluster_name(text: str) -> str | None:
    """``ClusterName`` from ``scontrol show config`` (``ClusterName             = narval``)."""
    m = re.search(r"^ClusterName\s*=\s*(\S+)", text, re.MULTILINE)
    return m.group(1) if m else None


def cluster_name(*, env: Mapping[str, str] | None = None) -> str | None:
    """The name of the cluster the clients talk to: job ids are only unique within one."""
    return parse_cluster_name(run_slurm(["scontrol", "show", "config"], env=env) or "")
