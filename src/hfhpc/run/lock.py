"""One writer per run folder: ``RUN_DIR/.hfhpc-run.lock``, a lock made with ``mkdir``.

``mkdir`` is atomic on Lustre and NFS, where ``flock`` is not dependable (the store's locks work the
same way: :class:`hfhpc.atomic.DirLock`). The holder records its host and pid; a lock whose
holder is a dead process on this host is stale and taken over at once. A holder on another host
cannot be asked, so it refreshes the lock's time every :data:`HEARTBEAT_S` seconds and its lock is
stale only after :data:`STALE_S` seconds without one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from hfhpc.errors import RunLockedError, StoreLockedError
from hfhpc.run.paths import RunDir
from hfhpc.atomic import DirLock

HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLock:
    """``with RunLock(run_dir):`` — taken at once or :class:`~hfhpc.errors.RunLockedError` naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = DirLock(RunDir(run_dir).lock, timeout_s=0.0, stale_s=STALE_S)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._created: list[Path] = []

    def acquire(self) -> RunLock:
        # The folders the lock creates: removed again on release if nothing else was put there
        # (a submission refused before it wrote anything leaves no run folder behind).
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self._lock.acquire()
        except StoreLockedError as e:
            raise RunLockedError(str(self.run_dir), e.owner) from None
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="hfhpc-run-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._lock.heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        self._lock.release()
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote into it

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
