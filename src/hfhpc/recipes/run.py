"""``python -m hfhpc.recipes.run RUN_DIR``: every rank of a built-in recipe starts here."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from hfhpc.errors import HfhpcError
from hfhpc.run.jobfile import load_job
from hfhpc import registry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from hfhpc.offline.guard_path import require_seal

    try:
        require_seal()  # a rank started with HFHPC_SEAL=1 never runs unsealed
        job = load_job(Path(argv[0]))
        code = int(registry.entry_point(job.spec.recipe)(job) or 0)
    except HfhpcError as e:
        # Library code raises typed errors; this is the rank's CLI: one line, the error's exit code.
        print(f"hfhpc: error: {e.render()}", file=sys.stderr, flush=True)
        code = e.exit_code
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
