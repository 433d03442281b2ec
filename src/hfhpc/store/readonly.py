"""Jobs and checks that read a store they may not write (a lab's read-only project space).

Loading from the Hugging Face cache offline still writes, in two places:

- datasets 5.2 takes file locks beside its Arrow cache, with no setting to put them elsewhere
  (``builder.py``: ``{HF_DATASETS_CACHE}/<cache dir with / as _>.lock`` when the builder is made,
  ``<output dir>_builder.lock`` in the version folder when the prepared split is reused);
- evaluate writes each metric's working files (predictions, their locks) under ``HF_METRICS_CACHE``.

- ``Dataset.map`` writes its cache files beside the Arrow files it reads (``arrow_dataset.py``:
  ``NamedTemporaryFile(dir=cache_dir)``).

So a writable scratch folder (node-local: ``$SLURM_TMPDIR`` or the temp folder) gets a datasets
cache of real folders down to each commit folder, whose files are symlinks into the store: locks
and ``map`` caches land in the scratch folder, the Arrow files are read (memory-mapped) from the
store. Nothing is copied. The hub cache (models, dataset files, metric spaces) and the module cache are only
read offline, so ``HF_HOME`` stays the store.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hfhpc import env as hfenv


def is_writable(store: Path) -> bool:
    """Whether this process may write the store (False on a read-only mount, EROFS included)."""
    store = Path(store)
    return not store.exists() or os.access(store, os.W_OK)


def datasets_mirror(store: Path, dest: Path) -> Path:
    """Fill ``dest`` with the store's datasets cache as folders of symlinks to its files; return ``dest``.

    Layout of the cache: ``<org___name>/<config>/<version>/<commit>/`` holding ``dataset_info.json`` and
    the Arrow files (see ``store.prepare.dataset_cache_dir``).
    """
    src_root = Path(store) / "datasets"
    dest.mkdir(parents=True, exist_ok=True)
    for info in sorted(src_root.glob("*/*/*/*/dataset_info.json")):
        commit_dir = info.parent
        folder = dest / commit_dir.relative_to(src_root)
        folder.mkdir(parents=True, exist_ok=True)
        for f in commit_dir.iterdir():
            if f.is_file():
                with contextlib.suppress(FileExistsError):
                    os.symlink(f, folder / f.name)
    return dest


def scratch_environ(store: Path, scratch: Path) -> dict[str, str]:
    """The variables that let sealed children load from the read-only ``store``, writing only in ``scratch``."""
    scratch = Path(scratch)
    return {
        hfenv.HF_DATASETS_CACHE: str(datasets_mirror(store, scratch / "datasets")),
        hfenv.HF_METRICS_CACHE: str(scratch / "metrics"),
    }


def scratch_dir(node_tmpdir: str | None, name: str) -> Path:
    """A folder of this user for one job's or one check's scratch files: in the job's node-local
    folder (the scheduler's tmpdir) when there is one, else in the temp folder."""
    import tempfile

    return Path(node_tmpdir or tempfile.gettempdir()) / f"hfhpc-{os.getuid()}-{name}"
