"""The lockfile: exactly which revision and which bytes of every asset a job uses.

JSON, next to the spec (``job.yaml`` → ``job.lock``)::

    {"version": 1, "assets": [{"kind": "model", "id": "org/name", "revision": "main",
      "commit": "<sha>", "include": [], "files": [{"path": …, "size": …, "sha256": …, "blob_id": …, "lfs": true}]}]}

A model that holds only LoRA adapters (a run trained with ``train.lora``, ``model: {from_run: …}``)
names the model they apply to in ``"base"``: another model asset of the same lockfile
(:func:`base_chain`), which the job loads first and merges the adapters into.

``run`` and ``submit`` use the commits recorded here; ``check`` verifies the store against it.
``"store"`` records where the assets were staged, for commands run without ``--store``.
Nothing secret goes in: no token, no endpoint credentials.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfhpc import __version__
from hfhpc.errors import LockfileError
from hfhpc.atomic import DirLock, atomic_write_text
from hfhpc.store.layout import REPO_TYPE, FileEntry, repo_id_problem, revision_problem
from hfhpc.store.validate import blob_id_problem, commit_problem, repo_path_problem, sha256_problem, size_problem

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
    base: str | None = None  # a model of adapters: the id of the model asset they apply to

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
        out = {
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
        if self.base is not None:
            out["base"] = self.base
        return out


def base_chain(asset: LockedAsset, assets: Iterable[LockedAsset]) -> list[LockedAsset]:
    """The models under ``asset``'s adapters, nearest first, each found among ``assets``: empty for a
    full model. ``ValueError`` names a base that is not there, or one met twice (a circle)."""
    by_key = {a.key: a for a in assets}
    out: list[LockedAsset] = []
    seen = {asset.key}
    while asset.base is not None:
        key = ("model", asset.base)
        if key in seen:
            raise ValueError(f"model {asset.base} is its own base")
        if key not in by_key:
            raise ValueError(f"model {asset.base}, the base of {asset.id}'s adapters, is not pinned")
        seen.add(key)
        asset = by_key[key]
        out.append(asset)
    return out


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


def _field(path: Path, where: str, name: str, value: object, problem: str | None) -> None:
    if problem:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "...'"
        raise _bad(path, f"{where}: {name} {shown}: {problem}")


def parse_asset(path: Path, a: object) -> LockedAsset:
    """One asset of a lockfile (or of a job file's record), every field checked: a lockfile is shared
    and committed, so untrusted. :class:`LockfileError` naming ``path`` and the field."""
    if not isinstance(a, dict):
        raise _bad(path, "an asset is not a JSON object")
    where = f"asset {a.get('id')!r}"
    _field(path, where, "kind", a["kind"], None if a["kind"] in REPO_TYPE else "not one of " + ", ".join(REPO_TYPE))
    _field(path, where, "commit", a["commit"], commit_problem(a["commit"]))
    repo_id = a["id"]
    _field(path, where, "id", repo_id, repo_id_problem(repo_id) if isinstance(repo_id, str) else "not a string")
    revision = a["revision"]
    _field(path, where, "revision", revision, revision_problem(revision) if isinstance(revision, str) else "not a string")
    include = a.get("include", [])
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise _bad(path, f"{where}: include is not a list of patterns")
    if not isinstance(a["files"], list):
        raise _bad(path, f"{where}: files is not a list")
    base = a.get("base")
    if base is not None:
        _field(path, where, "base", base, (repo_id_problem(base) if isinstance(base, str) else "not a string")
               or (None if a["kind"] == "model" else "only a model has a base"))
    files = []
    for f in a["files"]:
        if not isinstance(f, dict):
            raise _bad(path, f"{where}: a file is not a JSON object")
        _field(path, where, "path", f["path"], repo_path_problem(f["path"]))
        at = f"{where} file {f['path']!r}"
        _field(path, at, "size", f["size"], size_problem(f["size"]))
        _field(path, at, "sha256", f["sha256"], sha256_problem(f["sha256"]))
        _field(path, at, "blob_id", f["blob_id"], blob_id_problem(f["blob_id"]))
        _field(path, at, "lfs", f["lfs"], None if isinstance(f["lfs"], bool) else "not true or false")
        files.append(LockedFile(f["path"], f["size"], f["sha256"], f["blob_id"], f["lfs"]))
    return LockedAsset(a["kind"], repo_id, revision, a["commit"], list(include), files, base)


def load_lock(path: Path, *, missing_ok: bool = False, stage: str = "hfhpc stage SPEC") -> Lockfile:
    """The lockfile at ``path``; ``stage``, the command that writes it (``JobSpec.stage_command``), is the fix
    that a missing one names."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return Lockfile(path)
        raise LockfileError(str(path), "no lockfile: the spec was never staged",
                            f"run `{stage}` on a login node") from None
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"not JSON: {str(e)[:80]}") from None
    if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
        raise _bad(path, f"version {data.get('version') if isinstance(data, dict) else '?'}, expected {LOCK_VERSION}")
    assets = []
    try:
        if not isinstance(data["assets"], list):
            raise _bad(path, "assets is not a list")
        for a in data["assets"]:
            assets.append(parse_asset(path, a))
    except (KeyError, TypeError) as e:
        raise _bad(path, f"missing {e}") from None
    return Lockfile(path, assets, _recorded_store(path, data.get("store")))


def update_lock(path: Path, assets: list[LockedAsset], store: Path | None = None) -> Lockfile:
    """Put ``assets`` into the lockfile at ``path``, keeping every other asset in it; record
    ``store`` as the store they were staged into.

    Read, change and write happen under a ``mkdir`` lock beside the file: several ``hfhpc stage
    --lock same.lock`` of different assets at once each add theirs instead of the last writer's
    copy replacing the others'.
    """
    path = Path(path)
    with DirLock(path.with_name(f".{path.name}.writing")):
        lock = load_lock(path, missing_ok=True)
        for asset in assets:
            lock.put(asset)
        if store is not None:
            lock.store = Path(store).absolute()
        lock.save()
    return lock


def _recorded_store(path: Path, value: object) -> Path | None:
    """The lockfile's store: an absolute, normalised path, or none recorded (older lockfiles)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or os.path.normpath(value) != value:
        raise _bad(path, f"store {value!r} is not an absolute, normalised path")
    return Path(value)


@dataclass(frozen=True)
class JobFiles:
    """Where the staged model and dataset of a spec are, as far as the lockfile and store tell."""

    model_snapshot: Path | None
    model_commit: str | None
    dataset_commit: str | None
    # Where the model's config.json is: its own snapshot, or for LoRA adapters their base's.
    config_snapshot: Path | None = None


def job_files(spec: Any, store: Path) -> JobFiles:
    from hfhpc.store.layout import snapshot_dir

    lock = load_lock(spec.lock_path(), missing_ok=True)
    model = lock.get("model", spec.model.id) if spec.model else None
    dataset = lock.get("dataset", spec.dataset.id) if spec.dataset else None
    snap = snapshot_dir(store, "model", model.id, model.commit) if model else None
    try:
        base = (base_chain(model, lock.assets) or [model])[-1] if model else None
    except ValueError:  # a base the lockfile lacks: `check` says so
        base = model
    config = snapshot_dir(store, "model", base.id, base.commit) if base else None
    return JobFiles(snap if snap and snap.is_dir() else None, model.commit if model else None,
                    dataset.commit if dataset else None, config if config and config.is_dir() else None)
