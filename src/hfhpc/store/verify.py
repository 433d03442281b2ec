"""Verify the store against a lockfile: sizes always, sha256 when a blob changed since last verified.

The verification cache (``<store>/hfhpc/verified.json``) remembers (size, mtime, inode) → sha256 per
blob, so a second ``check`` of a 7B model reads metadata only.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hfhpc.atomic import atomic_write_json
from hfhpc.store.cache import blob_path, snapshot_file
from hfhpc.store.layout import repo_dir, sha256_file, state_dir
from hfhpc.store.lock import LockedAsset, LockedFile


@dataclass(frozen=True)
class Problem:
    """One missing or corrupt piece, with the command that fixes it."""

    kind: str
    repo_id: str
    what: str  # a file path, a split, a metric …
    reason: str
    fix: str

    def render(self) -> str:
        return f"{self.kind} {self.repo_id}: {self.what}: {self.reason}\n    fix: {self.fix}"


class VerifyCache:
    """``full=True`` trusts no remembered hash: every blob is read again once (``check --full``), which
    finds what a stamp cannot see: bytes changed in place with the same size, mtime and inode (a
    bad disk, a crash of the login node before the blob reached the disk, a tampered store)."""

    def __init__(self, store: Path, *, full: bool = False):
        self.full = full
        self._rehashed: set[str] = set()
        self.path = state_dir(store) / "verified.json"
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _stamp(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def sha256(self, blob: Path, st: os.stat_result) -> str:
        key = str(blob)
        hit = self.entries.get(key)
        if hit and hit.get("stamp") == self._stamp(st) and (not self.full or key in self._rehashed):
            return hit["sha256"]
        digest = sha256_file(blob)
        self._rehashed.add(key)
        self.entries[key] = {"stamp": self._stamp(st), "sha256": digest}
        self.dirty = True
        return digest

    def remember(self, blob: Path, digest: str) -> None:
        try:
            st = blob.stat()
        except OSError:
            return
        self.entries[str(blob)] = {"stamp": self._stamp(st), "sha256": digest}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        # Merge with what another process may have written meanwhile; losing an entry only costs a re-hash.
        try:
            current = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            current = {}
        current.update(self.entries)
        try:
            atomic_write_json(self.path, current)
        except OSError as e:
            # A read-only store (a lab's shared project space) is checked all the same: the
            # cache only saves re-hashing next time.
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        self.dirty = False


def stage_command(asset: LockedAsset) -> str:
    import shlex

    flag = {"model": "--model", "dataset": "--dataset", "metric": "--metric"}[asset.kind]
    parts = ["hfhpc", "stage", flag, asset.id]
    if asset.revision != "main":
        parts += ["--revision", asset.revision]
    for pattern in asset.include:
        parts += ["--include", pattern]
    return " ".join(shlex.quote(p) for p in parts)


def verify_file(store: Path, asset: LockedAsset, f: LockedFile, cache: VerifyCache) -> str | None:
    """Why ``f`` is not usable from the store, or None."""
    link = snapshot_file(store, asset.repo_type, asset.id, asset.commit, f.path)
    blob = blob_path(store, asset.repo_type, asset.id, f.etag)
    if not os.path.lexists(link):
        return "missing"
    try:
        st = os.stat(link)
    except OSError:
        return "missing (dangling link)"
    if st.st_size != f.size:
        return f"wrong size ({st.st_size} bytes, expected {f.size})"
    real = os.path.realpath(link)
    if not real.startswith(os.path.realpath(repo_dir(store, asset.repo_type, asset.id)) + os.sep):
        return "corrupt (its link leads out of the store)"
    digest = cache.sha256(Path(real) if not blob.exists() else blob, st)
    if digest != f.sha256:
        return "corrupt (sha256 mismatch)"
    return None


def verify_asset(store: Path, asset: LockedAsset, cache: VerifyCache) -> list[Problem]:
    problems = []
    for f in asset.files:
        reason = verify_file(store, asset, f, cache)
        if reason:
            fix = stage_command(asset)
            if reason.startswith("corrupt") or reason.startswith("wrong size"):
                fix += " --repair"
            problems.append(Problem(asset.kind, asset.id, f.path, reason, fix))
    return problems
