"""Submitted jobs: remember them, and report their progress against the time limit.

Every submission is appended to ``state_dir()/jobs.jsonl``, so ``hfhpc status`` knows a job's run
folder long after the scheduler has forgotten the job. A job's status joins the scheduler's view
(:meth:`hfhpc.launch.executor.Executor.query`: for SLURM the controller, fresh, and accounting,
which keeps finished jobs) with the run folder's ``metrics.jsonl`` (the step, loss and throughput
the recipe logs). The executors submit; this module only reads and remembers.
"""

from __future__ import annotations

import json
import math
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
from hfhpc.launch.executor import LOG_DIR
from hfhpc.launch.jobfile import JOB_FILE, JobFile
from hfhpc import slurmtime

if TYPE_CHECKING:
    from hfhpc.launch.executor import Executor, SchedulerState
    from hfhpc.scheduler.reasons import PendingReason

JOBS_FILE = "jobs.jsonl"
METRICS_FILE = "metrics.jsonl"
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})
_TAIL_BLOCK = 8192
_TAIL_MAX = 1 << 20  # a metrics line is ~300 bytes: 1 MiB of garbage means there is no good line


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


# -- progress ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """The last line of ``metrics.jsonl``."""

    step: int
    max_steps: int | None
    epoch: float | None
    loss: float | None
    learning_rate: float | None
    tokens_per_s: float | None
    elapsed_s: float | None
    step_s: float | None  # seconds per step in this allocation

    @property
    def seconds_per_step(self) -> float | None:
        # step_s is measured within the current allocation; elapsed_s restarts at 0 after a
        # requeue while step does not, so elapsed/step is only a fallback.
        if self.step_s:
            return self.step_s
        if self.elapsed_s and self.step > 0:
            return self.elapsed_s / self.step
        return None

    @property
    def eta_s(self) -> float | None:
        """Seconds of training left: (max_steps - step) × seconds per step."""
        per_step = self.seconds_per_step
        if not self.max_steps or self.max_steps <= 0 or per_step is None:
            return None
        return max(0, self.max_steps - self.step) * per_step


def last_json_line(path: Path) -> dict | None:
    """The last line of a JSON-lines file that parses as an object, read from the end.

    A writer may be in the middle of a line (no newline yet, or half an object): that line is
    skipped and the one before it returned.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, buf = end, b""
        while pos > 0 and end - pos < _TAIL_MAX:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            lines = buf.split(b"\n")
            # Unless the file's start is reached, the first piece may be the tail of a longer line.
            candidates = lines if pos == 0 else lines[1:]
            for line in reversed(candidates):
                found = _json_object(line)
                if found is not None:
                    return found
    return None


def _json_object(line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_progress(run_dir: Path) -> Progress | None:
    data = last_json_line(Path(run_dir) / METRICS_FILE)
    if data is None or _number(data.get("step")) is None:
        return None
    missing = tuple(k for k in ("loss", "tokens_per_s") if _number(data.get(k)) is None)
    if missing:
        data = {**data, **_last_logged(Path(run_dir) / METRICS_FILE, missing)}
    max_steps = _number(data.get("max_steps"))
    return Progress(
        step=int(data["step"]), max_steps=int(max_steps) if max_steps is not None else None,
        epoch=_number(data.get("epoch")), loss=_number(data.get("loss")),
        learning_rate=_number(data.get("learning_rate")), tokens_per_s=_number(data.get("tokens_per_s")),
        elapsed_s=_number(data.get("elapsed_s")), step_s=_number(data.get("step_s")),
    )


def _last_logged(path: Path, keys: tuple[str, ...]) -> dict:
    """The newest value of each of ``keys`` in the file. The last line of a finished run is the
    Trainer's summary or an evaluation, which log neither the training loss nor a throughput, so
    reading the whole file is needed only then."""
    from hfhpc.report import read_metrics

    found: dict = {}
    for row in read_metrics(path):
        found.update({k: row[k] for k in keys if _number(row.get(k)) is not None})
    return found


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
    def allocations_needed(self) -> int | None:
        """More allocations (requeues) needed after this one to reach max_steps, if any."""
        eta, left, limit = self.eta_s, self.remaining_s, self.time_limit_s
        if eta is None or left is None or not limit or eta <= left:
            return None
        return math.ceil((eta - left) / limit)


def latest_job_id(run_dir: Path, records: list[JobRecord]) -> str | None:
    """The newest job of a run folder: remembered, or resubmitted by hand (``sbatch job.sbatch``),
    which only its log names. Job ids grow, so the largest is the newest."""
    ids = {r.job_id for r in records if Path(r.run_dir) == run_dir}
    name = _name_of(run_dir)
    # Batch logs are <job name>-<id>.out (#SBATCH --output); `hfhpc run` writes others there.
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.out") if name else None
    for log in (Path(run_dir) / LOG_DIR).glob("*.out"):
        m = pattern.fullmatch(log.name) if pattern else None
        if m:
            ids.add(m.group(1))
    return max(ids, key=int) if ids else None


def _name_of(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    try:
        return json.loads((run_dir / JOB_FILE).read_text())["spec"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_ref(ref: str) -> tuple[str | None, Path | None, JobRecord | None]:
    """A job id or a run folder → (job id, run folder, remembered record), as far as known."""
    records = list_jobs()
    if ref.isdigit():
        record = next((r for r in reversed(records) if r.job_id == ref), None)
        return ref, Path(record.run_dir) if record else None, record
    run_dir = Path(ref).expanduser().absolute()
    if not (run_dir / JOB_FILE).is_file():
        raise UsageError(f"{ref!r} is neither a job id nor a run folder (no {JOB_FILE} there)",
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
    if run_dir is None and found is not None and found.work_dir and (Path(found.work_dir) / JOB_FILE).is_file():
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
