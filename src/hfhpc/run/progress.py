"""A run's progress, read from ``metrics.jsonl``, and the one forecast of how many allocations it needs.

``hfhpc status`` (a job against SLURM's clock), ``hfhpc report`` (a run folder) and ``hfhpc plan``
(a spec before it runs) all ask the same question: with this much training left, this much time
left in the current allocation and this time limit per allocation, how many more allocations
(requeues) does the run need? :func:`allocations_left` is the only answer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from hfhpc.run.paths import RunDir

# Launch, model load and resume of a requeued allocation, when nothing better is known (assumed).
DEFAULT_RESTART_S = 300.0
_TAIL_BLOCK = 8192
_TAIL_MAX = 1 << 20  # a metrics line is ~300 bytes: 1 MiB of garbage means there is no good line


# -- metrics.jsonl ----------------------------------------------------------------------------

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


def _json_object(line: bytes | str) -> dict | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of ``metrics.jsonl`` that is a JSON object with a ``step``; a line cut short by a
    writer is skipped."""
    try:
        text = RunDir(run_dir).metrics.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        value = _json_object(line)
        if value is not None and _number(value.get("step")) is not None:
            rows.append(value)
    return rows


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


def read_progress(run_dir: Path) -> Progress | None:
    data = last_json_line(RunDir(run_dir).metrics)
    if data is None or _number(data.get("step")) is None:
        return None
    missing = tuple(k for k in ("loss", "tokens_per_s") if _number(data.get(k)) is None)
    if missing:
        data = {**data, **_last_logged(run_dir, missing)}
    max_steps = _number(data.get("max_steps"))
    return Progress(
        step=int(data["step"]), max_steps=int(max_steps) if max_steps is not None else None,
        epoch=_number(data.get("epoch")), loss=_number(data.get("loss")),
        learning_rate=_number(data.get("learning_rate")), tokens_per_s=_number(data.get("tokens_per_s")),
        elapsed_s=_number(data.get("elapsed_s")), step_s=_number(data.get("step_s")),
    )


def _last_logged(run_dir: Path, keys: tuple[str, ...]) -> dict:
    """The newest value of each of ``keys`` in ``metrics.jsonl``. The last line of a finished run is
    the Trainer's summary or an evaluation, which log neither the training loss nor a throughput, so
    reading the whole file is needed only then."""
    found: dict = {}
    for row in read_metrics(run_dir):
        found.update({k: row[k] for k in keys if _number(row.get(k)) is not None})
    return found


# -- allocations --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocations:
    """The forecast: ``more`` allocations after the current one (0: it finishes in this one;
    None: a requeued allocation has no time left to train, so it never finishes)."""

    work_s: float  # training (and saving) left
    time_left_s: float  # usable in the current allocation
    per_allocation_s: float  # usable in each further one
    more: int | None


def allocations_left(work_s: float, *, time_limit_s: float, used_s: float = 0.0, signal_delay_s: float = 0.0,
                     restart_s: float = DEFAULT_RESTART_S) -> Allocations:
    """How many more allocations ``work_s`` seconds of training need.

    The current allocation has ``time_limit_s - used_s`` left and stops ``signal_delay_s`` before its
    limit to checkpoint; every further one spends ``restart_s`` starting and resuming, then trains
    until its own warning.
    """
    time_left = max(0.0, time_limit_s - used_s - signal_delay_s)
    per_allocation = time_limit_s - signal_delay_s - restart_s
    if work_s <= time_left:
        return Allocations(work_s, time_left, per_allocation, 0)
    if per_allocation <= 0:
        return Allocations(work_s, time_left, per_allocation, None)
    return Allocations(work_s, time_left, per_allocation, math.ceil((work_s - time_left) / per_allocation))


def forecast(run_dir: Path | None, progress: Progress | None, *, time_limit_s: float | None, used_s: float | None) -> Allocations | None:
    """:func:`allocations_left` for the run in ``run_dir``: its training left (``progress``), its
    time limit, the time ``used_s`` in the current allocation and the warning lead time its job file
    records. None without an ETA or a limit."""
    eta = progress.eta_s if progress is not None else None
    if eta is None or not time_limit_s:
        return None
    from hfhpc.run.jobfile import warning_s_of

    delay = warning_s_of(run_dir) if run_dir is not None else 0.0
    return allocations_left(eta, time_limit_s=time_limit_s, used_s=used_s or 0.0, signal_delay_s=delay)
