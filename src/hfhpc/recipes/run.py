"""``python -m hfhpc.recipes.run RUN_DIR``: every rank of a built-in recipe starts here."""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

from hfhpc.launch.jobfile import load_job

RECIPES = {"sft": "hfhpc.recipes.sft", "infer": "hfhpc.recipes.infer", "evaluate": "hfhpc.recipes.evaluate", "classify": "hfhpc.recipes.classify"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from hfhpc.errors import HfhpcError
    from hfhpc.offline.guard_path import require_seal

    try:
        require_seal()  # a rank started with HFHPC_SEAL=1 never runs unsealed
    except HfhpcError as exc:
        print(f"hfhpc: error: {exc.render()}", file=sys.stderr, flush=True)
        return exc.exit_code
    job = load_job(Path(argv[0]))
    module = importlib.import_module(RECIPES[job.spec.recipe])
    code = int(module.main(job) or 0)
    # The work is saved: a second stop signal must not turn this exit into a death by signal
    # (while Python shuts down, its handlers are gone and the default action kills).
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _close_process_groups()
    return code


def _close_process_groups() -> None:
    """Shut the ranks' process groups (the recipe's and the stop-signal gloo group) before Python
    exits: left to interpreter shutdown, their threads can be torn down running and abort the rank
    ("terminate called without an active exception") after its work is saved."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
