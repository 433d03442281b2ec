"""``hfhpc doctor``: versions, GPUs, SLURM, store location and quota, offline and xet variables."""

from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from hfhpc.doctor import gather, render

    info = gather(args.store_path)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
