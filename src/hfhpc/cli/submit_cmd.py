"""``hfhpc submit SPEC [--dry-run]``: write ``RUN_DIR/job.sbatch`` and submit it to SLURM."""

from __future__ import annotations

import argparse
import sys


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="job spec (YAML); its lockfile pins the revisions the job uses")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    p.add_argument("--parsable", action="store_true", help="print only the job id (for scripts)")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a new run folder (RUN_DIR-2, -3, …) instead of resuming or refusing")


def run(args: argparse.Namespace) -> int:
    from hfhpc.cli.run_cmd import already_complete
    from hfhpc.launch.executor import scheduler
    from hfhpc.run.jobfile import COMPLETE
    from hfhpc.run.lock import RunLock
    from hfhpc.spec import load_spec
    from hfhpc.store.location import store_for_spec

    executor = scheduler()
    spec = load_spec(args.spec)
    job = executor.resolve(spec, store_for_spec(spec, args.store), fresh=args.fresh)
    if args.dry_run:
        executor.check(job)
        sys.stdout.write(executor.script(job))
        return 0
    from hfhpc.cli.status_cmd import duration

    # Held while the folder is checked and the job submitted: not while a local run trains in it.
    with RunLock(job.run_dir):
        if executor.check(job) == COMPLETE:
            print(already_complete(job.run_dir, "submit", args.spec))
            return 0
        record = executor.start(job)
    if args.parsable:
        print(record.job_id)
        return 0
    print(f"submitted job {record.job_id} ({record.name}): {record.nodes} node(s), "
          f"time limit {duration(record.time_limit_s)}")
    print(f"  run dir: {record.run_dir}")
    print(f"  log:     {executor.log_path(job.run_dir, record.job_id, record.name)}")
    print(f"  follow:  hfhpc logs -f {record.job_id}    progress: hfhpc status {record.job_id}")
    return 0
