"""Which store a command uses: the one given, else the one the lockfile was staged into.

Order: ``--store`` > ``$HFHPC_STORE`` > the lockfile's store > ``$HF_HOME`` > ``~/.cache/huggingface``.
A new login shell sets none of the variables; without the lockfile's record, ``check``, ``run`` and
``submit`` would look in ``$HOME`` (and ``stage`` would download everything again there). A store
given explicitly that lacks the staged assets is an error naming both stores: re-staging would only
download again what is already on the cluster.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hfhpc import env as hfenv
from hfhpc.errors import HfhpcError
from hfhpc.store.cache import snapshot_dir
from hfhpc.store.lock import Lockfile, load_lock


@dataclass(frozen=True)
class GivenStore:
    path: Path
    origin: str  # "--store" or "$HFHPC_STORE"


class StoreMovedError(HfhpcError):
    def __init__(self, lock_path: Path, recorded: Path, given: GivenStore):
        self.recorded, self.given = recorded, given
        undo = "drop --store" if given.origin == "--store" else f"unset {given.origin.lstrip('$')}"
        super().__init__(
            f"{lock_path}: staged into {recorded}, the store is now {given.path} (from {given.origin}), "
            "which does not hold the staged assets",
            f"use the store the assets are in ({undo}, or pass --store {shlex.quote(str(recorded))}), "
            f"or copy that store to {given.path}",
        )


def given_store(cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> GivenStore | None:
    """The store the user chose for this command, if any (``$HF_HOME`` is a default, not a choice)."""
    if cli_value:
        return GivenStore(Path(cli_value).expanduser().absolute(), "--store")
    value = environ.get(hfenv.HFHPC_STORE)
    if value:
        return GivenStore(Path(value).expanduser().absolute(), f"${hfenv.HFHPC_STORE}")
    return None


def _holds(store: Path, lock: Lockfile) -> bool:
    """Every locked snapshot is in ``store`` (their files are verified elsewhere)."""
    return all(snapshot_dir(store, a.repo_type, a.id, a.commit).is_dir() for a in lock.assets)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)


def store_for_lock(lock: Lockfile, cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The store a job pinned by ``lock`` reads (``check``, ``run``, ``submit``, ``exec --spec``)."""
    given = given_store(cli_value, environ)
    recorded = lock.store
    if given is None:
        return recorded if recorded is not None else hfenv.default_store(environ).absolute()
    if recorded is None or _same(given.path, recorded) or _holds(given.path, lock):
        return given.path
    raise StoreMovedError(lock.path, recorded, given)


def store_for_staging(lock_path: Path, cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Path:
    """Where ``stage`` writes: a given store (a new one is fine), else the store the lockfile was
    staged into, so that re-staging in a new shell never downloads everything again into ``$HOME``."""
    given = given_store(cli_value, environ)
    if given is not None:
        return given.path
    recorded = load_lock(lock_path, missing_ok=True).store
    return recorded if recorded is not None else hfenv.default_store(environ).absolute()


def store_for_spec(spec, cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Path:
    return store_for_lock(load_lock(spec.lock_path(), missing_ok=True), cli_value, environ)
