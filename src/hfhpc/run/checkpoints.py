"""The checkpoint format of a run folder: complete or absent, and verified before it is trusted.

The Trainer writes ``checkpoint-N`` in place: a job killed mid-save (time limit, node failure, a full
disk) leaves a folder that looks like a checkpoint and is not one. So every save goes to
``.checkpoint-N.tmp/checkpoint-N`` first (the Trainer side is :func:`hfhpc.recipes.checkpoint.install`);
when every rank has written its part, the main process reads each file back once (it is still in the
page cache), hashing it and fsyncing it, writes the completion marker ``hfhpc-complete.json`` (step,
time, each file with its size and sha256, how long the save took), renames the folder to
``checkpoint-N`` and fsyncs the run folder. The rename is the commit.

Trust: a ``checkpoint-N`` without a valid marker, or whose files do not have the recorded sizes, is
never complete. Before a run resumes from one, its files are hashed again and compared with the
marker (:func:`last_complete` with ``verify=True``): a flipped block in ``optimizer.pt`` keeps the
size and would otherwise resume with garbage. Either way the checkpoint is skipped with a warning
and the previous complete one is used. Markers written before hashes were recorded (version 1) are
checked by size only.

Retention (``save_total_limit``) counts complete checkpoints by step, never by mtime (renamed folders
keep their children's times), and deletes a checkpoint by renaming it away first.

Imported on the login node too (:func:`signal_delay_hint_s` for ``hfhpc submit``, :func:`main` from
the batch script): standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfhpc import __version__
from hfhpc.run.paths import CHECKPOINT_PREFIX as PREFIX
from hfhpc.atomic import fsync_dir

if TYPE_CHECKING:
    from hfhpc.spec import JobSpec

MARKER = "hfhpc-complete.json"
MARKER_VERSION = 2  # 2: "sha256" per file; 1: sizes only
CORRUPT_SUFFIX = ".corrupt"  # checkpoint-N.corrupt: failed its hashes or its load; kept to be looked at
STAGING_SUFFIX = ".tmp"  # .checkpoint-N.tmp/checkpoint-N while it is written
TRASH_INFIX = ".deleting-"  # .checkpoint-N.deleting-<random> while it is removed
HASH_THREADS = 8  # hashlib releases the GIL on large reads: one thread per file, up to this many
_CHUNK = 1 << 22

# Seconds between SLURM's warning signal and the time limit when the spec sets none: a GPU job
# must save a sharded checkpoint of a large model to shared storage, a CPU job little.
DEFAULT_SIGNAL_DELAY_GPU_S = 300
DEFAULT_SIGNAL_DELAY_CPU_S = 60
# The signal-delay hint: finishing the step in flight and saving, twice over, plus the exit and
# `scontrol requeue`; never less than a minute (SLURM's own timing is that coarse).
HINT_MARGIN = 2.0
HINT_FIXED_S = 30
HINT_FLOOR_S = 60

Warn = Callable[[str], None]


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


def sha256_of(path: Path, *, fsync: bool = False) -> str:
    """The file's sha256; with ``fsync``, also flushed to stable storage (one open, one pass)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _hash_files(folder: Path, names: Iterable[str], *, fsync: bool = False) -> dict[str, str]:
    names = list(names)
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(names))) as pool:
        digests = pool.map(lambda rel: sha256_of(folder / rel, fsync=fsync), names)
        return dict(zip(names, digests))


