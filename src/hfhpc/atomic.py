"""Atomic files and locks that hold on network filesystems.

Nothing is ever visible under its final name before it is complete: writes go to a temporary name in
the same folder, are fsynced, then renamed. Locks use ``mkdir``, which is atomic on NFS and Lustre,
where ``flock`` is missing or unreliable; a lock whose owner died is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from hfhpc.errors import DiskFullError, StoreLockedError

TMP_PREFIX = ".hfhpc-tmp-"


def tmp_name(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def tmp_dir(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` to fill and rename into place.

    Unlike ``tempfile.mkdtemp`` (mode 0700), its mode comes from the umask and, in a setgid
    folder, its group and setgid bit from the parent: once renamed into a shared store, the
    group can read it (and, with umask 002, write beside it).
    """
    parent = Path(parent)
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into a :class:`DiskFullError` naming the place."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(str(path)) from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with disk_errors(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target``, replacing whatever was there, in one rename."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_tmp(folder: Path, older_than_s: float = 24 * 3600) -> None:
    """Remove temporary files left by killed writers (only old ones: a live writer may own a new one)."""
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                        os.unlink(entry.path)


class DirLock:
    """An exclusive lock made with ``mkdir``; works where ``flock`` does not.

    The owner writes ``owner.json`` (host, pid) inside and refreshes its mtime while it waits or works
    through :meth:`heartbeat`. A lock is stale when its owner is a dead process on this host, or when
    nobody refreshed it for ``stale_s`` seconds (an owner on another host that died).
    """

    def __init__(self, path: Path, *, timeout_s: float = 3600.0, stale_s: float = 120.0, poll_s: float = 0.2):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.stale_s = stale_s
        self.poll_s = poll_s
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

    def _owner_file(self) -> Path:
        return self.path / "owner.json"

    def _try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            return False
        atomic_write_json(self._owner_file(), self._owner)
        return True

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self._owner_file().read_text())
        except (FileNotFoundError, ValueError, NotADirectoryError):
            return None

    def _is_stale(self) -> bool:
        owner = self._read_owner()
        try:
            age = time.time() - max(self.path.stat().st_mtime, self._owner_file().stat().st_mtime)
        except FileNotFoundError:
            # between mkdir and the owner file, or just released: not stale unless it stays like that
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age > self.stale_s
        if owner and owner.get("host") == socket.gethostname():
            return not _pid_alive(int(owner.get("pid", -1)))
        return age > self.stale_s

    def _break(self) -> None:
        # Rename first so two waiters cannot both break and both take the lock.
        grave = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, grave)
        except OSError:
            return
        for child in grave.iterdir():
            with contextlib.suppress(OSError):
                child.unlink()
        with contextlib.suppress(OSError):
            grave.rmdir()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._try_acquire():
            if self._is_stale():
                self._break()
                continue
            if time.monotonic() > deadline:
                owner = self._read_owner() or {}
                raise StoreLockedError(str(self.path), f"{owner.get('host', '?')} pid {owner.get('pid', '?')}")
            time.sleep(self.poll_s)

    def heartbeat(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._owner_file())

    def release(self) -> None:
        owner = self._read_owner()
        if owner and owner.get("token") != self._owner["token"]:
            return  # broken and taken by someone else after we went silent
        with contextlib.suppress(FileNotFoundError):
            self._owner_file().unlink()
        with contextlib.suppress(OSError):
            os.rmdir(self.path)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as dead.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    return True
