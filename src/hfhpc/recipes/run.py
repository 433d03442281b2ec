"""``python -m hfhpc.recipes.run RUN_DIR``: every rank of a built-in recipe starts here."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from hfhpc.launch.jobfile import load_job

RECIPES = {"sft": "hfhpc.recipes.sft", "infer": "hfhpc.recipes.infer", "evaluate": "hfhpc.recipes.evaluate", "classify": "hfhpc.recipes.classify"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = load_job(Path(argv[0]))
    module = importlib.import_module(RECIPES[job.spec.recipe])
    return int(module.main(job) or 0)


if __name__ == "__main__":
    sys.exit(main())
