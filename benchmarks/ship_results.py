"""Copy the GPU training results that make ``hfhpc plan``'s throughput anchors into the package
(``src/hfhpc/plan/measured.json``), so that an installed hfhpc plans from them. Run it after adding a
result to benchmarks/results; tests/unit/test_plan.py fails while the copy is behind."""

from __future__ import annotations

from pathlib import Path

from hfhpc.plan.throughput import write_measured

if __name__ == "__main__":
    print(write_measured(Path(__file__).resolve().parent / "results"))
