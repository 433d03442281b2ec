"""``hfhpc submit SPEC [--dry-run]``: write ``RUN_DIR/job.sbatch`` and submit it to SLURM."""

from __future__ import annotations

import argparse
import sys


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="job spec (YAML); its lockfile pins the revisions the job uses")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    p.add_argument("--parsable", action="store_true", help="print only the job id (for scripts)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import scheduler
    from hfhpc.spec import load_spec
    from hfhpc.store.location import store_for_spec

    executor = scheduler()
    spec = load_spec(args.spec)
    job = executor.prepare(spec, store_for_spec(spec, args.store))
    if args.dry_run:
        sys.stdout.write(executor.script(job))
        return 0
    from hfhpc.cli.status_cmd import duration

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
