"""``hfhpc logs JOB [-f]``: print a job's log, or follow it until the job ends."""

from __future__ import annotations

import argparse
import shutil
import sys

from hfhpc.errors import HfhpcError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="job id, or the job's run folder")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends (through requeues)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import scheduler
    from hfhpc.launch.jobs import follow_log, job_status

    executor = scheduler()
    status = job_status(args.job, executor)
    out = sys.stdout.buffer
    if args.follow:
        try:
            for chunk in follow_log(status, executor):
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            return 0  # stopping to follow is not an error
        print(f"hfhpc: job {status.job_id} has ended", file=sys.stderr)
        return 0
    path = status.log_path
    if path is None or not path.exists():
        raise HfhpcError(f"no log yet for job {status.job_id or status.run_dir} ({status.state})",
                         f"a pending job writes {path or 'logs/'} once it starts: `hfhpc logs -f {args.job}` waits for it")
    with open(path, "rb") as f:
        shutil.copyfileobj(f, out)
    out.flush()
    return 0
