"""Start, stop and inspect the throwaway SLURM test cluster by hand or from CI.

    python -m tests.cluster.cli start --nodes 2   # leaves it running; fixtures reuse it
    eval "$(python -m tests.cluster.cli env)"     # point sbatch/squeue/sacct at it
    python -m tests.cluster.cli status
    python -m tests.cluster.cli stop
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tests.cluster.slurm import SlurmCluster, SlurmClusterError, cleanup_leftovers, install


def _start(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    installed = install()
    if installed:
        print(f"installed {' '.join(installed)} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    t1 = time.monotonic()
    cluster = SlurmCluster(args.name).start(args.nodes, netns=False if args.no_netns else None)
    cluster.detach()
    print(f"started in {time.monotonic() - t1:.1f} s", file=sys.stderr)
    print(cluster.status())
    print(f"export SLURM_CONF={shlex.quote(str(cluster.conf))}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    cluster = SlurmCluster(args.name)
    if not args.force:
        # A test session that owns the cluster holds the lock; never pull it from under it.
        cluster.acquire_lock(timeout=args.wait)
    try:
        t0 = time.monotonic()
        # Everything of ours goes, whatever its name or state: that is what "stop" means
        # to a human after a crash, too.
        cleanup_leftovers(cluster.root)
        print(f"stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    finally:
        cluster.release_lock()
    return 0


def _status(args: argparse.Namespace) -> int:
    loaded = SlurmCluster.load(args.name)
    if loaded is None:
        print("no cluster")
        return 1
    cluster, info = loaded
    running = cluster.is_running()
    if info["detached"]:
        owner = "detached (started by `cli start`)"
    elif Path(f"/proc/{info['owner_pid']}").exists():
        owner = f"owned by pid {info['owner_pid']}"
    else:
        owner = f"left over by pid {info['owner_pid']}, which died (the next start or stop cleans up)"
    print(f"{'running' if running else 'NOT running'}, {owner}, nodes {' '.join(cluster.nodes)}")
    if running:
        print(cluster.status())
    return 0 if running else 1


def _env(args: argparse.Namespace) -> int:
    print(f"export SLURM_CONF={shlex.quote(str(SlurmCluster(args.name).conf))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--name", default="hfhpc", help="cluster name (state dir /tmp/hfhpc-slurm/NAME)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster and leave it running")
    start.add_argument("--nodes", type=int, default=2)
    start.add_argument("--no-netns", action="store_true",
                       help="all nodes on the host network (one host name, slurmd on several ports)")  # fmt: skip
    stop = sub.add_parser("stop", help="stop the cluster and remove all its traces")
    stop.add_argument("--wait", type=float, default=0,
                      help="seconds to wait for a test session that holds the cluster (default: none)")  # fmt: skip
    stop.add_argument("--force", action="store_true", help="stop it even if a test session holds it")
    sub.add_parser("status", help="is it running; sinfo and squeue")
    sub.add_parser("env", help="print the export line for SLURM_CONF")
    args = parser.parse_args(argv)
    handler = {"start": _start, "stop": _stop, "status": _status, "env": _env}[args.command]
    try:
        return handler(args)
    except SlurmClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
