"""One way to start and follow a job, several backends (submitit's Executor idea).

Every executor freezes the spec and lockfile into ``RUN_DIR/job.json`` first and ends in the same
per-node entry point (``hfhpc.launch.node``): the local executor runs it now, in the foreground, as
node 0 of 1; a batch scheduler writes a script whose job step runs it once per node.

:class:`Executor` is the whole interface the CLI uses (``run``, ``submit``, ``status``, ``logs``,
``cancel``): ``script``, ``start`` (run or submit), ``query`` (the scheduler's view of jobs),
``cancel``, ``cluster`` and ``log_path``. Inside a job, the scheduler's variables are read once, by
:class:`hfhpc.scheduler.environment.JobEnvironment`.
Every executor treats a run folder the same way (:func:`hfhpc.run.jobfile.rerun_state`): the same
job resumes, a complete one is left alone, a different one is refused; ``fresh`` starts over in a
new folder.
:class:`BatchScheduler` owns the submit flow (render, check the request against the partition,
refuse a second live job of the run folder, write, submit, remember); a scheduler supplies only the
script text, the submit, query and cancel commands and its capacity check. :class:`SlurmExecutor`
is SLURM's; another scheduler (PBS, Flux) is one more module with a subclass registered in
:data:`SCHEDULERS` (see docs/architecture.md).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hfhpc.errors import HfhpcError, SlurmError, UsageError
from hfhpc.preflight import check_before_start
from hfhpc.run.jobfile import COMPLETE, JobFile, fresh_run_dir, moved_to, prepare_run_dir, rerun_state, resolve_job
from hfhpc.run.paths import RunDir
from hfhpc.spec import JobSpec
from hfhpc.atomic import atomic_write_text

if TYPE_CHECKING:
    from hfhpc.launch.jobs import JobRecord
    from hfhpc.scheduler.partitions import Request


@dataclass(frozen=True)
class SchedulerState:
    """A scheduler's view of one job."""

    state: str  # the scheduler's state word: PENDING, RUNNING, COMPLETED, …
    reason: str | None = None  # why a job is pending, the scheduler's code
    exit_code: str | None = None
    elapsed_s: int | None = None
    time_limit_s: int | None = None
    nodelist: str | None = None
    restarts: int | None = None
    work_dir: str | None = None  # where the job was submitted from: hfhpc's run folder
    name: str | None = None


