"""Stage a spec's (or an ad-hoc list of) assets into the store and record them in the lockfile."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hfhpc import env as hfenv
from hfhpc.errors import UsageError
from hfhpc.store import fetch
from hfhpc.store.cache import blob_path, is_installed, read_tree
from hfhpc.store.fetch import AssetRequest, Progress, StagedAsset
from hfhpc.store.layout import repo_dir
from hfhpc.store.lock import LockedAsset, LockedFile, load_lock, update_lock
from hfhpc.store.validate import contained
from hfhpc.store.verify import VerifyCache, verify_file

if TYPE_CHECKING:  # the spec is the layer above: the store takes one, never imports it
    from hfhpc.spec import JobSpec


@dataclass
class AssetOutcome:
    asset: LockedAsset
    previous_commit: str | None
    downloaded_bytes: int
    downloaded_files: int
    prepared: list[str] = field(default_factory=list)  # dataset splits / metric module made loadable offline
    imported_from: Path | None = None  # the local folder it was imported from (--from, a run's model/)
    base_of: str | None = None  # the model of adapters that this model is the base of

    @property
    def changed(self) -> bool:
        return self.previous_commit is not None and self.previous_commit != self.asset.commit


@dataclass
class StageReport:
    lock_path: Path
    outcomes: list[AssetOutcome]
    warnings: list[str] = field(default_factory=list)

    @property
    def downloaded_bytes(self) -> int:
        return sum(o.downloaded_bytes for o in self.outcomes)


def requests_from_spec(spec: JobSpec) -> list[AssetRequest]:
    reqs = [AssetRequest("model", m.id, m.revision, tuple(m.include)) for m in spec.all_models()]
    reqs += [AssetRequest("dataset", d.id, d.revision, tuple(d.include)) for d in spec.all_datasets()]
    reqs += [AssetRequest("metric", m.id, m.revision) for m in spec.metrics]
    # The same asset named twice is staged once.
    return list({r.key: r for r in reqs}.values())


def _locked(staged: StagedAsset, store: Path, cache: VerifyCache) -> LockedAsset:
    req = staged.request
    files = []
    for e in staged.files:
        blob = blob_path(store, req.repo_type, req.repo_id, e.etag)
        digest = staged.sha256.get(e.path)
        if digest:
            cache.remember(blob, digest)
        else:
            digest = e.lfs_sha256 or cache.sha256(blob, blob.stat())
        files.append(LockedFile(e.path, e.size, digest, e.blob_id, e.lfs_sha256 is not None))
    return LockedAsset(req.kind, req.repo_id, req.revision, staged.commit, list(req.include), files)


def _pinned(store: Path, req: AssetRequest, locked: LockedAsset | None) -> tuple | None:
    """Reuse the lockfile's commit and files when the request is unchanged (no network needed)."""
    if locked is None or locked.revision != req.revision or list(req.include) != locked.include:
        return None
    everything = read_tree(store, req.repo_type, req.repo_id, locked.commit)
    if everything is None:
        return None
    return locked.commit, [f.entry() for f in locked.files], everything


def _repair(store: Path, locked: LockedAsset, cache: VerifyCache) -> None:
    """Remove blobs whose bytes no longer match the lockfile, so staging fetches them again."""
    for f in locked.files:
        reason = verify_file(store, locked, f, cache)
        if reason and not reason.startswith("missing"):
            blob = blob_path(store, locked.repo_type, locked.id, f.etag)
            contained(blob, repo_dir(store, locked.repo_type, locked.id)).unlink(missing_ok=True)


def stage(
    store: Path,
    requests: list[AssetRequest],
    lock_path: Path,
    *,
    update: bool = False,
    repair: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    workers: int = 1,
    progress: bool = True,
    prepare: bool = True,
    xet: bool = False,
    dataset_configs: dict[str, list[str | None]] | None = None,
    folders: Mapping[tuple[str, str], Path] | None = None,
    bases: Mapping[tuple[str, str], list[LockedAsset]] | None = None,
) -> StageReport:
    """Stage every request; the lockfile is written once all of them succeeded.

    ``folders`` maps a request's key to a local folder imported instead of downloaded (a finished
    run's ``model/``): imported again each time, so the lockfile pins what the folder holds now.
    ``bases`` maps the key of such a folder of LoRA adapters to the models under them, nearest first,
    as the run that trained them pinned them (``hfhpc.run.chain.model_bases``): each is pinned at
    that commit with those files (fetched first if the store lacks any), and the adapters name the
    first as their ``base``.
    """
    from hfhpc.store import prepare as prep
    from hfhpc.store.importer import import_folder

    folders = folders or {}
    bases = bases or {}

    endpoint = endpoint or hfenv.endpoint()
    lock = load_lock(lock_path, missing_ok=True)
    cache = VerifyCache(store)
    outcomes: list[AssetOutcome] = []
    bar = Progress(enabled=progress)
    try:
        # The bases first: a failed download then leaves no adapters imported for nothing.
        below: dict[tuple[str, str], tuple[LockedAsset, str]] = {}
        for key, chain in bases.items():
            above = key[1]
            for base in chain:
                below.setdefault(base.key, (base, above))
                above = base.id
        for base, above in below.values():
            outcomes.append(_stage_base(store, base, lock.get(*base.key), cache, repair=repair, base_of=above,
                                        endpoint=endpoint, token=token, workers=workers, progress=bar, xet=xet))
        for req in requests:
            locked = lock.get(*req.key)
            if locked and repair:
                _repair(store, locked, cache)
            src = folders.get(req.key)
            if src is not None:
                staged = StagedAsset(req, *import_folder(store, req.repo_type, req.repo_id, src, req.revision))
            else:
                pinned = None if update else _pinned(store, req, locked)
                staged = fetch.stage_revision(
                    store, req, endpoint=endpoint, token=token, workers=workers, progress=bar, pinned=pinned, xet=xet
                )
            asset = _locked(staged, store, cache)
            if req.key in bases:
                asset.base = bases[req.key][0].id
            outcome = AssetOutcome(asset, locked.commit if locked else None, staged.downloaded_bytes, staged.downloaded_files,
                                   imported_from=src)
            if prepare and req.kind == "dataset":
                configs = (dataset_configs or {}).get(req.repo_id) or [None]
                outcome.prepared = prep.prepare_dataset(store, asset, configs, endpoint=endpoint, token=token)
            elif prepare and req.kind == "metric":
                outcome.prepared = [prep.install_metric(store, asset)]
            outcomes.append(outcome)
    finally:
        bar.close()
        cache.save()
    update_lock(lock_path, [o.asset for o in outcomes], store=store)
    return StageReport(lock_path, outcomes)


