"""``hfhpc check [SPEC] [SCRIPT.py…]``: prove offline readiness with the network sealed."""

from __future__ import annotations

import argparse
from pathlib import Path

from hfhpc.errors import EXIT_FAILED, UsageError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="SPEC|SCRIPT", help="a job spec (.yaml) and/or Python scripts to scan")
    p.add_argument("--no-probe", action="store_true", help="verify files only; skip the sealed load probes")
    p.add_argument("--full", action="store_true",
                   help="re-hash every file, trusting no remembered hash (after a crash, or to find bytes changed in place)")


def run(args: argparse.Namespace) -> int:
    from hfhpc.check import check, render
    from hfhpc.spec import load_spec

    specs = [p for p in args.paths if p.endswith((".yaml", ".yml"))]
    scripts = [Path(p) for p in args.paths if p not in specs]
    if len(specs) > 1:
        raise UsageError("check takes one spec at a time")
    if not args.paths:
        raise UsageError("nothing to check", "give a job spec and/or the scripts the job runs")
    spec = load_spec(specs[0]) if specs else None
    store = args.store_path
    if spec is not None:
        from hfhpc.store.location import store_for_spec

        store = store_for_spec(spec, args.store)
    report = check(store, spec, scripts, probe=not args.no_probe, full=args.full)
    print(render(report))
    return 0 if report.ready else EXIT_FAILED
