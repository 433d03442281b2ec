"""Checkpoint completeness, verification and retention (hfhpc.run.checkpoints), the Trainer wrapper
(hfhpc.recipes.checkpoint), and the format detection of ``hfhpc export``."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.recipes import checkpoint as trainer_ck
from hfhpc.run import checkpoints as ck


def _make(run_dir: Path, step: int, *, files: dict[str, bytes] | None = None, marker: bool = True, **fields) -> Path:
    """A checkpoint folder as the wrapper leaves it (with ``marker``) or as a killed writer does."""
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"w" * 100, "optimizer.pt": b"o" * 50}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if marker:
        ck.write_marker(path, step, **fields)
    return path


def test_a_complete_checkpoint_records_every_file_with_its_size(tmp_path: Path):
    path = _make(tmp_path, 4, files={"a.bin": b"12345", "sub/b.bin": b"xy"}, save_s=1.5)
    marker = json.loads((path / ck.MARKER).read_text())
    assert marker["step"] == 4 and marker["files"] == {"a.bin": 5, "sub/b.bin": 2} and marker["save_s"] == 1.5
    assert ck.problem(path) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / ck.MARKER).unlink(), "no hfhpc-complete.json (the save never finished)"),
        (lambda p: (p / ck.MARKER).write_text("{trunc"), "unreadable hfhpc-complete.json"),
        (lambda p: (p / "optimizer.pt").write_bytes(b"o" * 10), "optimizer.pt has 10 bytes, 50 were written"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda p: (p / ck.MARKER).write_text(json.dumps({"step": 9, "files": {"x": 1}})), "is for step 9"),
    ],
)
def test_incomplete_or_corrupt_checkpoints_are_named_with_the_reason(tmp_path: Path, damage, reason):
    path = _make(tmp_path, 4)
    damage(path)
    assert reason in ck.problem(path)


def test_last_complete_skips_newer_broken_ones_with_a_warning(tmp_path: Path):
    _make(tmp_path, 2)
    good = _make(tmp_path, 10)
    _make(tmp_path, 12, marker=False)
    truncated = _make(tmp_path, 14)
    (truncated / "model.safetensors").write_bytes(b"w")
    (tmp_path / "checkpoint-x").mkdir()  # not a step: ignored
    (tmp_path / ".checkpoint-16.tmp" / "checkpoint-16").mkdir(parents=True)  # a staging folder: ignored
    warnings: list[str] = []
    found = ck.last_complete(tmp_path, warn=warnings.append)
    assert found.path == good and found.step == 10
    assert warnings == [
        "warning: skipping checkpoint-14: model.safetensors has 1 bytes, 100 were written; resuming from checkpoint-10 instead",
        "warning: skipping checkpoint-12: no hfhpc-complete.json (the save never finished); resuming from checkpoint-10 instead",
    ]


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path: Path):
    _make(tmp_path, 3, marker=False)
    warnings: list[str] = []
    assert ck.last_complete(tmp_path, warn=warnings.append) is None
    assert warnings == ["warning: skipping checkpoint-3: no hfhpc-complete.json (the save never finished); "
                        "no complete checkpoint: starting from the beginning"]
    assert ck.last_complete(tmp_path / "missing") is None


def test_common_last_checkpoint_uses_only_complete_ones(tmp_path: Path, capsys):
    from hfhpc.recipes.common import last_checkpoint

    good = _make(tmp_path, 5)
    _make(tmp_path, 6, marker=False)
    assert last_checkpoint(tmp_path) == str(good)
    assert "hfhpc: warning: skipping checkpoint-6" in capsys.readouterr().out


def test_retention_keeps_the_newest_complete_by_step_not_mtime(tmp_path: Path):
    paths = {s: _make(tmp_path, s) for s in (2, 4, 6, 10)}
    os.utime(paths[2], (4e9, 4e9))  # the oldest step is the newest on disk: must not matter
    stale = _make(tmp_path, 8, marker=False)  # older than the newest complete one: garbage
    newer_broken = _make(tmp_path, 12, marker=False)  # newer: left for the warning and a later replace
    deleted = ck.apply_retention(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-6"]
    assert not stale.exists() and newer_broken.exists()


def test_retention_never_deletes_the_best_checkpoint(tmp_path: Path):
    best = _make(tmp_path, 2)
    for s in (4, 6):
        _make(tmp_path, s)
    ck.apply_retention(tmp_path, keep=1, protect=(best,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6"]


def test_commit_is_one_rename_and_replaces_a_stale_folder_of_the_same_step(tmp_path: Path):
    _make(tmp_path, 7, marker=False, files={"old.bin": b"old"})
    staging = ck.staging_dir(tmp_path, 7)
    staged = _make(staging, 7, files={"new.bin": b"new"})
    ck.commit(staged, tmp_path / "checkpoint-7")
    assert sorted(p.name for p in (tmp_path / "checkpoint-7").iterdir()) == [ck.MARKER, "new.bin"]
    assert ck.problem(tmp_path / "checkpoint-7") is None
    assert [p.name for p in tmp_path.iterdir() if ck.TRASH_INFIX in p.name] == []


def test_leftovers_of_killed_writers_are_removed(tmp_path: Path):
    keep = _make(tmp_path, 3)
    (tmp_path / ".checkpoint-5.tmp" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / f".checkpoint-1{ck.TRASH_INFIX}abcd").mkdir()
    (tmp_path / ".hidden-user-file").write_text("mine")
    ck.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-user-file", keep.name]


def test_signal_delay_hint_is_sized_to_the_measured_step_and_save(tmp_path: Path):
    assert ck.signal_delay_hint_s(tmp_path) is None  # nothing measured yet: the caller's default
    _make(tmp_path, 2, save_s=10.0, max_step_s=5.0)
    _make(tmp_path, 4, save_s=100.0, max_step_s=20.0)  # the newest one counts
    assert ck.signal_delay_hint_s(tmp_path) == 2 * 120 + 30
    _make(tmp_path, 6, save_s=0.05, max_step_s=0.1)
    assert ck.signal_delay_hint_s(tmp_path) == ck.HINT_FLOOR_S


def test_signal_delay_hint_needs_no_heavy_import():
    code = "import sys, hfhpc.run.checkpoints; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stopped_on_signal_matches_this_launch_only(tmp_path: Path):
    assert ck.stopped_on_signal(tmp_path, since=0) is None
    _make(tmp_path, 3, stop=None)
    assert ck.stopped_on_signal(tmp_path, since=0) is None  # a periodic checkpoint
    _make(tmp_path, 5, stop={"signal": "SIGUSR1", "job_id": "42", "restart": 1})
    assert ck.stopped_on_signal(tmp_path, job_id="42", restart=1).step == 5
    assert ck.stopped_on_signal(tmp_path, job_id="42", restart=0) is None  # the previous allocation's
    assert ck.stopped_on_signal(tmp_path, job_id="43", restart=1) is None
    marker = json.loads((tmp_path / "checkpoint-5" / ck.MARKER).read_text())
    assert ck.stopped_on_signal(tmp_path, since=marker["unix_time"] - 1).step == 5
    assert ck.stopped_on_signal(tmp_path, since=marker["unix_time"] + 60) is None  # an earlier run's


def test_a_full_disk_is_recognised_with_or_without_an_errno(tmp_path: Path):
    assert trainer_ck._disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert trainer_ck._disk_full(wrapped, tmp_path)
    assert not trainer_ck._disk_full(RuntimeError("file write failed"), tmp_path)  # this disk has room


def test_disk_full_error_is_one_line_naming_the_intact_checkpoint(tmp_path: Path):
    e = trainer_ck.CheckpointDiskFullError(str(tmp_path), str(tmp_path / "checkpoint-4"))
    text = e.render()
    assert "\n" not in text
    assert text.startswith(f"no space left on the device holding {tmp_path} while writing a checkpoint; "
                           "the previous checkpoint checkpoint-4 is intact")
    with pytest.raises(SystemExit) as exit_info, trainer_ck.one_line_errors():
        raise e
    assert str(exit_info.value.code) == f"hfhpc: error: {text}"


# -- the Trainer wrapper, in process, on a two-parameter model ---------------------------------------

def _tiny_trainer(run_dir: Path, **args):
    import torch
    from transformers import Trainer, TrainingArguments

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x, labels=None):
            out = self.w(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    data = [{"x": torch.tensor([float(i), 1.0]), "labels": torch.tensor(float(2 * i))} for i in range(16)]
    targs = TrainingArguments(output_dir=str(run_dir), max_steps=6, per_device_train_batch_size=2, save_strategy="steps",
                              save_steps=2, save_total_limit=2, report_to="none", disable_tqdm=True, use_cpu=True,
                              logging_steps=100, **args)
    return Trainer(model=Linear(), args=targs, train_dataset=data, eval_dataset=data if args.get("eval_strategy") else None)


def test_the_wrapped_trainer_commits_each_checkpoint_atomically_and_rotates(tmp_path: Path):
    pytest.importorskip("transformers")
    trainer = trainer_ck.install(_tiny_trainer(tmp_path))
    seen = []
    real_commit = ck.commit

    def spy(staged: Path, final: Path) -> None:
        # At the commit point everything is already in the staging folder, nothing under the final name.
        seen.append((staged.parent.name, final.exists(), ck.problem(staged)))
        real_commit(staged, final)

    ck.commit = spy
    try:
        trainer.train()
    finally:
        ck.commit = real_commit
    assert seen == [(".checkpoint-2.tmp", False, None), (".checkpoint-4.tmp", False, None), (".checkpoint-6.tmp", False, None)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-4", "checkpoint-6"]
    marker = json.loads((tmp_path / "checkpoint-6" / ck.MARKER).read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(marker["files"])
    assert marker["stop"] is None and marker["save_s"] > 0 and marker["max_step_s"] > 0


def test_the_best_checkpoint_is_recorded_under_its_final_name(tmp_path: Path):
    pytest.importorskip("transformers")
    trainer = _tiny_trainer(tmp_path, eval_strategy="steps", eval_steps=2, metric_for_best_model="loss",
                            load_best_model_at_end=True)
    trainer_ck.install(trainer).train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path and ck.problem(best) is None
    recorded = json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert recorded == str(best)


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_staging_folder(tmp_path: Path):
    pytest.importorskip("transformers")
    trainer = trainer_ck.install(_tiny_trainer(tmp_path))
    real = trainer._save_rng_state

    def fail_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(output_dir)

    trainer._save_rng_state = fail_at_step_4
    with pytest.raises(trainer_ck.CheckpointDiskFullError) as info:
        trainer.train()
    assert info.value.previous == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    assert ck.problem(tmp_path / "checkpoint-2") is None


# -- export: which checkpoint, which format ------------------------------------------------------------

def test_export_picks_the_newest_complete_checkpoint_and_knows_its_format(tmp_path: Path):
    from hfhpc.export import ExportError, find_checkpoint, source_format

    with pytest.raises(ExportError, match="has no complete checkpoint"):
        find_checkpoint(tmp_path)
    old = _make(tmp_path, 2, files={"pytorch_model_fsdp_0/__0_0.distcp": b"d", "optimizer_0/__0_0.distcp": b"o"})
    _make(tmp_path, 4, marker=False)
    assert find_checkpoint(tmp_path) == old and source_format(old) == "fsdp-sharded"
    assert find_checkpoint(tmp_path, "2") == old and find_checkpoint(tmp_path, "checkpoint-2") == old
    with pytest.raises(ExportError, match="is not a complete checkpoint: no hfhpc-complete.json"):
        find_checkpoint(tmp_path, "4")
    for files, fmt in [({"model.safetensors": b"x"}, "safetensors"), ({"pytorch_model_fsdp.bin": b"x"}, "fsdp-full"),
                       ({"adapter_model.safetensors": b"x"}, "adapter"), ({"pytorch_model.bin": b"x"}, "torch-bin")]:
        path = tmp_path / fmt
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        assert source_format(path) == fmt
    with pytest.raises(ExportError, match="holds no model weights"):
        source_format(_make(tmp_path, 9, files={"trainer_state.json": b"{}"}))


# -- trust: sha256 in the marker, verified before a resume ---------------------------------------------

def test_the_marker_records_each_files_sha256(tmp_path: Path):
    import hashlib

    path = _make(tmp_path, 4, files={"a.bin": b"12345", "sub/b.bin": b"xy"})
    marker = json.loads((path / ck.MARKER).read_text())
    assert marker["version"] == 2
    assert marker["sha256"] == {"a.bin": hashlib.sha256(b"12345").hexdigest(), "sub/b.bin": hashlib.sha256(b"xy").hexdigest()}


def test_a_flipped_block_of_the_same_size_is_caught_by_verification_and_skipped(tmp_path: Path):
    older = _make(tmp_path, 4, files={"model.safetensors": os.urandom(20000), "optimizer.pt": os.urandom(20000)})
    newer = _make(tmp_path, 8, files={"model.safetensors": os.urandom(20000), "optimizer.pt": os.urandom(20000)})
    with open(newer / "optimizer.pt", "r+b") as f:  # 4 KiB flipped in place: same size, other bytes
        f.seek(8192)
        block = f.read(4096)
        f.seek(8192)
        f.write(bytes(b ^ 0xFF for b in block))
    assert ck.problem(newer) is None  # sizes alone cannot tell
    assert ck.problem(newer, verify=True) == "optimizer.pt does not match the sha256 written with it (changed on disk since the save)"
    assert ck.last_complete(tmp_path, verify=True).path == older
    warnings: list[str] = []
    found = ck.resume_point(tmp_path, warn=warnings.append)
    assert found.path == older
    assert warnings == ["warning: skipping checkpoint-8: optimizer.pt does not match the sha256 written with it "
                        "(changed on disk since the save); moved aside to checkpoint-8.corrupt; resuming from "
                        "checkpoint-4 instead"]
    # Set aside: no longer a checkpoint to anything (retention, the other ranks, export), kept to be looked at.
    assert [p.name for _, p in ck.checkpoint_dirs(tmp_path)] == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-8.corrupt" / "optimizer.pt").is_file()


def test_a_marker_written_before_hashes_is_checked_by_size(tmp_path: Path):
    path = _make(tmp_path, 4)
    marker = json.loads((path / ck.MARKER).read_text())
    del marker["sha256"]
    marker["version"] = 1
    (path / ck.MARKER).write_text(json.dumps(marker))
    assert ck.problem(path, verify=True) is None


def test_a_marker_naming_a_file_outside_its_checkpoint_is_refused(tmp_path: Path):
    path = _make(tmp_path, 4)
    (tmp_path / "secret").write_bytes(b"s" * 6)
    marker = json.loads((path / ck.MARKER).read_text())
    marker["files"]["../secret"] = 6
    (path / ck.MARKER).write_text(json.dumps(marker))
    assert ck.problem(path) == f"{ck.MARKER} names '../secret', outside the checkpoint"
