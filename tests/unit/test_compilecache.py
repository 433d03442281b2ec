"""Compiled kernels kept in the store (hfhpc.recipes.compilecache): the first process compiles and
writes them; the next, with an empty local compile cache (another node), loads them and compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One rank's life: load the store's file, run a compiled layer forward and backward, save what is new.
WORKER = """
import sys, torch
from pathlib import Path
from hfhpc.recipes.compilecache import CompileCache
cache = CompileCache(Path(sys.argv[1]), writer=True)
cache.load()
layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
forward = torch.compile(layer.forward, dynamic=True)
for rows in (5, 9):
    forward(torch.randn(rows, 32)).square().sum().backward()
cache.report()
print("saved", cache.save_if_new())
"""


def _rank(path: Path, local_cache: Path) -> str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(local_cache), PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", WORKER, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("compilecache")
    path = tmp / "store" / "model@abc" / "torch-cpu.bin"
    first = _rank(path, tmp / "node1")
    written = path.read_bytes()
    again = _rank(path, tmp / "node2")
    return path, first, written, again


def test_first_start_compiles_and_writes_its_kernels_to_the_store(two_starts):
    path, first, written, _ = two_starts
    assert "compile cache: none yet" in first
    assert "graphs compiled" in first and "saved True" in first, first
    assert len(written) > 0 and not list(path.parent.glob("*.tmp*"))


def test_next_start_on_an_empty_node_loads_them_and_compiles_nothing(two_starts):
    path, _, written, again = two_starts
    assert f"entries from {path}" in again, again
    assert "nothing compiled" in again and "saved False" in again, again
    assert path.read_bytes() == written  # nothing new: the file is left as it was


def test_a_damaged_file_means_compiling_again_and_replacing_it(tmp_path: Path):
    path = tmp_path / "torch-cpu.bin"
    path.write_bytes(b"not a cache")
    out = _rank(path, tmp_path / "node")
    assert "is not one this PyTorch reads" in out and "graphs compiled" in out and "saved True" in out, out
    assert path.read_bytes() != b"not a cache"
