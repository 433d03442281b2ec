"""Make staged datasets and metrics load offline with the libraries' own, unchanged calls.

- ``load_dataset("org/name")`` offline only finds what an online ``load_dataset`` cached before
  (the files alone are not enough). So after the files are in the store, hfhpc runs that online
  call once, in a child process, against a loopback Hub server of the store itself: no byte comes
  from the internet twice, and ``--from`` imports work the same way.
- ``evaluate.load("accuracy")`` offline looks in evaluate's module cache. hfhpc installs the
  metric's scripts there the way evaluate lays them out, without importing evaluate, which would
  import transformers and torch on the login node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hfhpc.errors import HfhpcError
from hfhpc.atomic import atomic_write_text, tmp_name
from hfhpc.store.cache import snapshot_dir
from hfhpc.store.layout import dataset_arrow_dir, metric_module_dir
from hfhpc.store.lock import LockedAsset

_PREPARE_CHILD = r"""
import json, sys
import datasets
datasets.config.USE_PARQUET_EXPORT = False
spec = json.loads(sys.argv[1])
out = []
for config in spec["configs"]:
    ds = datasets.load_dataset(spec["id"], config, revision=spec["commit"])
    out.append({"config": config, "splits": {k: v.num_rows for k, v in ds.items()}})
print(json.dumps(out))
"""


class PrepareError(HfhpcError):
    def __init__(self, repo_id: str, detail: str):
        self.repo_id = repo_id
        super().__init__(
            f"dataset {repo_id!r} was downloaded but `load_dataset` cannot read it: {detail}",
            "check the dataset's files and configuration name (`dataset.config` in the spec)",
        )


def prepare_dataset(
    store: Path, asset: LockedAsset, configs: list[str | None], *, endpoint: str | None, token: str | None
) -> list[str]:
    """Run ``load_dataset`` once per configuration so offline loading finds the Arrow cache.

    Returns ``config/split (rows)`` lines. ``endpoint`` and ``token`` are unused: the child reads the
    store through a loopback server, so private datasets need no token here.
    """
    from hfhpc.store.server import StoreServer

    configs = list(dict.fromkeys(configs))
    done = [prepared_splits(store, asset, c) for c in configs]
    if all(done):
        return [line for lines in done for line in lines]  # type: ignore[union-attr]
    spec = {"id": asset.id, "commit": asset.commit, "configs": configs}
    with StoreServer(store) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_HOME=str(store),
            HF_ENDPOINT=server.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            HF_UPDATE_DOWNLOAD_COUNTS="false",
        )
        proc = subprocess.run(
            [sys.executable, "-c", _PREPARE_CHILD, json.dumps(spec)], env=env, capture_output=True, text=True
        )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise PrepareError(asset.id, lines[-1] if lines else f"exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return [
        f"{r['config'] or 'default'}/{split} ({rows} rows)" for r in result for split, rows in r["splits"].items()
    ]


def dataset_cache_dir(store: Path, repo_id: str, config: str | None, commit: str) -> list[Path]:
    """Where ``load_dataset`` keeps the Arrow files of ``repo_id`` at ``commit`` (any version folder)."""
    base = dataset_arrow_dir(store, repo_id, config)
    return [p for p in base.glob(f"*/{commit}") if (p / "dataset_info.json").is_file()]


def prepared_split_names(store: Path, asset: LockedAsset, config: str | None) -> list[str] | None:
    """The split names ``load_dataset`` found for this commit and config, or None when not prepared."""
    for folder in dataset_cache_dir(store, asset.id, config, asset.commit):
        try:
            splits = json.loads((folder / "dataset_info.json").read_text()).get("splits") or {}
        except (ValueError, AttributeError):
            continue
        return list(splits)
    return None


def prepared_splits(store: Path, asset: LockedAsset, config: str | None) -> list[str] | None:
    """``config/split (rows)`` lines when the Arrow cache for this commit exists, else None."""
    for folder in dataset_cache_dir(store, asset.id, config, asset.commit):
        try:
            info = json.loads((folder / "dataset_info.json").read_text())
        except ValueError:
            continue
        splits = info.get("splits") or {}
        return [f"{config or 'default'}/{name} ({s.get('num_examples', '?')} rows)" for name, s in splits.items()]
    return None


# -- evaluate metrics --------------------------------------------------------------------------

def install_metric(store: Path, asset: LockedAsset) -> str:
    """Copy a metric space's scripts into evaluate's module cache; say what now loads."""
    snap = snapshot_dir(store, asset.repo_type, asset.id, asset.commit)
    name = asset.id.split("/")[-1]
    script = snap / f"{name}.py"
    if not script.is_file():
        raise HfhpcError(
            f"metric {asset.id!r} has no script {name}.py",
            "stage an Evaluate metric space (its main script is named like the space)",
        )
    scripts = sorted(p for p in snap.rglob("*.py"))
    digest = hashlib.sha256()
    for p in scripts:
        digest.update(p.relative_to(snap).as_posix().encode() + b"\0" + p.read_bytes())
    module_root = metric_module_dir(store, asset.id)
    final = module_root / digest.hexdigest()
    # evaluate imports these as packages: every level needs an __init__.py.
    for pkg in (module_root.parents[2], module_root.parents[1], module_root.parent, module_root):
        pkg.mkdir(parents=True, exist_ok=True)
        init = pkg / "__init__.py"
        if not init.exists():
            atomic_write_text(init, "")
    if not final.is_dir():
        tmp = tmp_name(final)
        tmp.mkdir(parents=True)
        for p in scripts:
            dest = tmp / p.relative_to(snap)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        (tmp / "__init__.py").touch()
        meta = {"original file path": f"hf://spaces/{asset.id}@{asset.commit}/{name}.py", "local file path": str(script)}
        (tmp / f"{name}.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent stage installed the same module
    # evaluate takes the newest by mtime: make the staged revision the newest.
    os.utime(final / f"{name}.py")
    return f"evaluate.load({asset.id.removeprefix('evaluate-metric/')!r})"


# Rows that `plan` and `check` read from a staged split (its first ones) to size or inspect it.
SAMPLE_ROWS = 200


def _arrow_head_rows(path: Path, limit: int) -> list[dict]:
    import pyarrow as pa

    rows: list[dict] = []
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        for batch in reader:
            rows.extend(batch.to_pylist()[: limit - len(rows)])
            if len(rows) >= limit:
                break
    return rows


def staged_sample(store: Path, dref: Any, dataset_commit: str) -> tuple[int, list[dict]] | None:
    """(rows of the split, up to ``max_samples``; its first SAMPLE_ROWS rows) from the store's Arrow
    copy of a staged dataset; None where there is none."""
    for folder in dataset_cache_dir(store, dref.id, dref.config, dataset_commit):
        arrow = sorted(folder.glob(f"*-{dref.split}.arrow")) or sorted(folder.glob(f"*-{dref.split}-*-of-*.arrow"))
        try:
            info = json.loads((folder / "dataset_info.json").read_text())
            rows = int(info["splits"][dref.split]["num_examples"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not arrow:
            continue
        sample = _arrow_head_rows(arrow[0], SAMPLE_ROWS)
        if sample:
            return (min(rows, dref.max_samples) if dref.max_samples else rows), sample
    return None
