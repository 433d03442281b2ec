"""``hfhpc serve``: the store as a read-only, Hub-compatible HTTP endpoint (a lab mirror)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    from hfhpc.store.server import serve

    serve(args.store_path, host=args.host, port=args.port, verbose=args.verbose)
    return 0
