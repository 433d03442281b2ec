"""Checkpoints that are either complete or absent, on the shared run folder.

The Trainer writes ``checkpoint-N`` in place: a job killed mid-save (time limit, node failure, a full
disk) leaves a folder that looks like a checkpoint and is not one. Here every save goes to
``.checkpoint-N.tmp/checkpoint-N`` first; when every rank has written its part, the main process
fsyncs the files, writes the completion marker ``hfhpc-complete.json`` (step, time, each file with
its size, how long the save took), renames the folder to ``checkpoint-N`` and fsyncs the run folder.
The rename is the commit: a ``checkpoint-N`` without a valid marker, or whose files do not have the
recorded sizes, is skipped with a warning and the previous complete one is used.

Retention (``save_total_limit``) counts complete checkpoints by step, never by mtime (renamed folders
keep their children's times), and deletes a checkpoint by renaming it away first.

This module is imported on the login node too (:func:`signal_delay_hint_s` for ``hfhpc submit``):
only the standard library at import time; torch and transformers inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hfhpc import __version__
from hfhpc.errors import DiskFullError, HfhpcError
from hfhpc.store.atomic import fsync_dir

PREFIX = "checkpoint-"
MARKER = "hfhpc-complete.json"
MARKER_VERSION = 1
STAGING_SUFFIX = ".tmp"  # .checkpoint-N.tmp/checkpoint-N while it is written
TRASH_INFIX = ".deleting-"  # .checkpoint-N.deleting-<random> while it is removed

# The signal-delay hint: finishing the step in flight and saving, twice over, plus the exit and
# `scontrol requeue`; never less than a minute (SLURM's own timing is that coarse).
HINT_MARGIN = 2.0
HINT_FIXED_S = 30
HINT_FLOOR_S = 60

Warn = Callable[[str], None]


class CheckpointWriteError(HfhpcError):
    """A checkpoint could not be written; the previous complete one is untouched."""

    def __init__(self, path: str, detail: str, previous: str | None):
        self.path, self.detail, self.previous = path, detail, previous
        kept = f"the previous checkpoint {Path(previous).name} is intact" if previous else "no earlier checkpoint exists"
        super().__init__(f"writing {path} failed ({detail}); {kept}", "fix the cause and run the same command again to resume")


class CheckpointDiskFullError(DiskFullError):
    """No space (or quota) left while writing a checkpoint; the partial one was removed."""

    def __init__(self, path: str, previous: str | None):
        super().__init__(path)
        self.previous = previous
        kept = f"the previous checkpoint {Path(previous).name} is intact" if previous else "no earlier checkpoint exists"
        self.message = f"no space left on the device holding {path} while writing a checkpoint; {kept}"
        self.fix = "free space (or lower train.save_total_limit) and run the same command again to resume"


# -- reading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    marker: dict[str, Any]


def step_of(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    name = Path(path).name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder of ``run_dir``, complete or not, by step."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(run_dir):
            step = step_of(Path(entry.name))
            if step is not None and entry.is_dir(follow_symlinks=False):
                found.append((step, Path(entry.path)))
    return sorted(found)


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} (the save never finished)"
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} ({e.__class__.__name__})"
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not marker["files"]:
        return f"malformed {MARKER}"
    if marker.get("step") != step_of(path):
        return f"{MARKER} is for step {marker.get('step')}"
    for rel, size in marker["files"].items():
        try:
            actual = (path / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written"
    return None


def read_marker(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((Path(path) / MARKER).read_text())
        return marker if isinstance(marker, dict) else None
    return None


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of ``run_dir``, oldest first."""
    out = []
    for step, path in checkpoint_dirs(run_dir):
        if problem(path) is None:
            out.append(Checkpoint(path, step, read_marker(path) or {}))
    return out


def last_complete(run_dir: Path, warn: Warn | None = None) -> Checkpoint | None:
    """The newest complete checkpoint; every newer folder that is not one is named through ``warn``."""
    skipped = []
    for step, path in reversed(checkpoint_dirs(run_dir)):
        why = problem(path)
        if why is None:
            if warn:
                for name, reason in skipped:
                    warn(f"warning: skipping {name}: {reason}; resuming from {path.name} instead")
            return Checkpoint(path, step, read_marker(path) or {})
        skipped.append((path.name, why))
    if warn:
        for name, reason in skipped:
            warn(f"warning: skipping {name}: {reason}; no complete checkpoint: starting from the beginning")
    return None