def problem(path: Path, *, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one.

    Always: a valid marker for this step, every recorded file present with its recorded size.
    ``verify``: also every file's sha256 (reads the whole checkpoint once).
    """
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
        if not _inside(path, rel):
            return f"{MARKER} names {rel!r}, outside the checkpoint"
        try:
            actual = (path / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written"
    hashes = marker.get("sha256")
    if verify and isinstance(hashes, dict):
        if set(hashes) != set(marker["files"]):
            return f"malformed {MARKER} (sha256 does not cover every file)"
        try:
            actual_hashes = _hash_files(path, hashes)
        except OSError as e:
            return f"unreadable file ({e.__class__.__name__}: {e})"
        for rel, expected in hashes.items():
            if actual_hashes[rel] != expected:
                return f"{rel} does not match the sha256 written with it (changed on disk since the save)"
    return None


def _inside(folder: Path, rel: object) -> bool:
    """A marker is read from disk: a name in it must not lead out of its checkpoint."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return ".." not in Path(rel).parts


def read_marker(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((Path(path) / MARKER).read_text())
        return marker if isinstance(marker, dict) else None
    return None


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of ``run_dir``, oldest first (sizes checked, not hashes)."""
    out = []
    for step, path in checkpoint_dirs(run_dir):
        if problem(path) is None:
            out.append(Checkpoint(path, step, read_marker(path) or {}))
    return out


def last_complete(run_dir: Path, warn: Warn | None = None, *, verify: bool = False) -> Checkpoint | None:
    """The newest complete checkpoint; every newer folder that is not one is named through ``warn``.
    ``verify`` also hashes the candidate's files against its marker."""
    return _newest(run_dir, warn, lambda path: problem(path, verify=verify))


def _newest(run_dir: Path, warn: Warn | None, why_not: Callable[[Path], str | None]) -> Checkpoint | None:
    skipped = []
    for step, path in reversed(checkpoint_dirs(run_dir)):
        why = why_not(path)
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


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that must not be trusted to ``checkpoint-N.corrupt`` (kept to be looked at;
    no longer a checkpoint to anything here, retention included)."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}{CORRUPT_SUFFIX}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def resume_point(run_dir: Path, warn: Warn | None = None) -> Checkpoint | None:
    """The checkpoint a resume trusts: the newest complete one whose files still have the sha256
    recorded when it was written. One whose bytes changed since is set aside (:func:`set_aside`);
    it and newer incomplete folders are named through ``warn``.

    One process of a job calls this (it reads the whole checkpoint); the others then find the same
    checkpoint with :func:`last_complete`, the set-aside ones being gone.
    """
    def why_not(path: Path) -> str | None:
        why = problem(path)
        if why is None and (why := problem(path, verify=True)) is not None:
            why += f"; moved aside to {set_aside(path).name}"
        return why

    return _newest(run_dir, warn, why_not)


def signal_delay_hint_s(run_dir: Path) -> int | None:
    """Seconds of warning before the time limit that this run needs to stop cleanly, measured.

    From the newest complete checkpoint's marker: the longest step seen before it plus the time the
    save took, doubled, plus the exit and requeue. None before the first checkpoint (use a default).
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


def signal_delay_s(spec: JobSpec, run_dir: Path | None = None) -> int:
    """Seconds before the time limit at which the batch shell gets SIGUSR1 (checkpoint, requeue).

    ``launch.signal_delay_s`` when set; else, for a run that already wrote a checkpoint, what its
    marker says a stop needs (longest step + save, doubled, + 30 s); else 300 s on GPUs, 60 s on CPUs.
    The measured and default values never exceed half the time limit, so a short job still gets
    its warning late.
    """
    if spec.launch.signal_delay_s is not None:
        return spec.launch.signal_delay_s
    measured = None
    if run_dir is not None:
        measured = signal_delay_hint_s(run_dir)
    default = DEFAULT_SIGNAL_DELAY_GPU_S if spec.resources.gpus_per_node else DEFAULT_SIGNAL_DELAY_CPU_S
    return max(10, min(measured or default, spec.resources.time_s // 2))


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

def fsync_file(path: Path) -> None:
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
    """Fsync and hash every file of ``folder`` (one read each, in parallel, while the bytes are still
    in the page cache), fsync its folders, then write the marker itself, fsynced."""
    files = _files_of(folder)
    hashes = _hash_files(folder, files, fsync=True)
    for root, _dirs, _files in os.walk(folder):
        fsync_dir(Path(root))
    now = time.time()
    marker = {
        "version": MARKER_VERSION,
        "step": step,
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "unix_time": round(now, 3),
        "host": socket.gethostname(),
        "hfhpc": __version__,
        **fields,
        "files": files,
        "sha256": hashes,
    }
    path = folder / MARKER
    with open(path, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
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


# -- for the batch script -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m hfhpc.run.checkpoints stopped RUN_DIR --job-id J --restart R``: exit 0 (and print
    the checkpoint) when this allocation's ranks stopped on a signal after writing one, else 1.

    The batch script asks this before it requeues: on several nodes srun's status is not always the
    ranks' 3 (``--kill-on-bad-exit`` ends the other nodes' tasks when the first one exits 3)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hfhpc.run.checkpoints")
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
