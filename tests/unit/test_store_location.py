"""Where commands find the store: the lockfile's record, a given store, doctor's advice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfhpc.doctor import gather, warnings
from hfhpc.errors import LockfileError
from hfhpc.store.location import StoreMovedError, store_for_lock, store_for_staging
from hfhpc.store.lock import Lockfile, LockedAsset, load_lock


def _lock(tmp_path: Path, store: Path | None) -> Lockfile:
    lock = Lockfile(tmp_path / "job.lock", [LockedAsset("model", "org/m", "main", "a" * 40)], store)
    lock.save()
    return load_lock(lock.path)


def test_the_lockfiles_store_wins_over_hf_home_when_none_is_given(tmp_path: Path):
    lock = _lock(tmp_path, tmp_path / "project")
    assert store_for_lock(lock, None, {"HF_HOME": str(tmp_path / "home-cache")}) == tmp_path / "project"
    assert store_for_staging(lock.path, None, {"HF_HOME": str(tmp_path / "home-cache")}) == tmp_path / "project"


def test_a_lockfile_without_a_store_keeps_the_old_order(tmp_path: Path):
    lock = _lock(tmp_path, None)
    assert store_for_lock(lock, None, {"HF_HOME": str(tmp_path / "h")}) == tmp_path / "h"


def test_a_given_store_missing_the_snapshots_names_both_stores(tmp_path: Path):
    lock = _lock(tmp_path, tmp_path / "project")
    with pytest.raises(StoreMovedError) as e:
        store_for_lock(lock, None, {"HFHPC_STORE": str(tmp_path / "elsewhere")})
    assert f"staged into {tmp_path / 'project'}, the store is now {tmp_path / 'elsewhere'} (from $HFHPC_STORE)" in e.value.render()
    assert "unset HFHPC_STORE" in e.value.render() and "hfhpc stage" not in e.value.render()
    assert e.value.exit_code == 1


def test_a_given_store_holding_the_snapshots_is_used(tmp_path: Path):
    lock = _lock(tmp_path, tmp_path / "project")
    (tmp_path / "copy" / "hub" / "models--org--m" / "snapshots" / ("a" * 40)).mkdir(parents=True)
    assert store_for_lock(lock, tmp_path / "copy", {}) == tmp_path / "copy"


@pytest.mark.parametrize("value", ["relative/store", "/a/../b", "/a/\0b", 7])
def test_a_lockfile_store_that_is_not_an_absolute_normal_path_is_refused(tmp_path: Path, value):
    path = tmp_path / "job.lock"
    path.write_text(json.dumps({"version": 1, "store": value, "assets": []}))
    with pytest.raises(LockfileError, match="store"):
        load_lock(path)


def test_doctor_warns_about_a_store_under_home_or_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home, scratch, project = tmp_path / "home", tmp_path / "scratch", tmp_path / "project"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SCRATCH", str(scratch))
    under_home = " ".join(warnings(gather(home / ".cache" / "huggingface")))
    assert "is under $HOME" in under_home and "project space" in under_home and "HFHPC_STORE" in under_home
    assert "purged" in " ".join(warnings(gather(scratch / "store")))
    assert not [w for w in warnings(gather(project / "store")) if "$HOME" in w or "$SCRATCH" in w]
