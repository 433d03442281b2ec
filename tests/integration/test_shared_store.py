"""A lab's shared store: group-writable when the store folder is setgid and the umask says so, and
usable read-only (a project space the job may not write) by check, run and exec."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MODEL_ID, SENTIMENT_DATASET_ID
from tests.conftest import hfhpc
from tests.helpers import tree_digest, write_spec

LOAD = f"""\
import datasets, evaluate
from transformers import AutoModelForCausalLM, AutoTokenizer
ds = datasets.load_dataset({SENTIMENT_DATASET_ID!r}, split="train")
lengths = ds.map(lambda row: {{"n": len(row["text"])}})
AutoTokenizer.from_pretrained({MODEL_ID!r}); AutoModelForCausalLM.from_pretrained({MODEL_ID!r})
print("rows", lengths.num_rows, evaluate.load("accuracy").compute(predictions=[1], references=[1])["accuracy"], flush=True)
"""


def _read_only_mounts_work() -> bool:
    probe = "d=$(mktemp -d) && mount --bind -o ro $d $d && ! touch $d/x 2>/dev/null"
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_only(store: Path, *args: str) -> subprocess.CompletedProcess:
    """``hfhpc ARGS`` with ``store`` bind-mounted read-only in a private mount namespace: EROFS for
    every writer, root included (``chmod a-w`` does not stop root)."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(store), sys.executable, "-m", "hfhpc", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not _read_only_mounts_work(), reason="needs unshare -m and mount --bind (root)")
def test_a_read_only_store_is_checked_and_runs(hub, tmp_path: Path):
    (tmp_path / "load.py").write_text(LOAD)
    spec = write_spec(tmp_path / "job.yaml", f"""\
name: ro
recipe: script
script: load.py
model: {MODEL_ID}
dataset: {{id: {SENTIMENT_DATASET_ID}, split: train}}
metrics: [accuracy]
resources: {{gpus_per_node: 0}}
""")
    store = tmp_path / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    (store / "hfhpc" / "verified.json").unlink()  # check must hash again, and cannot keep the result
    before = tree_digest(store)

    checked = _read_only(store, "check", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ready: 3 assets verified" in checked.stdout
    ran = _read_only(store, "run", str(spec))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "rows 256 1.0" in ran.stdout
    assert tree_digest(store) == before


def _group_other_than_mine() -> int | None:
    mine = os.getgid()
    for g in grp.getgrall():
        if g.gr_gid not in (0, mine) and g.gr_name in ("staff", "users", "plugdev", "audio"):
            return g.gr_gid
    return None


@pytest.mark.skipif(os.geteuid() != 0 or _group_other_than_mine() is None, reason="needs root to give the store another group")
def test_a_setgid_store_gets_the_folders_group_and_the_umasks_modes(hub, tmp_path: Path):
    gid = _group_other_than_mine()
    store = tmp_path / "store"
    store.mkdir()
    os.chown(store, -1, gid)
    store.chmod(0o2775)
    spec = write_spec(tmp_path / "job.yaml", f"""\
name: shared
recipe: sft
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft}}
metrics: [accuracy]
train: {{max_length: 128, max_steps: 2, per_device_batch_size: 4, save_steps: 100}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0, cpus_per_gpu: 1}}
""")
    old = os.umask(0o002)  # the children inherit it, as from a login shell's umask
    try:
        out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
        assert out.returncode == 0, out.stderr
        ran = hfhpc("--store", str(store), "run", str(spec), timeout=600)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    finally:
        os.umask(old)
    assert list((store / "hfhpc" / "prepared").iterdir())  # the run's prepared data sits in the store
    wrong = []
    for root, dirs, files in os.walk(store):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            want = 0o2070 if stat.S_ISDIR(st.st_mode) else 0o060
            if st.st_gid != gid or st.st_mode & want != want:
                wrong.append(f"{path.relative_to(store)} {stat.filemode(st.st_mode)} gid {st.st_gid}")
    assert not wrong, "\n".join(wrong[:20])