def _stage_base(store: Path, base: LockedAsset, locked: LockedAsset | None, cache: VerifyCache, *, repair: bool,
                base_of: str, **fetch_kwargs) -> AssetOutcome:
    """Pin ``base`` (a model under adapters, as their run pinned it) as it is; fetch its files at that
    commit when the store lacks any (a ``run/…`` base never: ``hfhpc.run.chain`` refused it already)."""
    if repair:
        _repair(store, base, cache)
    got, nbytes = 0, 0
    entries = [f.entry() for f in base.files]
    if not all(is_installed(store, base.repo_type, base.id, base.commit, e) for e in entries):
        # Asked for by commit: the store's refs (what `main` means there) stay as they are.
        req = AssetRequest(base.kind, base.id, base.commit, tuple(base.include))
        everything = read_tree(store, base.repo_type, base.id, base.commit) or entries
        staged = fetch.stage_revision(store, req, pinned=(base.commit, entries, everything), **fetch_kwargs)
        got, nbytes = staged.downloaded_files, staged.downloaded_bytes
    return AssetOutcome(base, locked.commit if locked else None, nbytes, got, base_of=base_of)


def stage_spec(spec: JobSpec, store: Path, *, folders: Mapping[tuple[str, str], Path] | None = None,
               bases: Mapping[tuple[str, str], list[LockedAsset]] | None = None, **kwargs) -> StageReport:
    """Stage ``spec``'s assets. ``folders`` holds the folder of each model the spec takes from a run
    (``model: {from_run: …}``), found and checked by ``hfhpc.run.chain.model_folders``; ``bases`` the
    models under those that hold LoRA adapters (``hfhpc.run.chain.model_bases``)."""
    folders = dict(folders or {})
    for m in spec.all_models():
        if m.from_run is not None and ("model", m.id) not in folders:
            raise UsageError(f"model {m.id} comes from the run folder {m.from_run}, which was not given",
                             f"stage it with `{spec.stage_command()}`")
    configs: dict[str, list[str | None]] = {}
    for d in spec.all_datasets():
        configs.setdefault(d.id, []).append(d.config)
    report = stage(store, requests_from_spec(spec), spec.lock_path(), dataset_configs=configs, folders=folders,
                   bases=bases, **kwargs)
    report.warnings.extend(missing_splits(spec, store, report))
    return report


def missing_splits(spec: JobSpec, store: Path, report: StageReport) -> list[str]:
    """The spec's splits that the staged dataset does not have (the job would fail on them)."""
    from hfhpc.store.prepare import prepared_split_names

    assets = {(o.asset.kind, o.asset.id): o.asset for o in report.outcomes}
    out = []
    for d in spec.all_datasets():
        asset = assets.get(("dataset", d.id))
        names = prepared_split_names(store, asset, d.config) if asset else None
        if not names:
            continue  # not prepared (--no-prepare): cannot tell here; `hfhpc check` will
        for split in d.all_splits():
            if split not in names:
                where = f" (config {d.config})" if d.config else ""
                out.append(f"dataset {d.id}{where} has no split {split!r}: it has {', '.join(names)}; fix the split names in {spec.source or 'the spec'}")
    return out


def import_local(store: Path, kind: str, repo_id: str, src: Path, lock_path: Path, revision: str = "main") -> StageReport:
    """``hfhpc stage --from PATH``: import a clone or folder, then lock it like a download."""
    from hfhpc.store import prepare as prep
    from hfhpc.store.importer import import_folder

    lock = load_lock(lock_path, missing_ok=True)
    previous = lock.get(kind, repo_id)
    req = AssetRequest(kind, repo_id, revision)
    commit, entries = import_folder(store, req.repo_type, repo_id, src, revision)
    cache = VerifyCache(store)
    staged = StagedAsset(req, commit, entries)
    asset = _locked(staged, store, cache)
    cache.save()
    outcome = AssetOutcome(asset, previous.commit if previous else None, 0, 0, imported_from=Path(src))
    if kind == "metric":
        outcome.prepared = [prep.install_metric(store, asset)]
    elif kind == "dataset":
        outcome.prepared = prep.prepare_dataset(store, asset, [None], endpoint=None, token=None)
    update_lock(lock_path, [asset], store=store)
    return StageReport(lock_path, [outcome])


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


