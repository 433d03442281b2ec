"""Compiled kernels kept in the store (hfhpc.recipes.compilecache): the first process compiles and
writes them; the next, with an empty local compile cache (another node), loads them and compiles
nothing; a job of another shape adds its kernels without losing the others."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# One rank's life: load the store's files, run a compiled layer forward and backward, save what is new.
WORKER = """
import sys, torch
from pathlib import Path
from hfhpc.recipes.compilecache import CompileCache
cache = CompileCache(Path(sys.argv[1]), "torch-cpu-", writer=True)
cache.load()
width = int(sys.argv[2])
layer = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, width))
forward = torch.compile(layer.forward, dynamic=True)
for rows in (5, 9):
    forward(torch.randn(rows, width)).square().sum().backward()
cache.report()
print("saved", cache.save_if_new())
"""


# A job that saves twice: after its first step, and after a graph it compiled later (another shape).
TWO_SAVES = """
import sys, torch
from pathlib import Path
from hfhpc.recipes.compilecache import CompileCache
cache = CompileCache(Path(sys.argv[1]), "torch-cpu-", writer=True)
cache.load()
for width in (32, 48):
    layer = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, width))
    torch.compile(layer.forward, dynamic=False)(torch.randn(5, width)).square().sum().backward()
    print("saved", cache.save_if_new())
cache.report()
"""


def _rank(folder: Path, local_cache: Path, width: int = 32, worker: str = WORKER) -> str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(local_cache), PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", worker, str(folder), str(width)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.bin")}


@pytest.fixture(scope="module")
def starts(tmp_path_factory: pytest.TempPathFactory):
    """Four jobs, each on a fresh node: width 32, width 32 again, width 48, width 32 once more."""
    tmp = tmp_path_factory.mktemp("compilecache")
    folder = tmp / "store" / "model@abc"
    logs, files = [], []
    for i, width in enumerate((32, 32, 48, 32)):
        logs.append(_rank(folder, tmp / f"node{i}", width))
        files.append(_files(folder))
    return folder, logs, files


def test_first_start_compiles_and_writes_its_kernels_to_the_store(starts):
    folder, logs, files = starts
    assert "compile cache: none yet" in logs[0]
    assert re.search(r"compile: \d+\.\d s compiling", logs[0]) and "graphs compiled" in logs[0], logs[0]
    assert len(files[0]) == 1 and f"saved {folder}" in logs[0]
    assert not list(folder.glob("*.tmp*"))


def test_next_start_on_an_empty_node_loads_them_and_compiles_nothing(starts):
    folder, logs, files = starts
    assert re.search(r"compile cache: [1-9]\d* entries \(.*inductor.*\) from 1 file\(s\) in " + re.escape(str(folder)), logs[1]), logs[1]
    assert "nothing compiled" in logs[1] and "saved None" in logs[1], logs[1]
    assert files[1] == files[0]  # nothing new: nothing written


def test_a_job_of_another_shape_adds_its_kernels_without_losing_the_others(starts):
    _, logs, files = starts
    assert "graphs compiled" in logs[2]
    assert len(files[2]) == 2 and files[0].items() <= files[2].items()  # its own file beside the first
    assert "nothing compiled" in logs[3] and "saved None" in logs[3], logs[3]


def test_a_damaged_file_means_compiling_again_and_replacing_it(tmp_path: Path):
    damaged = tmp_path / "torch-cpu-0000.bin"
    damaged.write_bytes(b"not a cache")
    out = _rank(tmp_path, tmp_path / "node")
    assert "is not one this PyTorch reads: skipped" in out and "graphs compiled" in out, out
    assert not damaged.exists() and len(_files(tmp_path)) == 1


def test_a_job_that_saves_twice_leaves_a_file_that_loads_whole(tmp_path: Path):
    # PyTorch appends each save's entries to the process's artifacts as another group per kind and
    # loads one group per kind: unmerged, the second file loses the first step's kernels.
    first = _rank(tmp_path, tmp_path / "node0", worker=TWO_SAVES)
    assert first.count(f"saved {tmp_path}") == 2 and len(_files(tmp_path)) == 1, first
    again = _rank(tmp_path, tmp_path / "node1", worker=TWO_SAVES)
    assert "nothing compiled" in again and "saved None" in again and "graphs compiled" not in again, again


def test_kernels_from_the_nodes_own_cache_reach_the_store(tmp_path: Path):
    # A node whose local compile cache already has the kernels (an earlier job there, before this
    # store had any): the job compiles nothing, and still leaves them in the store for other nodes.
    _rank(tmp_path / "elsewhere", tmp_path / "node0")
    folder = tmp_path / "store"
    warm = _rank(folder, tmp_path / "node0")
    assert "nothing compiled" in warm and f"saved {folder}" in warm, warm
    fresh = _rank(folder, tmp_path / "node1")
    assert "nothing compiled" in fresh and "saved None" in fresh, fresh
