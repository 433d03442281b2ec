"""``hfhpc report RUN_DIR``: loss, learning-rate, throughput and MFU plots and one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder (the spec's output_dir)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="where to write the report (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.report import build_report

    report = build_report(args.run_dir, args.output)
    for path in report.plots.values():
        print(f"plot:   {path}")
    if report.eta is not None and report.eta.remaining_s is not None:
        print(f"time:   {report.eta.render()}")
    print(f"report: {report.html}")
    return 0
