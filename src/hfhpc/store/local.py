"""Copy a job's assets from the shared store to node-local disk, once per node, in parallel.

Shared filesystems (Lustre, GPFS) are slow on many small files and under many readers; the node's
``$SLURM_TMPDIR`` is fast. Only what the job's lockfile names travels: the snapshot of each pinned
commit with its blobs, the tree listing and refs, the prepared Arrow cache of each dataset at that
commit, and each metric's Evaluate module. The copy is an ``HF_HOME`` of its own, so the job's
unchanged loading code reads it exactly as it would read the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hfhpc.atomic import atomic_write_text
from hfhpc.store.cache import blob_path
from hfhpc.store.layout import dataset_arrow_root, metric_module_dir, repo_dir
from hfhpc.store.lock import LockedAsset
from hfhpc.store.prepare import dataset_cache_dir

MARKER = ".hfhpc-local-complete"


def _asset_paths(store: Path, asset: LockedAsset) -> Iterator[tuple[Path, Path | str]]:
    """(destination relative to the store, source file or symlink target) for everything the asset needs."""
    rdir = repo_dir(store, asset.repo_type, asset.id)
    rel = rdir.relative_to(store)
    for f in asset.files:
        blob = blob_path(store, asset.repo_type, asset.id, f.etag)
        yield rel / "blobs" / f.etag, blob
        link = rel / "snapshots" / asset.commit / f.path
        yield link, "link:" + os.path.relpath(rel / "blobs" / f.etag, link.parent)
    tree = rdir / "trees" / f"{asset.commit}.json"
    if tree.exists():
        yield rel / "trees" / tree.name, tree
    ref = rdir / "refs" / asset.revision
    if ref.is_file():
        yield rel / "refs" / asset.revision, ref
    if asset.kind == "dataset":
        for folder in dataset_cache_dir(store, asset.id, None, asset.commit) + _other_configs(store, asset):
            for p in folder.rglob("*"):
                if p.is_file():
                    yield p.relative_to(store), p
    if asset.kind == "metric":
        mdir = metric_module_dir(store, asset.id)
        for parent in (mdir.parents[2], mdir.parents[1], mdir.parent):
            init = parent / "__init__.py"
            if init.exists():
                yield init.relative_to(store), init
        for p in mdir.rglob("*"):
            if p.is_file():
                yield p.relative_to(store), p


def _other_configs(store: Path, asset: LockedAsset) -> list[Path]:
    base = dataset_arrow_root(store, asset.id)
    if not base.is_dir():
        return []
    return [p for p in base.glob(f"*/*/{asset.commit}") if p.parent.parent.name != "default" and (p / "dataset_info.json").is_file()]


def _fingerprint(assets: list[LockedAsset]) -> str:
    h = hashlib.sha256()
    for a in sorted(assets, key=lambda a: a.key):
        h.update(f"{a.kind}:{a.id}:{a.commit}\n".encode())
    return h.hexdigest()[:16]


def _copy_one(src: Path, dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(src, tmp)  # copy_file_range/sendfile under the hood on Linux
    os.replace(tmp, dest)
    return dest.stat().st_size


def copy_assets(
    store: Path,
    assets: list[LockedAsset],
    dest: Path,
    *,
    workers: int = 8,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Path:
    """Copy ``assets`` into ``dest`` (an HF_HOME); skip when this node already holds them."""
    store, dest = Path(store), Path(dest)
    marker = dest / MARKER
    fp = _fingerprint(assets)
    if marker.exists() and marker.read_text().strip() == fp:
        log(f"hfhpc: assets already on node-local disk at {dest}")
        return dest
    files: list[tuple[Path, Path]] = []
    for asset in assets:
        for rel, src in _asset_paths(store, asset):
            if isinstance(src, str):
                link = dest / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if os.path.lexists(link):
                    link.unlink()
                os.symlink(src.removeprefix("link:"), link)
            else:
                files.append((src, dest / rel))
    total = sum(src.stat().st_size for src, _ in files)
    log(f"hfhpc: copying {len(files)} files ({total / 2**30:.2f} GiB) to node-local {dest}")
    t0 = time.perf_counter()
    done = 0
    last = t0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Largest first: the long copies start at once and the small ones fill the gaps.
        for size in pool.map(lambda p: _copy_one(*p), sorted(files, key=lambda p: -p[0].stat().st_size)):
            done += size
            now = time.perf_counter()
            if now - last > 5:
                log(f"hfhpc: copied {done / 2**30:.2f}/{total / 2**30:.2f} GiB ({done / 2**20 / (now - t0):.0f} MiB/s)")
                last = now
    seconds = time.perf_counter() - t0
    log(f"hfhpc: node-local copy done in {seconds:.1f} s ({total / 2**20 / max(seconds, 1e-9):.0f} MiB/s)")
    atomic_write_text(marker, fp + "\n")
    atomic_write_text(dest / "hfhpc" / "local-copy.json", json.dumps({"source": str(store), "files": len(files), "bytes": total}))
    return dest
