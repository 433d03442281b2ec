"""The lockfile: exactly which revision and which bytes of every asset a job uses.

JSON, next to the spec (``job.yaml`` → ``job.lock``)::

    {"version": 1, "assets": [{"kind": "model", "id": "org/name", "revision": "main",
      "commit": "<sha>", "include": [], "files": [{"path": …, "size": …, "sha256": …, "blob_id": …, "lfs": true}]}]}

``run`` and ``submit`` use the commits recorded here; ``check`` verifies the store against it.
``"store"`` records where the assets were staged, for commands run without ``--store``.
Nothing secret goes in: no token, no endpoint credentials.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hfhpc import __version__
from hfhpc.errors import LockfileError
from hfhpc.store.atomic import atomic_write_text
from hfhpc.store.layout import REPO_TYPE, SHA1_RE, FileEntry

LOCK_VERSION = 1


@dataclass(frozen=True)
class LockedFile:
    path: str
    size: int
    sha256: str
    blob_id: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def entry(self) -> FileEntry:
        return FileEntry(self.path, self.size, self.blob_id, self.sha256 if self.lfs else None)


@dataclass
class LockedAsset:
    kind: str
    id: str
    revision: str
    commit: str
    include: list[str] = field(default_factory=list)
    files: list[LockedFile] = field(default_factory=list)

    @property
    def repo_type(self) -> str:
        return REPO_TYPE[self.kind]

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "id": self.id,
            "revision": self.revision,
            "commit": self.commit,
            "include": list(self.include),
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "blob_id": f.blob_id, "lfs": f.lfs}
                for f in sorted(self.files, key=lambda f: f.path)
            ],
        }


@dataclass
class Lockfile:
    path: Path
    assets: list[LockedAsset] = field(default_factory=list)
    store: Path | None = None  # the store the assets were staged into (store/location.py reads it)

    def get(self, kind: str, repo_id: str) -> LockedAsset | None:
        for a in self.assets:
            if a.key == (kind, repo_id):
                return a
        return None

    def put(self, asset: LockedAsset) -> None:
        self.assets = [a for a in self.assets if a.key != asset.key] + [asset]

    def to_json(self) -> dict:
        order = {"model": 0, "dataset": 1, "metric": 2}
        assets = sorted(self.assets, key=lambda a: (order.get(a.kind, 9), a.id))
        out: dict = {"version": LOCK_VERSION, "generated_by": f"hfhpc {__version__}"}
        if self.store is not None:
            out["store"] = str(self.store)
        out["assets"] = [a.to_json() for a in assets]
        return out

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=2) + "\n")


def _bad(path: Path, what: str) -> LockfileError:
    return LockfileError(str(path), f"malformed lockfile ({what})")


def load_lock(path: Path, *, missing_ok: bool = False) -> Lockfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return Lockfile(path)
        raise LockfileError(str(path), "no lockfile: the spec was never staged", "run `hfhpc stage SPEC` on a login node") from None
    except ValueError as e:
        raise _bad(path, f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
        raise _bad(path, f"version {data.get('version') if isinstance(data, dict) else '?'}, expected {LOCK_VERSION}")
    assets = []
    try:
        for a in data["assets"]:
            if a["kind"] not in REPO_TYPE or not SHA1_RE.match(a["commit"]):
                raise _bad(path, f"asset {a.get('id')!r}")
            files = [LockedFile(f["path"], int(f["size"]), f["sha256"], f["blob_id"], bool(f["lfs"])) for f in a["files"]]
            assets.append(LockedAsset(a["kind"], a["id"], a["revision"], a["commit"], list(a.get("include", [])), files))
    except (KeyError, TypeError) as e:
        raise _bad(path, f"missing {e}") from None
    return Lockfile(path, assets, _recorded_store(path, data.get("store")))


def _recorded_store(path: Path, value: object) -> Path | None:
    """The lockfile's store: an absolute, normalised path, or none recorded (older lockfiles)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or os.path.normpath(value) != value:
        raise _bad(path, f"store {value!r} is not an absolute, normalised path")
    return Path(value)
