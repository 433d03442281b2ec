"""``hfhpc exec [--spec SPEC] [--netns] -- CMD…``: run any command sealed, with the store's offline environment.

A bare ``python`` or ``python3`` is the Python hfhpc runs with: the one whose packages the user
staged for, not whichever comes first on ``PATH`` (often a system Python without torch).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hfhpc.errors import EXIT_USAGE, UsageError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", metavar="SPEC", help="job spec: its allowed hosts join the seal")
    p.add_argument("--no-seal", action="store_true", help="offline variables only, no network guard")
    p.add_argument("--netns", action="store_true",
                   help="also run in a network namespace of its own: no host at all beyond its own loopback")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments")


BARE_PYTHON = ("python", "python3")


def run(args: argparse.Namespace) -> int:
    from hfhpc.offline.environ import offline_environ

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("no command given", "write it after `--`, e.g. hfhpc exec -- python train.py")
    if cmd[0] in BARE_PYTHON:
        cmd = [sys.executable, *cmd[1:]]
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        raise UsageError(f"command not found: {cmd[0]}")
    allow: list[str] = []
    store = args.store_path
    if args.spec:
        from hfhpc.spec import load_spec
        from hfhpc.store.location import store_for_spec

        spec = load_spec(args.spec)
        allow = list(spec.site.allow_hosts)
        store = store_for_spec(spec, args.store)
    env = offline_environ(store, allow_hosts=allow, seal=not args.no_seal)
    preexec = None
    if args.netns:
        from hfhpc.offline.netns import check_netns, enter_private_network

        check_netns(allow)
        preexec = enter_private_network
    sys.stdout.flush()
    import tempfile

    from hfhpc.store import readonly

    with tempfile.TemporaryDirectory(prefix="hfhpc-exec-") as scratch:
        if not readonly.is_writable(store):
            env.update(readonly.scratch_environ(store, Path(scratch)))
        try:
            return subprocess.call(cmd, env=env, preexec_fn=preexec)
        except subprocess.SubprocessError as exc:  # raised for a preexec_fn that failed: no namespace here
            from hfhpc.offline.netns import unavailable_error

            raise unavailable_error() from exc
        except PermissionError:
            print(f"hfhpc: error: {cmd[0]} is not executable", file=sys.stderr)
            return EXIT_USAGE
