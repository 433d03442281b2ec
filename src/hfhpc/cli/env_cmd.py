"""``hfhpc env [--spec SPEC]``: the lines a hand-written job script can ``eval``."""

from __future__ import annotations

import argparse
import os


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", metavar="SPEC", help="job spec: adds its allowed hosts to the seal")
    p.add_argument("--no-seal", action="store_true", help="offline variables only, no network guard")


def run(args: argparse.Namespace) -> int:
    store = args.store_path
    if args.spec:
        from hfhpc.spec import load_spec
        from hfhpc.store.location import store_for_spec

        store = store_for_spec(load_spec(args.spec), args.store)
    print("\n".join(env_lines(store, spec_path=args.spec, seal=not args.no_seal)))
    return 0


def env_lines(store, *, spec_path: str | None = None, seal: bool = True) -> list[str]:
    from hfhpc import env as hfenv

    allow: list[str] = []
    if spec_path:
        from hfhpc.spec import load_spec

        allow = list(load_spec(spec_path).site.allow_hosts)
    variables = {**hfenv.store_environ(store), **hfenv.OFFLINE_VARS}
    if seal:
        from hfhpc.offline.environ import seal_environ

        # Only what the seal adds: PYTHONPATH keeps the caller's value after the guard. The lines
        # are evaluated in the shell that runs this: its job's nodes join no_proxy, its git
        # configuration entries are kept.
        variables.update(seal_environ({**os.environ, "PYTHONPATH": "${PYTHONPATH}"}, allow_hosts=allow))
    lines = [f"unset {' '.join((*hfenv.CACHE_OVERRIDES, *hfenv.SECRET_VARS, hfenv.HF_ENDPOINT))}"]
    for name, value in variables.items():
        if "${PYTHONPATH}" in value:
            # Expand the caller's PYTHONPATH when the line is evaluated, dropping an empty entry.
            head = value.split("${PYTHONPATH}")[0].rstrip(":")
            import shlex

            lines.append(f'export {name}={shlex.quote(head)}"${{PYTHONPATH:+:$PYTHONPATH}}"')
        else:
            lines.extend(hfenv.export_lines({name: value}))
    return lines
