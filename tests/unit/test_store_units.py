"""Store building blocks: ids, file selection, lockfile format, mkdir locks, atomic writes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from hfhpc.errors import EntryNotFoundError, LockfileError, StoreLockedError
from hfhpc.atomic import DirLock, atomic_write_text
from hfhpc.store.fetch import select_files
from hfhpc.store.layout import FileEntry, git_blob_sha1, repo_id_problem
from hfhpc.store.lock import LockedAsset, LockedFile, Lockfile, load_lock


@pytest.mark.parametrize("repo_id", ["gpt2", "org/name", "HuggingFaceH4/zephyr-7b-beta", "a.b_c-d/x.y"])
def test_valid_ids(repo_id):
    assert repo_id_problem(repo_id) is None


@pytest.mark.parametrize("repo_id", ["", " ", "../x", "a/../b", "a/b/c", "a b", "/abs", "a//b", ".hidden/x", "a--b/c", "a/b\n"])
def test_invalid_ids(repo_id):
    assert repo_id_problem(repo_id)


def _e(path: str) -> FileEntry:
    return FileEntry(path, 1, "0" * 40)


def test_model_selection_skips_other_frameworks_and_legacy_weights():
    entries = [_e(p) for p in [
        "config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
        "onnx/model.onnx", "model.gguf", "tokenizer.json", "1_Pooling/config.json", "sub/pytorch_model.bin",
        "original/consolidated.00.pth",
    ]]
    chosen = {e.path for e in select_files("model", entries)}
    # A folder without safetensors keeps its .bin.
    assert chosen == {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json", "sub/pytorch_model.bin"}
    only_bin = {e.path for e in select_files("model", [_e("config.json"), _e("pytorch_model.bin")])}
    assert only_bin == {"config.json", "pytorch_model.bin"}
    assert {e.path for e in select_files("dataset", entries)} == {e.path for e in entries}
    with pytest.raises(EntryNotFoundError):
        select_files("model", entries, ["*.nothing"])
    assert {e.path for e in select_files("model", entries, ["onnx"])} == {"onnx/model.onnx"}


def test_git_blob_sha1_matches_git():
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_lockfile_roundtrip_and_errors(tmp_path: Path):
    path = tmp_path / "job.lock"
    lock = Lockfile(path)
    lock.put(LockedAsset("model", "org/m", "main", "a" * 40, [], [LockedFile("config.json", 2, "b" * 64, "c" * 40, False)]))
    lock.save()
    again = load_lock(path)
    assert again.get("model", "org/m").files[0].etag == "c" * 40
    assert json.loads(path.read_text())["version"] == 1
    path.write_text("{not json")
    with pytest.raises(LockfileError, match="malformed lockfile"):
        load_lock(path)
    with pytest.raises(LockfileError, match="never staged"):
        load_lock(tmp_path / "missing.lock")
    assert load_lock(tmp_path / "missing.lock", missing_ok=True).assets == []


def _hold(path: str, seconds: float, ready) -> None:
    with DirLock(Path(path)):
        ready.set()
        time.sleep(seconds)
        (Path(path).parent / "released").touch()  # just before the lock goes


def test_dirlock_excludes_waits_and_times_out(tmp_path: Path):
    lock_dir = tmp_path / "a.lock"
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(lock_dir), 1.5, ready))
    holder.start()
    ready.wait(10)
    with pytest.raises(StoreLockedError, match="locked by"):
        DirLock(lock_dir, timeout_s=0.3).acquire()
    with DirLock(lock_dir, timeout_s=30):
        assert (tmp_path / "released").exists()  # it waited for the holder
    holder.join()
    assert not lock_dir.exists()


def test_dirlock_breaks_a_lock_whose_owner_died(tmp_path: Path):
    lock_dir = tmp_path / "b.lock"
    holder = multiprocessing.Process(target=os._exit, args=(0,))
    holder.start()
    holder.join()
    lock_dir.mkdir()
    (lock_dir / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "token": "x"}))
    with DirLock(lock_dir, timeout_s=5):  # would raise StoreLockedError after 5 s if it waited
        assert json.loads((lock_dir / "owner.json").read_text())["pid"] == os.getpid()


def test_dirlock_breaks_a_silent_lock_from_another_host(tmp_path: Path):
    lock_dir = tmp_path / "c.lock"
    lock_dir.mkdir()
    (lock_dir / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    old = time.time() - 600
    os.utime(lock_dir / "owner.json", (old, old))
    os.utime(lock_dir, (old, old))
    with DirLock(lock_dir, timeout_s=5, stale_s=60):
        pass


def test_atomic_write_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
