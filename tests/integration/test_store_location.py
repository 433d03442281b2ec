"""Which store a job uses when the shell does not say: the one its lockfile was staged into."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hfhpc.demo.build import MODEL_ID
from tests.conftest import hfhpc
from tests.helpers import write_spec

SCRIPT = f"from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained({MODEL_ID!r})\nprint('loaded', flush=True)\n"


def _new_shell(home: Path, **extra: str) -> dict[str, str]:
    """A login shell that never set HFHPC_STORE or HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFHPC_"))}
    env.update(HOME=str(home), HFHPC_STATE_DIR=str(home / "state"), **extra)
    return env


@pytest.fixture(scope="module")
def staged(hub, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("job")
    (folder / "load.py").write_text(SCRIPT)
    spec = write_spec(folder / "job.yaml", f"name: pinned\nrecipe: script\nscript: load.py\nmodel: {MODEL_ID}\nresources: {{gpus_per_node: 0}}\n")
    store = folder / "project" / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    return spec, store


def test_the_lockfile_records_the_store_it_was_staged_into(staged):
    spec, store = staged
    assert json.loads(spec.with_suffix(".lock").read_text())["store"] == str(store)


def test_check_submit_and_run_use_the_lockfiles_store_in_a_new_shell(staged, tmp_path: Path):
    spec, store = staged
    env = _new_shell(tmp_path / "home")
    checked = hfhpc("check", str(spec), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ready: 1 assets verified" in checked.stdout
    script = hfhpc("submit", "--dry-run", str(spec), env=env)
    assert script.returncode == 0, script.stderr
    assert f"export HF_HOME={store}" in script.stdout
    assert ".cache/huggingface" not in script.stdout
    ran = hfhpc("run", str(spec), env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "loaded" in ran.stdout
    assert not (tmp_path / "home" / ".cache" / "huggingface").exists()


@pytest.mark.parametrize("command", ["check", "submit", "run"])
def test_a_given_store_without_the_assets_stops_without_sending_to_stage(staged, tmp_path: Path, command: str):
    spec, store = staged
    other = tmp_path / "other-store"
    env = _new_shell(tmp_path / "home", HFHPC_STORE=str(other))
    args = [command, "--dry-run", str(spec)] if command == "submit" else [command, str(spec)]
    out = hfhpc(*args, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"staged into {store}, the store is now {other} (from $HFHPC_STORE)" in out.stderr
    assert "hfhpc stage" not in out.stdout + out.stderr
    flag = hfhpc("--store", str(other), *args, env=_new_shell(tmp_path / "home"))
    assert flag.returncode == 1
    assert f"the store is now {other} (from --store)" in flag.stderr


def test_a_given_store_that_holds_the_assets_is_used(staged, tmp_path: Path):
    import shutil

    spec, store = staged
    copy = tmp_path / "copy"
    shutil.copytree(store, copy, symlinks=True)
    out = hfhpc("--store", str(copy), "check", str(spec), env=_new_shell(tmp_path / "home"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_stage_of_one_asset_says_where_its_lockfile_went(hub, tmp_path: Path):
    cwd = tmp_path / "here"
    cwd.mkdir()
    out = hfhpc("--store", str(tmp_path / "store"), "stage", "--model", MODEL_ID, env=dict(os.environ, HF_ENDPOINT=hub.url), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert f"lockfile: {cwd / 'hfhpc.lock'} (the default in the current folder; --lock FILE to choose)" in out.stdout
