"""`stage`, `run` and `submit` refuse, before anything is downloaded, queued or started, what needs no
GPU to find."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfhpc.env import state_dir
from hfhpc.errors import SpecError
from hfhpc.preflight import FIELDS_CACHE, check_run_dir, check_trainer_keys
from hfhpc.spec import load_spec
from tests.conftest import hfhpc


@pytest.fixture(autouse=True)
def _shared_fields_cache(tmp_path_factory, monkeypatch):
    # One import of TRL for the whole module: the field lists are kept in the state folder.
    monkeypatch.setenv("HFHPC_STATE_DIR", str(tmp_path_factory.getbasetemp() / "preflight-state"))


def _spec(tmp_path: Path, train: str = "", output_dir: str = "out", recipe: str = "sft") -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(f"name: j\nrecipe: {recipe}\nmodel: org/m\ndataset: org/d\noutput_dir: {output_dir}\n"
                 "resources: {gpus_per_node: 0}\n" + (f"train: {train}\n" if train else ""))
    return p


@pytest.mark.parametrize("command", [["submit", "--dry-run"], ["run"], ["stage"]])
def test_a_misspelt_trainer_key_stops_stage_run_and_submit_with_a_suggestion(tmp_path: Path, command):
    spec = _spec(tmp_path, "{max_lenght: 2048}")
    # stage: refused before any download (the endpoint answers nothing: a download would fail otherwise).
    out = hfhpc(*command, str(spec), *(["--endpoint", "http://127.0.0.1:9"] if command == ["stage"] else []))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "train.max_lenght: unknown key (did you mean `max_length`?)" in out.stderr
    assert "Traceback" not in out.stderr and "TypeError" not in out.stderr
    assert not (tmp_path / "out").exists()  # nothing written, nothing queued
    assert not (tmp_path / "job.lock").exists()  # nothing staged


def test_trainer_config_fields_pass_through(tmp_path: Path):
    check_trainer_keys(load_spec(_spec(tmp_path, "{warmup_steps: 10, lr_scheduler_type: cosine}")))
    check_trainer_keys(load_spec(_spec(tmp_path, "{weight_decay: 0.01}", recipe="classify")))
    with pytest.raises(SpecError, match="did you mean `weight_decay`"):
        check_trainer_keys(load_spec(_spec(tmp_path, "{weight_decy: 0.01}", recipe="classify")))
    cached = json.loads((state_dir() / FIELDS_CACHE).read_text())
    assert sorted(k.split()[1] for k in cached) == ["transformers:TrainingArguments", "trl:SFTConfig"]


@pytest.mark.parametrize("output_dir", ["/proc/hfhpc-run", "/sys/x", "/dev/null/run"])
def test_run_folder_on_a_kernel_file_system_is_refused(tmp_path: Path, output_dir):
    with pytest.raises(SpecError) as e:
        check_run_dir(load_spec(_spec(tmp_path, output_dir=output_dir)))
    assert e.value.key == "output_dir" and e.value.exit_code == 2


def test_unwritable_run_folder_is_a_one_line_error(tmp_path: Path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write anywhere")
        out = hfhpc("submit", "--dry-run", str(_spec(tmp_path, output_dir=str(locked / "run"))))
        assert out.returncode == 2 and "output_dir" in out.stderr and "not writable" in out.stderr
        assert "internal error" not in out.stderr
    finally:
        locked.chmod(0o700)


def test_a_file_in_the_way_of_the_run_folder_is_refused(tmp_path: Path):
    (tmp_path / "afile").write_text("x")
    out = hfhpc("run", str(_spec(tmp_path, output_dir="afile/run")))
    assert out.returncode == 2 and "is a file, not a folder" in out.stderr and "internal error" not in out.stderr
