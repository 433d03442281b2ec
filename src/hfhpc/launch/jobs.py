"""Submitted jobs: remember them, and report their progress against the time limit.

Every submission is appended to ``state_dir()/jobs.jsonl``, so ``hfhpc status`` knows a job's run
folder long after the scheduler has forgotten the job. A job's status joins the scheduler's view
(:meth:`hfhpc.launch.executor.Executor.query`: for SLURM the controller, fresh, and accounting,
which keeps finished jobs) with the run folder's ``metrics.jsonl`` (the step, loss and throughput
the recipe logs). The executors submit; this module only reads and remembers.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from hfhpc import env as hfenv
from hfhpc.errors import HfhpcError, UsageError
from hfhpc import slurmtime
from hfhpc.run.jobfile import JobFile
from hfhpc.run.paths import RunDir
from hfhpc.run.progress import Allocations, Progress, forecast, read_progress

if TYPE_CHECKING:
    from hfhpc.launch.executor import Executor, SchedulerState
    from hfhpc.scheduler.reasons import PendingReason

JOBS_FILE = "jobs.jsonl"
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})


@dataclass(frozen=True)
class JobRecord:
    """One line of ``jobs.jsonl``: what was submitted, where, with which request."""

    job_id: str
    name: str
    run_dir: str
    spec_path: str | None
    submitted_at: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    time_limit: str
    scheduler: str = "slurm"  # the executor that submitted it (hfhpc.launch.executor.SCHEDULERS)
    cluster: str | None = None  # the scheduler's cluster name: job ids are unique within one only

    @classmethod
    def of(cls, job_id: str, job: JobFile, *, scheduler: str = "slurm", cluster: str | None = None) -> JobRecord:
        res = job.spec.resources
        return cls(job_id=job_id, name=job.spec.name, run_dir=str(job.run_dir), spec_path=job.spec_path,
                   submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), nodes=res.nodes,
                   gpus_per_node=res.gpus_per_node, procs_per_node=res.procs, time_limit=res.time,
                   scheduler=scheduler, cluster=cluster)

    @property
    def time_limit_s(self) -> int:
        return slurmtime.parse(self.time_limit)


# -- remembering ------------------------------------------------------------------------------

def jobs_file(environ: Mapping[str, str] = os.environ) -> Path:
    return hfenv.state_dir(environ) / JOBS_FILE


def remember(record: JobRecord) -> Path:
    """Append ``record``. One ``write`` of one line to an ``O_APPEND`` file: concurrent submits
    never interleave within a line on a local disk."""
    path = jobs_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(record)) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer killed mid-line: do not glue this record to its remains
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def list_jobs() -> list[JobRecord]:
    """Remembered jobs, oldest first; a job id submitted twice (ids repeat on a rebuilt cluster)
    keeps its latest record. Lines that do not parse (a write cut short) are skipped."""
    try:
        text = jobs_file().read_text()
    except FileNotFoundError:
        return []
    records: dict[str, JobRecord] = {}
    for line in text.splitlines():
        try:
            record = JobRecord(**json.loads(line))
        except (ValueError, TypeError):
            continue
        records.pop(record.job_id, None)
        records[record.job_id] = record
    return list(records.values())


# -- status -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobStatus:
    job_id: str | None  # None: a run folder that was never submitted (``hfhpc run``)
    name: str
    run_dir: Path | None
    state: str  # the scheduler's state word; UNKNOWN when it no longer knows the job; LOCAL without one
    reason: str | None = None  # why a job is pending: the scheduler's code (see pending_reason)
    exit_code: str | None = None
    elapsed_s: int | None = None
    time_limit_s: int | None = None
    nodelist: str | None = None
    restarts: int | None = None
    progress: Progress | None = None
    log_path: Path | None = None  # the executor's answer: where the job writes its output

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def pending_reason(self) -> PendingReason | None:
        """Why the job waits, in words (None while it runs or once it ended)."""
        if not self.active or self.state == "RUNNING":
            return None
        from hfhpc.scheduler.reasons import explain

        return explain(self.reason)

    @property
    def remaining_s(self) -> int | None:
        """Seconds left in the current allocation (all of it while pending)."""
        if self.time_limit_s is None or not self.active:
            return None
        used = self.elapsed_s if self.state != "PENDING" and self.elapsed_s else 0
        return max(0, self.time_limit_s - used)

    @property
    def eta_s(self) -> float | None:
        return self.progress.eta_s if self.progress and self.active else None

    @property
    def forecast(self) -> Allocations | None:
        """Allocations left for an active job (:func:`hfhpc.run.progress.forecast`, as ``hfhpc report``'s)."""
        if self.eta_s is None or self.remaining_s is None:
            return None
        used = self.elapsed_s if self.state != "PENDING" else 0
        return forecast(self.run_dir, self.progress, time_limit_s=self.time_limit_s, used_s=used)

    @property
    def allocations_needed(self) -> int | None:
        """More allocations (requeues) needed after this one to reach max_steps, if any."""
        found = self.forecast
        return found.more if found is not None and found.more else None


def latest_job_id(run_dir: Path, records: list[JobRecord]) -> str | None:
    """The newest job of a run folder: remembered, or resubmitted by hand (``sbatch job.sbatch``),
    which only its log names. Job ids grow, so the largest is the newest."""
    ids = {r.job_id for r in records if Path(r.run_dir) == run_dir}
    name = _name_of(run_dir)
    # Batch logs are <job name>-<id>.out (#SBATCH --output); `hfhpc run` writes others there.
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.out") if name else None
    for log in RunDir(run_dir).logs.glob("*.out"):
        m = pattern.fullmatch(log.name) if pattern else None
        if m:
            ids.add(m.group(1))
    return max(ids, key=int) if ids else None


def _name_of(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    try:
        return json.loads(RunDir(run_dir).job_file.read_text())["spec"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_ref(ref: str) -> tuple[str | None, Path | None, JobRecord | None]:
    """A job id or a run folder → (job id, run folder, remembered record), as far as known."""
    records = list_jobs()
    if ref.isdigit():
        record = next((r for r in reversed(records) if r.job_id == ref), None)
        return ref, Path(record.run_dir) if record else None, record
    run_dir = Path(ref).expanduser().absolute()
    if not RunDir(run_dir).job_file.is_file():
        raise UsageError(f"{ref!r} is neither a job id nor a run folder (no {RunDir.JOB} there)",
                         "run `hfhpc status` to list submitted jobs")
    job_id = latest_job_id(run_dir, records)
    record = next((r for r in reversed(records) if r.job_id == job_id), None)
    return job_id, run_dir, record


def _same_folder(a: str | Path, b: str | Path) -> bool:
    # The scheduler records the submitting process's working folder with links resolved.
    return os.path.realpath(a) == os.path.realpath(b)


def _fields(found: SchedulerState | None, run_dir: Path | None) -> dict:
    """JobStatus fields from the scheduler's view. A job of another folder under the same id (ids
    start again on a rebuilt cluster) is not this job: for it the scheduler knows nothing."""
    if found is None or (run_dir is not None and found.work_dir and not _same_folder(found.work_dir, run_dir)):
        return {"state": "UNKNOWN"}
    return dict(state=found.state, reason=found.reason, exit_code=found.exit_code, elapsed_s=found.elapsed_s,
                time_limit_s=found.time_limit_s, nodelist=found.nodelist, restarts=found.restarts)


def job_status(ref: str, executor: Executor | None = None) -> JobStatus:
    """Status of a job given by id or run folder: the scheduler's state, time used and left, progress."""
    from hfhpc.launch.executor import LocalExecutor, scheduler

    job_id, run_dir, record = resolve_ref(ref)
    if job_id is None:
        assert run_dir is not None
        name = _name_of(run_dir) or run_dir.name
        return JobStatus(None, name, run_dir, "LOCAL", progress=read_progress(run_dir),
                         log_path=LocalExecutor().log_path(run_dir, None, name))
    executor = executor or scheduler(record.scheduler if record else None)
    found = executor.query([job_id]).get(job_id)
    if run_dir is None and found is not None and found.work_dir and RunDir(found.work_dir).job_file.is_file():
        run_dir = Path(found.work_dir)
    fields = _fields(found, run_dir)
    if record is None and run_dir is None and fields["state"] == "UNKNOWN":
        raise HfhpcError(f"job {job_id} is unknown to {executor.name.upper()} and was not submitted by hfhpc here",
                         "run `hfhpc status` to list submitted jobs")
    if fields.get("time_limit_s") is None and record is not None:
        fields["time_limit_s"] = record.time_limit_s
    name = record.name if record else (_name_of(run_dir) or "?")
    return JobStatus(job_id, name, run_dir, progress=read_progress(run_dir) if run_dir else None,
                     log_path=executor.log_path(run_dir, job_id, name) if run_dir else None, **fields)


def job_statuses(records: list[JobRecord], executor: Executor | None = None) -> list[JobStatus]:
    """Statuses of many remembered jobs, with one query of each scheduler."""
    from hfhpc.launch.executor import scheduler

    executors: dict[str, Executor] = {}
    found: dict[tuple[str, str], SchedulerState] = {}
    for name in dict.fromkeys(r.scheduler for r in records):
        executors[name] = executor if executor is not None and executor.name == name else scheduler(name)
        answers = executors[name].query([r.job_id for r in records if r.scheduler == name])
        found.update({(name, job_id): state for job_id, state in answers.items()})
    statuses = []
    for r in records:
        run_dir = Path(r.run_dir)
        fields = _fields(found.get((r.scheduler, r.job_id)), run_dir)
        if fields.get("time_limit_s") is None:
            fields["time_limit_s"] = r.time_limit_s
        statuses.append(JobStatus(r.job_id, r.name, run_dir, progress=read_progress(run_dir),
                                  log_path=executors[r.scheduler].log_path(run_dir, r.job_id, r.name), **fields))
    return statuses


def jobs_of_this_cluster(records: list[JobRecord], executor: Executor) -> list[JobRecord]:
    """The records of jobs submitted to the cluster ``executor`` talks to. Job ids are unique
    within a cluster only: another cluster's job 42 is not this one's. Records from before
    hfhpc remembered the cluster are kept (nothing says they are another's)."""
    here = executor.cluster()
    if here is None:
        return records
    return [r for r in records if r.scheduler == executor.name and r.cluster in (None, here)]


def cancel(ref: str, executor: Executor | None = None) -> str:
    """Cancel the job given by id or run folder; return its id."""
    from hfhpc.launch.executor import scheduler

    job_id, run_dir, record = resolve_ref(ref)
    if job_id is None:
        raise UsageError(f"no submitted job is known for {run_dir}", "give the job id (see `hfhpc status`)")
    (executor or scheduler(record.scheduler if record else None)).cancel(job_id)
    return job_id


# -- logs -------------------------------------------------------------------------------------

def follow_log(status: JobStatus, executor: Executor | None = None, *, poll_s: float = 1.0,
               check_every_s: float = 5.0) -> Iterator[bytes]:
    """The job's log as it grows, until the job has ended (a requeued job keeps appending to the
    same file, so following goes on through requeues). Without a job id, until interrupted."""
    path = status.log_path
    if path is None:
        raise HfhpcError(f"{status.run_dir} has no log yet", "start the job with `hfhpc submit` or `hfhpc run`")
    if status.job_id is not None and executor is None:
        from hfhpc.launch.executor import scheduler

        executor = scheduler()
    offset, next_check = 0, 0.0
    while True:
        chunk = _read_from(path, offset)
        offset += len(chunk)
        if chunk:
            yield chunk
        now = time.monotonic()
        if status.job_id is not None and executor is not None and now >= next_check:
            next_check = now + check_every_s
            found = executor.query([status.job_id]).get(status.job_id)
            if found is None or found.state not in ACTIVE_STATES:
                rest = _read_from(path, offset)  # what the job wrote while it ended
                if rest:
                    yield rest
                return
        time.sleep(poll_s)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""  # a pending job has no log yet
