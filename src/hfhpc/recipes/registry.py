"""Built-in recipes, each declared once by its own module (``hfhpc.recipes.<name>.RECIPE``).

Only the standard library and pydantic are imported here: the login node reads recipes without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Recipe:
    name: str                      # the spec's `recipe:` value, e.g. "dpo"
    summary: str                   # one line, for `hfhpc init --help` and the docs
    needs: tuple[str, ...]         # top-level spec keys that must be set, e.g. ("model", "dataset")
    train: type[BaseModel] | None  # the recipe's typed `train:` section (None: `train:` is refused)
    trainer_config: str | None     # "module:Class" of the dataclass whose fields may also pass through `train:`
    starter: dict[str, Any]        # the `hfhpc init NAME` starter spec
    check: Callable[[Any], None] | None = None  # cross-field checks on the JobSpec; raise ValueError
    # The entry point is the declaring module's `main(job) -> int`.


def find(name: str) -> Recipe | None:
    """The recipe a module ``hfhpc.recipes.<name>`` declares, or None when it declares none."""
    try:
        module = importlib.import_module(f"hfhpc.recipes.{name}")
    except ModuleNotFoundError:
        return None
    found = getattr(module, "RECIPE", None)
    return found if isinstance(found, Recipe) else None
