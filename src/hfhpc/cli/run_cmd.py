"""``hfhpc run SPEC``: run the job now on this machine, sealed and offline (no SLURM needed)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (staged: its lockfile must exist)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import LocalExecutor
    from hfhpc.spec import load_spec

    executor = LocalExecutor()
    job = executor.prepare(load_spec(args.spec), args.store_path)
    print(f"hfhpc: run folder {job.run_dir}", flush=True)
    return executor.start(job)
