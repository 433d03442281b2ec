"""``hfhpc cancel JOB``: cancel a submitted job (by id or run folder)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="job id, or the job's run folder")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.jobs import cancel

    job_id = cancel(args.job)  # through the executor of the scheduler that took the job
    print(f"cancelled job {job_id}; its checkpoints stay in the run folder (`hfhpc submit` again resumes)")
    return 0