class Executor(ABC):
    """``resolve`` pins the job to a folder, ``check`` says what that folder holds, ``prepare`` does
    both and writes it; ``start`` runs or submits it and returns an exit code or job record."""

    name = ""
    command = "hfhpc run"  # what a user types to start a job with this executor

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = env  # the environment of the scheduler's commands (None: this process's)

    def resolve(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        check_before_start(spec)
        job = resolve_job(spec, store)
        if fresh:
            job = moved_to(job, fresh_run_dir(job.run_dir))
        return job

    def check(self, job: JobFile) -> str:
        """The folder's state (new, resume or complete); raises when it holds another job."""
        return rerun_state(job, f"{self.command} {job.spec_path or 'SPEC'}")

    def prepare(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        """Resolve, check and write the run folder (a complete run's folder is left as it is)."""
        job = self.resolve(spec, store, fresh=fresh)
        if self.check(job) != COMPLETE:
            prepare_run_dir(job)
        return job

    @abstractmethod
    def start(self, job: JobFile): ...

    def script(self, job: JobFile) -> str | None:
        """The batch script of ``job``; None for an executor that needs none."""
        return None

    def query(self, job_ids: Iterable[str]) -> dict[str, SchedulerState]:
        """The scheduler's view of each job it knows (a job it has forgotten is absent)."""
        return {}

    def cancel(self, job_id: str) -> None:
        raise UsageError(f"{self.name} jobs are not queued: there is nothing to cancel",
                         "stop a local run with Ctrl-C (it checkpoints first)")

    def cluster(self) -> str | None:
        """The name of the cluster the commands talk to (jobs of other clusters are not theirs)."""
        return None

    def log_path(self, run_dir: Path, job_id: str | None, name: str) -> Path | None:
        """The job's log; without an id, the newest log of the run folder."""
        candidates = [p for p in RunDir(run_dir).logs.glob("*.out") if p.is_file()]
        return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


class LocalExecutor(Executor):
    """``hfhpc run``: this machine, now, sealed; output on the terminal and in ``logs/``."""

    name = "local"

    def start(self, job: JobFile) -> int:
        from hfhpc.launch.node import run_node

        return run_node(job.run_dir, local=True, tee=job.paths.local_log())


class BatchScheduler(Executor):
    """A queue: ``start`` submits the job's script and remembers the job (``hfhpc status``)."""

    script_name = "job.sh"
    command = "hfhpc submit"

    def prepare(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        # start() creates the run folder itself, after refusing a run that is still queued.
        job = self.resolve(spec, store, fresh=fresh)
        self.check(job)
        return job

    @abstractmethod
    def script(self, job: JobFile) -> str: ...

    @abstractmethod
    def submit_script(self, path: Path, cwd: Path) -> str:
        """Submit the script at ``path`` from ``cwd``; return the job id."""

    @abstractmethod
    def check_fits(self, job: JobFile) -> None:
        """Raise :class:`~hfhpc.scheduler.partitions.JobCannotRunError` for a request that can
        never run where it is sent."""

    def start(self, job: JobFile) -> JobRecord:
        """Write ``RUN_DIR/job.json`` and the script, submit from the run folder, remember the job.

        Refuses a job that can never start, and one whose run folder has a job still queued or
        running: two jobs would write the same checkpoints.
        """
        from hfhpc.launch.jobs import JobRecord, remember

        script = self.script(job)  # a spec that cannot be rendered fails before anything is written
        self.check_fits(job)
        self._refuse_if_active(job.run_dir)
        prepare_run_dir(job)
        path = job.run_dir / self.script_name
        atomic_write_text(path, script)
        path.chmod(0o755)
        job_id = self.submit_script(path, job.run_dir)
        record = JobRecord.of(job_id, job, scheduler=self.name, cluster=self.cluster())
        remember(record)
        return record

    def _refuse_if_active(self, run_dir: Path) -> None:
        from hfhpc.launch.jobs import ACTIVE_STATES, latest_job_id, list_jobs

        job_id = latest_job_id(run_dir, list_jobs())
        if job_id is None:
            return
        state = self.query([job_id]).get(job_id)
        if state is not None and state.state in ACTIVE_STATES:
            raise HfhpcError(f"job {job_id} of {run_dir} is still {state.state}",
                             f"cancel it with `hfhpc cancel {job_id}`, or give the spec another output_dir")


class SlurmExecutor(BatchScheduler):
    """SLURM: ``job.sbatch`` (:mod:`hfhpc.launch.sbatch`) through ``sbatch``, ``scontrol``, ``sacct``,
    ``sinfo`` and ``scancel`` (:mod:`hfhpc.launch.slurm`)."""

    name = "slurm"

    script_name = RunDir.SBATCH

    def script(self, job: JobFile) -> str:
        from hfhpc.launch.sbatch import render_sbatch

        return render_sbatch(job)

    def submit_script(self, path: Path, cwd: Path) -> str:
        from hfhpc.launch import slurm

        return slurm.sbatch(path, cwd=cwd, env=self.env)

    def check_fits(self, job: JobFile) -> None:
        from hfhpc.launch import slurm
        from hfhpc.scheduler.partitions import SINFO_ARGS, check_request, parse_sinfo

        try:
            text = slurm.run_slurm(list(SINFO_ARGS), env=self.env) or ""
        except SlurmError:
            return  # no verdict without sinfo: sbatch says what it thinks
        check_request(slurm_request(job), parse_sinfo(text), self.partitions(job))

    def partitions(self, job: JobFile) -> list[str] | None:
        """The partitions the job goes to, as sbatch will read them: ``SBATCH_PARTITION`` wins over
        the script's lines, the last ``--partition`` line over earlier ones. None: the default."""
        from hfhpc import env as hfenv

        environ = os.environ if self.env is None else self.env
        value = job.spec.resources.partition
        for line in job.spec.resources.extra_sbatch:
            if line.startswith("--partition="):
                value = line.removeprefix("--partition=")
        value = environ.get(hfenv.SBATCH_PARTITION) or value
        return [p for p in value.split(",") if p] if value else None

    def query(self, job_ids: Iterable[str]) -> dict[str, SchedulerState]:
        """Accounting for all (one ``sacct``), the controller for live jobs and the ones accounting
        does not know yet (``scontrol``: fresher, and it knows restarts and pending reasons)."""
        from hfhpc.launch import slurm
        from hfhpc.launch.jobs import ACTIVE_STATES

        ids = list(dict.fromkeys(str(j) for j in job_ids))
        try:
            accounted = slurm.sacct_info(ids, env=self.env) if len(ids) > 1 else {}
        except SlurmError:
            accounted = {}  # accounting is off on this cluster: the controller is the only source
        states: dict[str, SchedulerState] = {}
        for job_id in ids:
            rec = accounted.get(job_id)
            if rec is not None and rec.state not in ACTIVE_STATES:
                states[job_id] = _from_sacct(rec)
                continue
            info = slurm.scontrol_show_job(job_id, env=self.env)
            if info is not None:
                states[job_id] = _from_scontrol(info)
                continue
            if rec is None and len(ids) == 1:
                try:
                    rec = slurm.sacct_info([job_id], env=self.env).get(job_id)
                except SlurmError:
                    rec = None
            if rec is not None:
                states[job_id] = _from_sacct(rec)
        return states

    def cancel(self, job_id: str) -> None:
        from hfhpc.launch import slurm

        slurm.scancel(job_id, env=self.env)

    def cluster(self) -> str | None:
        from hfhpc.launch import slurm

        try:
            return slurm.cluster_name(env=self.env)
        except SlurmError:
            return None

    def log_path(self, run_dir: Path, job_id: str | None, name: str) -> Path | None:
        """``logs/<name>-<id>.out`` (the script's ``--output``); without an id, the newest log."""
        if job_id is None:
            return super().log_path(run_dir, job_id, name)
        logs = RunDir(run_dir).logs
        exact = RunDir(run_dir).slurm_log(name, job_id)
        if exact.exists():
            return exact
        matches = sorted(logs.glob(f"*-{job_id}.out"))
        return matches[-1] if matches else exact


def slurm_request(job: JobFile) -> Request:
    """What ``job.sbatch`` asks of every node, in the numbers ``sinfo`` reports."""
    from hfhpc.launch.sbatch import mem_gb
    from hfhpc.scheduler.partitions import Request

    res = job.spec.resources
    return Request(nodes=res.nodes, cpus_per_node=res.cpus_per_gpu * res.procs, mem_mb=mem_gb(job) * 1024,
                   gpus_per_node=res.gpus_per_node, gpu_type=res.gpu_type, time_s=res.time_s)


def _from_scontrol(info: Mapping[str, str]) -> SchedulerState:
    from hfhpc.launch import slurm

    restarts = info.get("Restarts", "")
    return SchedulerState(
        state=info.get("JobState", "UNKNOWN"), reason=None if info.get("Reason") in (None, "None") else info["Reason"],
        exit_code=info.get("ExitCode"), elapsed_s=slurm.parse_duration(info.get("RunTime", "")),
        time_limit_s=slurm.parse_duration(info.get("TimeLimit", "")), nodelist=info.get("NodeList") or None,
        restarts=int(restarts) if restarts.isdigit() else None, work_dir=info.get("WorkDir") or None,
        name=info.get("JobName"),
    )


def _from_sacct(rec) -> SchedulerState:
    return SchedulerState(state=rec.state, exit_code=rec.exit_code, elapsed_s=rec.elapsed_s,
                          time_limit_s=rec.time_limit_s, nodelist=rec.nodelist, work_dir=rec.work_dir, name=rec.name)


# Every batch scheduler hfhpc can submit to, by the name job records carry.
SCHEDULERS: dict[str, type[BatchScheduler]] = {"slurm": SlurmExecutor}
DEFAULT_SCHEDULER = "slurm"


def scheduler(name: str | None = None, env: Mapping[str, str] | None = None) -> BatchScheduler:
    """The executor of the scheduler ``name`` (default: SLURM)."""
    try:
        return SCHEDULERS[name or DEFAULT_SCHEDULER](env)
    except KeyError:
        raise UsageError(f"unknown scheduler {name!r}", f"one of: {', '.join(SCHEDULERS)}") from None