def signal_delay_hint_s(run_dir: Path) -> int | None:
    """Seconds of warning before the time limit that this run needs to stop cleanly, measured.

    From the newest complete checkpoint's marker: the longest step seen before it plus the time the
    save took, doubled, plus the exit and requeue. None before the first checkpoint (use a default).
    Meant for ``hfhpc submit`` (``#SBATCH --signal=B:USR1@N``); only the standard library is used.
    """
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    m = found[-1].marker
    try:
        need = float(m.get("save_s") or 0) + float(m.get("max_step_s") or 0)
    except (TypeError, ValueError):
        return None
    if need <= 0:
        return None
    return max(HINT_FLOOR_S, math.ceil(HINT_MARGIN * need + HINT_FIXED_S))


def stopped_on_signal(run_dir: Path, *, job_id: str | None = None, restart: int = 0, since: float | None = None) -> Checkpoint | None:
    """The checkpoint a stop signal made in this launch, if the ranks wrote one.

    For the per-node agent: a launcher (torchrun, accelerate) exits 1 when its ranks exit 3, so the
    node tells "stopped after a checkpoint" (exit 3, requeue) from a failure with this. A launch is
    this SLURM job id and restart count, or, outside SLURM, anything written after ``since``
    (seconds since the epoch, same host).
    """
    found = last_complete(run_dir)
    if found is None or not found.marker.get("stop"):
        return None
    stop = found.marker["stop"]
    if job_id is not None:
        return found if (stop.get("job_id") == job_id and int(stop.get("restart", -1)) == restart) else None
    if since is not None:
        return found if float(found.marker.get("unix_time", 0)) >= since else None
    return found


# -- writing ------------------------------------------------------------------------------------

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_of(folder: Path) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    return dict(sorted(out.items()))


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def staging_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f".{PREFIX}{step}{STAGING_SUFFIX}"


