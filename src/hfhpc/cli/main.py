"""``hfhpc`` entry point: lazy command dispatch and the one table that maps errors to exit codes.

Only the chosen command's module is imported, so ``hfhpc --help``, ``stage``, ``check`` and
``submit`` never import torch (pip's lazy ``commands_dict``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hfhpc import __version__

# name → (module, one-line help). The module defines ``configure(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("hfhpc.cli.init_cmd", "write a commented starter job spec"),
    "stage": ("hfhpc.cli.stage_cmd", "download models, datasets and metrics into the store (login node)"),
    "check": ("hfhpc.cli.check_cmd", "prove, with the network sealed, that a job will run offline"),
    "plan": ("hfhpc.cli.plan_cmd", "memory per GPU and wall time before queueing"),
    "run": ("hfhpc.cli.run_cmd", "run a job now on this machine, sealed and offline"),
    "submit": ("hfhpc.cli.submit_cmd", "write the sbatch script and submit the job to SLURM"),
    "status": ("hfhpc.cli.status_cmd", "progress, loss, tokens/s and ETA of submitted jobs"),
    "logs": ("hfhpc.cli.logs_cmd", "show (or follow) a job's log"),
    "cancel": ("hfhpc.cli.cancel_cmd", "cancel a submitted job"),
    "report": ("hfhpc.cli.report_cmd", "loss and throughput plots and an HTML report of a run"),
    "export": ("hfhpc.cli.export_cmd", "merge a run's checkpoint into a plain HF model"),
    "exec": ("hfhpc.cli.exec_cmd", "run any command sealed, with the store's offline environment"),
    "env": ("hfhpc.cli.env_cmd", "print the export lines a hand-written job script needs"),
    "serve": ("hfhpc.cli.serve_cmd", "serve the store as a read-only, Hub-compatible HTTP endpoint"),
    "doctor": ("hfhpc.cli.doctor_cmd", "versions, GPUs, SLURM, store location and quota, offline variables"),
}


def _available() -> dict[str, tuple[str, str]]:
    import importlib.util

    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _root_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hfhpc",
        description="Run the Hugging Face stack on air-gapped SLURM clusters: stage, check, run, submit.",
        epilog="Run `hfhpc COMMAND --help` for a command's options. Exit codes: 0 ok, 1 failed (fixable), "
        "2 bad usage or spec, 3 interrupted after a checkpoint (run again to resume).",
    )
    p.add_argument("--version", action="version", version=f"hfhpc {__version__}")
    p.add_argument("--store", metavar="PATH", help="the store (default: $HFHPC_STORE, else $HF_HOME, else ~/.cache/huggingface)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _root_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).configure(sp)
    return parser


def _command_in(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--store":
            skip = True
            continue
        if arg.startswith("-"):
            continue
        return arg
    return None


def main(argv: list[str] | None = None) -> int:
    from hfhpc import env as hfenv
    from hfhpc.errors import EXIT_FAILED, EXIT_USAGE, HfhpcError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    debug = args.debug or hfenv.debug_enabled()
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    args.store_path = hfenv.resolve_store(args.store)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except HfhpcError as e:
        if debug:
            raise
        print(f"hfhpc: error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hfhpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `hfhpc … | head`: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence, with the way to see more
        if debug:
            raise
        print(f"hfhpc: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
