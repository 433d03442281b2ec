"""``python -m hfhpc.recipes.run RUN_DIR``: every rank of a built-in recipe starts here."""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path

from hfhpc.errors import HfhpcError
from hfhpc.run.jobfile import load_job
from hfhpc import registry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    faulthandler.enable()  # a rank that dies by a signal (SIGSEGV, SIGABRT) leaves its Python stack in its log
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


def exit_rank(code: int) -> None:
    """End the rank with ``code`` once its work is saved: exit handlers run while the interpreter is
    whole, then the process ends without interpreter finalization. Torch's C++ threads (gloo's
    workers, kept alive by any object still holding a process group) can otherwise be torn down
    mid-flight by finalization and abort a rank whose job succeeded ("terminate called without an
    active exception", exit -6 after "done", seen once in tests/integration/test_sft.py's DDP run)."""
    for thread in threading.enumerate():  # as a normal exit does: wait for the threads that are not daemons
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what a normal exit runs next: logging's flush, temporary folders, compile workers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe has nothing left to flush into
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
