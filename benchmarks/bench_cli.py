"""Login-node CLI latency: `hfhpc --help` (goal ≤ 0.25 s) and a no-op `hfhpc stage` of a staged
spec, each against a bare `python -c pass` on the same machine.

    python benchmarks/bench_cli.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def timed(cmd: list[str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    py = sys.executable
    baseline = timed([py, "-c", "pass"], args.repeat)
    help_s = timed([py, "-m", "hfhpc", "--help"], args.repeat)
    heavy = subprocess.run(
        [py, "-c", "import sys\nfrom hfhpc.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
         "print(sorted(m for m in ('torch','transformers','datasets','evaluate','trl','accelerate','huggingface_hub') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    result = {
        "python_startup_s_median": round(statistics.median(baseline), 4),
        "help_s_median": round(statistics.median(help_s), 4),
        "help_s_all": [round(x, 4) for x in help_s],
        "goal_help_s": 0.25,
        "heavy_modules_imported_by_help": heavy,
    }
    print(write_result("cli_latency", result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
