"""``hfhpc run SPEC``: run the job now on this machine, sealed and offline (no SLURM needed)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (staged: its lockfile must exist)")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a new run folder (RUN_DIR-2, -3, …) instead of resuming or refusing")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import LocalExecutor
    from hfhpc.run.jobfile import COMPLETE, prepare_run_dir
    from hfhpc.run.lock import RunLock
    from hfhpc.spec import load_spec
    from hfhpc.store.location import store_for_spec

    executor = LocalExecutor()
    spec = load_spec(args.spec)
    job = executor.resolve(spec, store_for_spec(spec, args.store), fresh=args.fresh)
    # Held from the check to the end: a second `hfhpc run` of the same folder is refused, not mixed in.
    with RunLock(job.run_dir):
        if executor.check(job) == COMPLETE:
            print(already_complete(job.run_dir, "run", args.spec))
            return 0
        prepare_run_dir(job)
        print(f"hfhpc: run folder {job.run_dir}", flush=True)
        return executor.start(job)


def already_complete(run_dir, command: str, spec: str) -> str:
    return f"hfhpc: {run_dir} is already complete; `hfhpc {command} {spec} --fresh` starts over in a new folder"
