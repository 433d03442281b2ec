"""benchmarks/bench_sft.py end to end on CPU with the tiny shape: build, serve, stage, `hfhpc run`,
stopped after its steps, and a results record with the fields the README's table is made from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_sft.py"


def test_the_sft_benchmark_runs_and_records_what_the_readme_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    run = lambda *a: subprocess.run([sys.executable, str(BENCH), *a], capture_output=True, text=True, env=env, timeout=600)  # noqa: E731
    built = run("build", "--shape", "tiny", "--dir", str(tmp_path / "b"), "--docs", "200", "--seq", "256")
    assert built.returncode == 0, built.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    ran = run("run", "--shape", "tiny", "--gpus", "0", "--dir", str(tmp_path / "b"), "--seq", "256", "--bs", "2",
              "--steps", "20", "--stop-after", "7", "--tag", "t", "--out", str(out))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    result = json.loads((out / "hfhpc_tiny_w0_t.json").read_text())
    for key in ("recipe", "shape", "gpu", "world", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib", "step_s_median",
                "time_to_first_step_s", "versions"):
        assert key in result, key
    assert result["recipe"] == "hfhpc" and result["shape"] == "tiny" and result["gpu"].startswith("cpu")
    assert result["tokens_per_s_per_gpu"] > 0 and 7 <= result["steps"] < 20  # stopped early, no final save
    assert result["wall_s"] is None and result["ready_s"] > 0 and result["compile_cache"] == "cold"
    assert result["job_ready_s"] >= result["ready_s"] - 0.2  # the node agent starts before the rank (0.1 s rounding)
    assert not (tmp_path / "b" / "jobs" / "bench-tiny-g0-t" / "run" / "model").exists()
    assert result["versions"]["trl"] and result["versions"]["torch"]
