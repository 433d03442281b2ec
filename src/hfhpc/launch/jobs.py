"""Submitted jobs: submit, remember, and report progress against the time limit.

Every submission is appended to ``state_dir()/jobs.jsonl``, so ``hfhpc status`` knows a job's run
folder long after SLURM has forgotten the job. A job's status joins three sources: the controller
(``scontrol``, fresh, but it forgets finished jobs after a few minutes), accounting (``sacct``,
which keeps them but lags a few seconds behind) and the run folder's ``metrics.jsonl`` (the step,
loss and throughput the recipe logs).
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

from hfhpc import env as hfenv
from hfhpc.errors import HfhpcError, SlurmError, UsageError
from hfhpc.launch import slurm
from hfhpc.launch.jobfile import JOB_FILE, JobFile, prepare_run_dir
from hfhpc.launch.sbatch import LOG_DIR, SCRIPT_NAME, render_sbatch
from hfhpc import slurmtime
from hfhpc.store.atomic import atomic_write_text

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

    @classmethod
    def of(cls, job_id: str, job: JobFile) -> JobRecord:
        res = job.spec.resources
        return cls(job_id=job_id, name=job.spec.name, run_dir=str(job.run_dir), spec_path=job.spec_path,
                   submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), nodes=res.nodes,
                   gpus_per_node=res.gpus_per_node, procs_per_node=res.procs, time_limit=res.time)

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


# -- submitting -------------------------------------------------------------------------------

def submit(job: JobFile, *, env: Mapping[str, str] | None = None) -> JobRecord:
    """Write ``RUN_DIR/job.json`` and ``RUN_DIR/job.sbatch``, submit from the run folder, remember.

    Refuses while an earlier job of the same run folder is still queued or running: two jobs
    would write the same checkpoints.
    """
    script = render_sbatch(job)  # a spec that cannot be rendered fails before anything is written
    _refuse_if_active(job.run_dir, env)
    prepare_run_dir(job)
    path = job.run_dir / SCRIPT_NAME
    atomic_write_text(path, script)
    path.chmod(0o755)
    job_id = slurm.sbatch(path, cwd=job.run_dir, env=env)
    record = JobRecord.of(job_id, job)
    remember(record)
    return record


def _refuse_if_active(run_dir: Path, env: Mapping[str, str] | None) -> None:
    job_id = _latest_job_id(run_dir, list_jobs())
    if job_id is None:
        return
    state = slurm.squeue_state(job_id, env=env)
    if state is not None and state in ACTIVE_STATES:
        raise HfhpcError(f"job {job_id} of {run_dir} is still {state}",
                         f"cancel it with `hfhpc cancel {job_id}`, or give the spec another output_dir")


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
    max_steps = _number(data.get("max_steps"))
    return Progress(
        step=int(data["step"]), max_steps=int(max_steps) if max_steps is not None else None,
        epoch=_number(data.get("epoch")), loss=_number(data.get("loss")),
        learning_rate=_number(data.get("learning_rate")), tokens_per_s=_number(data.get("tokens_per_s")),
        elapsed_s=_number(data.get("elapsed_s")), step_s=_number(data.get("step_s")),
    )


# -- status -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobStatus:
    job_id: str | None  # None: a run folder that was never submitted (``hfhpc run``)
    name: str
    run_dir: Path | None
    state: str  # SLURM's state word; UNKNOWN when SLURM no longer knows the job; LOCAL without one
    reason: str | None = None  # why a job is pending
    exit_code: str | None = None
    elapsed_s: int | None = None
    time_limit_s: int | None = None
    nodelist: str | None = None
    restarts: int | None = None
    progress: Progress | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

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

    @property
    def log_path(self) -> Path | None:
        return log_path(self.run_dir, self.job_id, self.name) if self.run_dir else None


def log_path(run_dir: Path, job_id: str | None, name: str) -> Path | None:
    """The job's log, ``logs/<name>-<id>.out``; without an id, the newest log of the run folder."""
    logs = Path(run_dir) / LOG_DIR
    if job_id is not None:
        exact = logs / f"{name}-{job_id}.out"
        if exact.exists():
            return exact
        matches = sorted(logs.glob(f"*-{job_id}.out"))
        return matches[-1] if matches else exact
    candidates = [p for p in logs.glob("*.out") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _from_scontrol(info: Mapping[str, str]) -> dict:
    restarts = info.get("Restarts", "")
    return dict(
        state=info.get("JobState", "UNKNOWN"), reason=None if info.get("Reason") in (None, "None") else info["Reason"],
        exit_code=info.get("ExitCode"), elapsed_s=slurm.parse_duration(info.get("RunTime", "")),
        time_limit_s=slurm.parse_duration(info.get("TimeLimit", "")), nodelist=info.get("NodeList") or None,
        restarts=int(restarts) if restarts.isdigit() else None,
    )


def _from_sacct(rec: slurm.SacctRecord) -> dict:
    return dict(state=rec.state, exit_code=rec.exit_code, elapsed_s=rec.elapsed_s,
                time_limit_s=rec.time_limit_s, nodelist=rec.nodelist)


def _slurm_fields(job_id: str, env: Mapping[str, str] | None) -> tuple[dict, str | None]:
    """SLURM's view of one job and its working folder: the controller first (fresh), then
    accounting (it keeps finished jobs)."""
    info = slurm.scontrol_show_job(job_id, env=env)
    if info is not None:
        return _from_scontrol(info), info.get("WorkDir")
    try:
        rec = slurm.sacct_info([job_id], env=env).get(job_id)
    except SlurmError:
        rec = None  # accounting is off on this cluster: the controller was the only source
    if rec is None:
        return {"state": "UNKNOWN"}, None
    return _from_sacct(rec), rec.work_dir


def _latest_job_id(run_dir: Path, records: list[JobRecord]) -> str | None:
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
    job_id = _latest_job_id(run_dir, records)
    record = next((r for r in reversed(records) if r.job_id == job_id), None)
    return job_id, run_dir, record


def job_status(ref: str, *, env: Mapping[str, str] | None = None) -> JobStatus:
    """Status of a job given by id or run folder: SLURM's state, time used and left, progress."""
    job_id, run_dir, record = resolve_ref(ref)
    if job_id is None:
        assert run_dir is not None
        return JobStatus(None, _name_of(run_dir) or run_dir.name, run_dir, "LOCAL", progress=read_progress(run_dir))
    fields, work_dir = _slurm_fields(job_id, env)
    if run_dir is None and work_dir and (Path(work_dir) / JOB_FILE).is_file():
        run_dir = Path(work_dir)
    if record is None and run_dir is None and fields["state"] == "UNKNOWN":
        raise HfhpcError(f"job {job_id} is unknown to SLURM and was not submitted by hfhpc here",
                         "run `hfhpc status` to list submitted jobs")
    if fields.get("time_limit_s") is None and record is not None:
        fields["time_limit_s"] = record.time_limit_s
    name = record.name if record else (_name_of(run_dir) or "?")
    progress = read_progress(run_dir) if run_dir else None
    return JobStatus(job_id, name, run_dir, progress=progress, **fields)


def job_statuses(records: list[JobRecord], *, env: Mapping[str, str] | None = None) -> list[JobStatus]:
    """Statuses of many remembered jobs with one ``sacct`` call (plus ``scontrol`` for the jobs
    accounting does not know yet)."""
    try:
        accounted = slurm.sacct_info([r.job_id for r in records], env=env)
    except SlurmError:
        accounted = {}
    statuses = []
    for r in records:
        rec = accounted.get(r.job_id)
        if rec is not None and rec.state not in ACTIVE_STATES:
            fields = _from_sacct(rec)
        else:
            # Live jobs from the controller: fresher than accounting, and it knows restarts.
            fields, _ = _slurm_fields(r.job_id, env)
        if fields.get("time_limit_s") is None:
            fields["time_limit_s"] = r.time_limit_s
        statuses.append(JobStatus(r.job_id, r.name, Path(r.run_dir), progress=read_progress(Path(r.run_dir)), **fields))
    return statuses


def cancel(ref: str, *, env: Mapping[str, str] | None = None) -> str:
    """Cancel the job given by id or run folder; return its id."""
    job_id, run_dir, _ = resolve_ref(ref)
    if job_id is None:
        raise UsageError(f"no SLURM job is known for {run_dir}", "give the job id (see `hfhpc status`)")
    slurm.scancel(job_id, env=env)
    return job_id


# -- logs -------------------------------------------------------------------------------------

def follow_log(status: JobStatus, *, poll_s: float = 1.0, check_every_s: float = 5.0,
               env: Mapping[str, str] | None = None) -> Iterator[bytes]:
    """The job's log as it grows, until the job has ended (a requeued job keeps appending to the
    same file, so following goes on through requeues). Without a job id, until interrupted."""
    path = status.log_path
    if path is None:
        raise HfhpcError(f"{status.run_dir} has no log yet", "start the job with `hfhpc submit` or `hfhpc run`")
    offset, next_check = 0, 0.0
    while True:
        chunk = _read_from(path, offset)
        offset += len(chunk)
        if chunk:
            yield chunk
        now = time.monotonic()
        if status.job_id is not None and now >= next_check:
            next_check = now + check_every_s
            state = slurm.squeue_state(status.job_id, env=env)
            if state is None or state not in ACTIVE_STATES:
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
