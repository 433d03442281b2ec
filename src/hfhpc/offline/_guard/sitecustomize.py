"""hfhpc's network seal, run by ``site`` at the start of every sealed Python process.

The guard installs only when ``HFHPC_SEAL=1`` (``HFHPC_SEAL=0`` switches it off for a debugging
session); it lives in ``hfhpc_seal_guard``, next to this file. Then the ``sitecustomize`` that this
file hides, the next one on ``sys.path`` (a cluster's or a virtual environment's), is run as well,
after the seal: its own network access is sealed too.
"""

import os
import sys


def _chain() -> None:
    """Run the next ``sitecustomize`` on ``sys.path`` after this folder, as ``site`` would have."""
    here = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))
    entries = [os.path.normcase(os.path.abspath(p or os.curdir)) for p in sys.path]
    start = entries.index(here) + 1 if here in entries else 0
    # Never this folder again (it may be listed twice): that would run this file in a loop.
    rest = [p for p, norm in zip(sys.path[start:], entries[start:], strict=True) if norm != here]
    # importlib.machinery's PathFinder *is* the frozen one; importing importlib.machinery would cost
    # a millisecond (it imports warnings) in every process, even those with nothing to chain.
    machinery = sys.modules.get("importlib.machinery") or sys.modules.get("_frozen_importlib_external")
    if machinery is None:
        import importlib.machinery as machinery
    spec = machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    # Registered in our place before it runs, as if it had been imported directly: the import
    # statement in site returns whatever sys.modules holds at the end, so ``import sitecustomize``
    # anywhere later gives the user's module, with its own attributes.
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get("HFHPC_SEAL") == "1":
    import hfhpc_seal_guard

    hfhpc_seal_guard.install()

_chain()
