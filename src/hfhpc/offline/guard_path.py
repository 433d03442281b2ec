"""Where the seal's guard is, and whether it is in force in this process.

``python -m hfhpc.offline.guard_path`` prints the guard folder of the hfhpc that this ``python``
imports. A batch script asks the Python that runs the job when it starts, instead of writing down a
folder of the installation that submitted it: a virtualenv rebuilt on node-local disk, moved, or
upgraded with ``pip install -U`` has its own.

A process that should be sealed (``HFHPC_SEAL=1``) and is not, because its ``PYTHONPATH`` names a
folder that is gone or none at all, would run with the network open without a word: the entry
points of a job call :func:`require_seal` first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from hfhpc.errors import SealNotActiveError
from hfhpc.offline.seal import GUARD_DIR

GUARD_MODULE = "hfhpc_seal_guard"  # the module in GUARD_DIR that sitecustomize imports


def guard_dir() -> str:
    """The guard folder of this installation; ``SealNotActiveError`` if its files are missing."""
    if not os.path.isfile(os.path.join(GUARD_DIR, "sitecustomize.py")):
        raise SealNotActiveError(f"the seal's guard is missing from this installation ({GUARD_DIR})",
                                 "reinstall hfhpc")
    return GUARD_DIR


def seal_active() -> bool:
    """Whether the guard is installed in this process."""
    guard = sys.modules.get(GUARD_MODULE)
    installed = getattr(guard, "installed", None)
    return bool(installed and installed())


def require_seal(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ``SealNotActiveError`` when ``environ`` asks for the seal (``HFHPC_SEAL=1``) and this
    process runs without it."""
    if environ.get("HFHPC_SEAL") != "1" or seal_active():
        return
    path = environ.get("PYTHONPATH", "")
    raise SealNotActiveError(
        f"HFHPC_SEAL=1 but the network guard is not installed in this process "
        f"(PYTHONPATH={path!r}; this hfhpc's guard is {GUARD_DIR})",
        "put the folder that `python -m hfhpc.offline.guard_path` prints first on PYTHONPATH, "
        "or start the job through hfhpc",
    )


def main() -> int:
    from hfhpc.errors import HfhpcError

    try:
        print(guard_dir())
    except HfhpcError as exc:
        print(f"hfhpc: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