def remove_dir(path: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so a crash midway leaves no half folder under its name."""
    path = Path(path)
    trash = path.with_name(f".{path.name}{TRASH_INFIX}{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(run_dir: Path, keep: Path | None = None) -> None:
    """Staging and half-deleted folders that a killed job left behind (one job writes a run folder at a time)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(run_dir):
            name = entry.name
            if not name.startswith(f".{PREFIX}") or (keep is not None and Path(entry.path) == keep):
                continue
            if name.endswith(STAGING_SUFFIX) or TRASH_INFIX in name:
                shutil.rmtree(entry.path, ignore_errors=True)


def write_marker(folder: Path, step: int, **fields: Any) -> dict[str, Any]:
    """Record every file of ``folder`` with its size, then the marker itself, fsynced."""
    now = time.time()
    marker = {
        "version": MARKER_VERSION,
        "step": step,
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "unix_time": round(now, 3),
        "host": socket.gethostname(),
        "hfhpc": __version__,
        **fields,
        "files": _files_of(folder),
    }
    path = folder / MARKER
    with open(path, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return marker


def commit(staged: Path, final: Path) -> None:
    """Make ``staged`` visible as ``final`` in one rename (replacing a stale folder of the same step)."""
    if final.exists():
        # A folder of this step from an earlier attempt (incomplete, or superseded after a resume
        # from an older checkpoint): moved aside first, since rename cannot replace a non-empty folder.
        aside = final.with_name(f".{final.name}{TRASH_INFIX}{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
        os.rename(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staged, final)
    fsync_dir(final.parent)


def apply_retention(run_dir: Path, keep: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (and ``protect``); delete older ones and every
    incomplete folder older than the newest complete one. Returns what was deleted."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return []
    protected = {Path(p).resolve() for p in protect if p}
    newest = complete[-1].step
    doomed = [c.path for c in complete[:-keep]] if keep > 0 else []
    complete_paths = {c.path for c in complete}
    doomed += [p for step, p in checkpoint_dirs(run_dir) if p not in complete_paths and step < newest]
    deleted = []
    for path in doomed:
        if path.resolve() in protected:
            continue
        remove_dir(path)
        deleted.append(path)
    return deleted


def _disk_full(error: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or a filesystem with no room left (torch.save reports
    a full disk as a RuntimeError without an errno)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        st = os.statvfs(where)
        return st.f_bavail * st.f_frsize < 1 << 20
    return False


# -- the Trainer side ---------------------------------------------------------------------------

def install(trainer, stop=None):
    """Make ``trainer`` (a transformers ``Trainer`` or subclass) save checkpoints atomically.

    Wraps the instance's ``_save_checkpoint`` (one place, whatever the Trainer subclass): the original
    writes into the staging folder, then the main process commits and applies retention, with a
    barrier before and after so that no rank runs ahead of a checkpoint that is not there yet.
    ``stop`` is the recipe's :class:`~hfhpc.recipes.common.StopOnSignal`: a checkpoint written because
    of it records the signal, so the node agent can tell a clean stop from a failure.
    """
    from transformers import TrainerCallback

    original_save = trainer._save_checkpoint
    original_output_dir = trainer._get_output_dir
    timing = {"max_step_s": 0.0, "t": None}

    class _StepTimer(TrainerCallback):
        # The longest step since the last save: a stop signal may arrive at the start of one.
        def on_step_begin(self, args, state, control, **kw):
            timing["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if timing["t"] is not None:
                timing["max_step_s"] = max(timing["max_step_s"], time.perf_counter() - timing["t"])

    trainer.add_callback(_StepTimer())

    def save_checkpoint(model, trial=None):
        args = trainer.args
        run_dir = Path(original_output_dir(trial))
        step = trainer.state.global_step
        final = run_dir / f"{PREFIX}{step}"
        staging = staging_dir(run_dir, step)
        main = args.should_save
        previous = last_complete(run_dir)
        t0 = time.perf_counter()
        if main:
            remove_leftovers(run_dir)
            staging.mkdir(parents=True)
        trainer.accelerator.wait_for_everyone()
        trainer._get_output_dir = lambda trial=None: str(staging)
        failure: BaseException | None = None
        try:
            original_save(model, trial)
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                # This one is the best so far: the Trainer found it under the staging name.
                trainer.state.best_model_checkpoint = str(final)
                if main:
                    trainer.state.save_to_json(str(staging / final.name / "trainer_state.json"))
            own_rng = staging / final.name / f"rng_state_{args.process_index}.pth"
            if own_rng.exists():
                _fsync_file(own_rng)
        except Exception as e:  # noqa: BLE001 - every failure leaves the previous checkpoint in charge
            failure = e
        finally:
            del trainer._get_output_dir
        if failure is None:
            trainer.accelerator.wait_for_everyone()
        if main:
            try:
                if failure is not None:
                    raise failure
                staged = staging / final.name
                _fsync_tree(staged)
                stop_info = None
                if stop is not None and stop.stopped:
                    from hfhpc.scheduler.environment import JobEnvironment

                    jobenv = JobEnvironment.from_environ(os.environ)
                    stop_info = {
                        "signal": signal.Signals(stop.signum).name if stop.signum else "peer",
                        "job_id": jobenv.job_id,
                        "restart": jobenv.restart_count,
                    }
                write_marker(
                    staged, step,
                    save_s=round(time.perf_counter() - t0, 3),
                    max_step_s=round(timing["max_step_s"], 4),
                    world_size=args.world_size,
                    epoch=trainer.state.epoch,
                    stop=stop_info,
                )
                fsync_dir(staged)
                commit(staged, final)
                with contextlib.suppress(OSError):
                    staging.rmdir()
                if args.save_total_limit:
                    best = trainer.state.best_model_checkpoint
                    apply_retention(run_dir, args.save_total_limit, protect=(Path(best),) if best else ())
            except Exception as e:  # noqa: BLE001
                shutil.rmtree(staging, ignore_errors=True)
                prev = str(previous.path) if previous else None
                if _disk_full(e, run_dir):
                    raise CheckpointDiskFullError(str(run_dir), prev) from e
                raise CheckpointWriteError(str(final), f"{type(e).__name__}: {e}", prev) from e
        elif failure is not None:
            prev = str(previous.path) if previous else None
            raise CheckpointWriteError(str(final), f"{type(failure).__name__}: {failure}", prev) from failure
        timing["max_step_s"] = 0.0
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = save_checkpoint
    return trainer


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """In a rank: turn a checkpoint error into one line on stderr and exit status 1."""
    try:
        yield
    except (CheckpointWriteError, CheckpointDiskFullError) as e:
        raise SystemExit(f"hfhpc: error: {e.render()}") from None


# -- for the batch script -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m hfhpc.recipes.checkpoint stopped RUN_DIR --job-id J --restart R``: exit 0 (and print
    the checkpoint) when this allocation's ranks stopped on a signal after writing one, else 1.

    The batch script asks this before it requeues: on several nodes srun's status is not always the
    ranks' 3 (``--kill-on-bad-exit`` ends the other nodes' tasks when the first one exits 3)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hfhpc.recipes.checkpoint")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stopped", help="did this allocation stop on a signal after a checkpoint?")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--job-id", required=True)
    p.add_argument("--restart", type=int, default=0)
    args = ap.parse_args(argv)
    found = stopped_on_signal(args.run_dir, job_id=args.job_id, restart=args.restart)
    if found is None:
        return 1
    print(found.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
