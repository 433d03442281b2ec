"""benchmarks/bench_dpo.py end to end on CPU with the tiny shape: build, TRL's DPOTrainer with its
defaults, then serve, stage and `hfhpc run` of the dpo recipe stopped after its steps; both records
carry the fields the results table is made from, counting the same tokens of the same pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_dpo.py"


def test_the_dpo_benchmark_runs_trl_and_hfhpc_and_records_the_same_tokens(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    run = lambda *a: subprocess.run([sys.executable, str(BENCH), *a], capture_output=True, text=True, env=env, timeout=600)  # noqa: E731
    built = run("build", "--shape", "tiny", "--dir", str(tmp_path / "b"), "--pairs", "100", "--seq", "128")
    assert built.returncode == 0, built.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    common = ("--shape", "tiny", "--dir", str(tmp_path / "b"), "--seq", "128", "--bs", "2", "--tag", "t", "--out", str(out))
    trl = run("trl", *common, "--steps", "7")
    assert trl.returncode == 0, trl.stdout[-3000:] + trl.stderr[-3000:]
    ran = run("hfhpc", *common, "--gpus", "0", "--steps", "20", "--stop-after", "7")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    a = json.loads((out / "dpo_trl_tiny_t.json").read_text())
    b = json.loads((out / "dpo_hfhpc_tiny_t.json").read_text())
    for r in (a, b):
        for key in ("recipe", "shape", "gpu", "tokens_per_s_per_gpu", "peak_mem_gib", "step_s_median",
                    "time_to_first_step_s", "real_tokens_per_step", "versions"):
            assert key in r, key
        assert r["shape"] == "tiny" and r["gpu"].startswith("cpu") and r["tokens_per_s_per_gpu"] > 0
        assert r["time_to_first_step_s"] > 0 and r["versions"]["trl"]
    assert (a["recipe"], b["recipe"]) == ("trl", "hfhpc")
    assert a["attention"] == "sdpa" and a["activation_checkpointing"] is True  # DPOConfig's defaults
    # TRL's own tokenization and hfhpc's prepared pairs: the same pairs in the same order, the same tokens.
    assert a["real_tokens_per_step"] == b["real_tokens_per_step"]
    assert 7 <= b["steps"] < 20 and b["ready_s"] > 0  # stopped early, no final save
    assert not (tmp_path / "b" / "jobs" / "bench-dpo-tiny-t" / "run" / "model").exists()
    log = "".join(p.read_text() for p in (tmp_path / "b" / "jobs" / "bench-dpo-tiny-t" / "run" / "logs").glob("*.out"))
    assert "padding-free batches: policy and reference packed" in log
