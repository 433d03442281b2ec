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
from hfhpc.store.lock import LockedAsset, LockedFile, Lockfile, base_chain, load_lock


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


def test_a_lockfiles_base_names_a_model_of_the_same_lockfile(tmp_path: Path):
    """A LoRA run's adapters name the model they apply to; the name is checked like every other field."""
    path = tmp_path / "job.lock"
    files = [LockedFile("adapter_config.json", 2, "b" * 64, "c" * 40, False)]
    adapters = LockedAsset("model", "run/sft", "main", "a" * 40, [], files, base="org/m")
    base = LockedAsset("model", "org/m", "main", "d" * 40, [], files)
    lock = Lockfile(path)
    lock.put(adapters)
    lock.put(base)
    lock.save()
    again = load_lock(path)
    assert again.get("model", "run/sft").base == "org/m" and again.get("model", "org/m").base is None
    assert "base" not in json.loads(path.read_text())["assets"][0]  # a full model's entry is as before
    assert base_chain(again.get("model", "run/sft"), again.assets) == [base]

    with pytest.raises(ValueError, match="org/other, the base of run/sft's adapters, is not pinned"):
        base_chain(LockedAsset("model", "run/sft", "main", "a" * 40, base="org/other"), again.assets)
    with pytest.raises(ValueError, match="its own base"):
        base_chain(LockedAsset("model", "org/m", "main", "a" * 40, base="org/m"), [])
    for bad, message in [("../../etc", "base '../../etc'"), (["org/m"], "base \\['org/m'\\]: not a string")]:
        data = json.loads(path.read_text())
        data["assets"][1]["base"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(LockfileError, match=message):
            load_lock(path)


def test_adapter_settings_keep_what_a_merge_needs_and_no_path(tmp_path: Path):
    from hfhpc.assets import adapter_settings

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                  "base_model_name_or_path": "/node-local/store/x", "revision": "main",
                                  "task_type": "CAUSAL_LM", "use_qalora": False}))
    settings, others = adapter_settings(config)
    assert settings == {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    assert others == {"use_qalora": False}
    config.write_text(" " * (2 << 20))
    with pytest.raises(ValueError, match="larger than 1 MiB"):
        adapter_settings(config)


def test_adapters_of_a_peft_variant_are_not_merged_as_plain_lora():
    pytest.importorskip("peft")
    from hfhpc.assets import unmerged_fields

    # As peft 0.21 saves a plain LoRA run's adapter_config.json: the defaults, some null.
    saved = {"megatron_core": "megatron.core", "qalora_group_size": 16, "loftq_config": {}, "use_qalora": False,
             "layer_replication": None, "eva_config": None}
    assert unmerged_fields(saved) == []
    assert unmerged_fields({**saved, "use_qalora": True, "layer_replication": [[0, 2]]}) == ["layer_replication", "use_qalora"]
