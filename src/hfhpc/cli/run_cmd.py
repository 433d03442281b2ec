"""``hfhpc run SPEC``: run the job now on this machine, sealed and offline (no SLURM needed)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (staged: its lockfile must exist)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import LocalExecutor
    from hfhpc.spec import load_spec

    executor = LocalExecutor()
    from hfhpc.store.location import store_for_spec

    spec = load_spec(args.spec)
    job = executor.prepare(spec, store_for_spec(spec, args.store))
    print(f"hfhpc: run folder {job.run_dir}", flush=True)
    return executor.start(job)
