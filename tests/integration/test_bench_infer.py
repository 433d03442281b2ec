"""benchmarks/bench_infer.py end to end on CPU with the tiny shape: build, serve, stage and `hfhpc run`
of the infer recipe's defaults; the record carries the fields the results table is made from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_infer.py"


def test_the_infer_benchmark_runs_the_recipe_defaults_and_records_them(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    out = tmp_path / "infer.json"
    ran = subprocess.run([sys.executable, str(BENCH), "--dir", str(tmp_path / "b"), "--shape", "tiny", "--rows", "8",
                          "--new", "8", "--variants", "hfhpc-defaults", "--cpu", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["hfhpc-defaults"]
    r = rows[0]
    assert r["rows"] == 8 and r["new_tokens"] == 64 and r["new_tokens_per_s"] > 0  # min_new_tokens = max_new_tokens
    assert r["engine"] == "generate" and r["defaults"] is True and r["gpu"].startswith("cpu")
