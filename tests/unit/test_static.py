"""A static check of the project's Python: a name used but never defined (or imported and never
used) is found here, not in a job hours into the queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pyflakes_finds_nothing():
    folders = [f for f in ("src", "benchmarks", "tests", "examples") if (ROOT / f).is_dir()]
    out = subprocess.run([sys.executable, "-m", "pyflakes", *folders], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
