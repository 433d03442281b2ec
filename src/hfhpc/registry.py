"""The recipe registry: each recipe is named once, by the module that declares it.

A module ``hfhpc/recipes/<name>.py`` declares ``RECIPE = Recipe(...)`` at top level; the registry
finds it by reading the package's sources (no module is imported to find out) and imports only the
modules that declare one. A recipe module imports nothing heavy at module level (torch,
transformers, trl only inside functions), so discovery is safe on the login node.

Nothing else in hfhpc lists recipe names: the spec, the starters, ``hfhpc init``, ``check`` and the
rank entry point all ask this module.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

_DECLARES = re.compile(r"^RECIPE\s*(?::[^=\n]*)?=", re.M)


@dataclass(frozen=True)
class Recipe:
    name: str                      # the spec's `recipe:` value
    summary: str                   # one line, for `hfhpc init --help` and the docs
    needs: tuple[str, ...]         # top-level spec keys that must be set
    train: type[BaseModel] | None  # the typed `train:` section (None: `train:` is refused)
    trainer_config: str | None     # "module:Class" of the dataclass whose fields may also pass through `train:`
    starter: dict[str, Any]        # the `hfhpc init NAME` starter spec
    check: Callable[[Any], None] | None = None  # cross-field checks on the JobSpec; raise ValueError
    infer: type[BaseModel] | None = None  # the typed `infer:` section (None: `infer:` is refused)
    fsdp_version: int = 2          # FSDP implementation when the spec does not choose one
    user_script: bool = False      # the ranks run the spec's `script:` instead of the module's `main`
    sections: dict[str, type[BaseModel]] = field(default_factory=dict)  # more top-level sections it owns (`harness:`)
    datasets: Callable[[Any], list[Any]] | None = None  # datasets it loads beyond `dataset(s):` (DatasetRefs)
    # What `hfhpc check` adds, given (spec, store): (problems, sealed probe). Problems are (kind, id,
    # what, error, fix); the probe is {"target": "module:function", "args": {...}}, called in the
    # sealed probe child, returning results as hfhpc.offline.probe writes them.
    offline_check: Callable[[Any, Path], tuple[list[tuple[str, str, str, str, str]], dict | None]] | None = None
    # The entry point is the declaring module's `main(job) -> int`.


RECIPES_PACKAGE = "hfhpc.recipes"


def _package_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"


def _declaring_modules() -> list[str]:
    """``hfhpc.recipes.*`` modules whose source assigns a top-level ``RECIPE``, in name order."""
    found = []
    for path in sorted(_package_dir().glob("*.py")):
        if path.stem.startswith("_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if _DECLARES.search(source):
            found.append(f"{RECIPES_PACKAGE}.{path.stem}")
    return found


_REGISTRY: dict[str, tuple[Recipe, str]] | None = None


def _registry() -> dict[str, tuple[Recipe, str]]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, tuple[Recipe, str]] = {}
        for module_name in _declaring_modules():
            module = importlib.import_module(module_name)
            if not hasattr(module, "RECIPE"):
                continue  # the text matched inside a string, not an assignment
            recipe = module.RECIPE
            if not isinstance(recipe, Recipe):
                raise TypeError(f"{module_name}.RECIPE is not a hfhpc.registry.Recipe")
            if recipe.name in found:
                raise TypeError(f"recipe {recipe.name!r} is declared by {found[recipe.name][1]} and {module_name}")
            found[recipe.name] = (recipe, module_name)
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def recipes() -> dict[str, Recipe]:
    """Every registered recipe, by name (sorted)."""
    return {name: recipe for name, (recipe, _) in _registry().items()}


def names() -> list[str]:
    return list(_registry())


def get(name: str) -> Recipe:
    """The recipe called ``name``; ``KeyError`` when there is none."""
    return _registry()[name][0]


def entry_point(name: str) -> Callable[[Any], int]:
    """The declaring module's ``main(job) -> int`` (imports the module's heavy parts when called)."""
    module = importlib.import_module(_registry()[name][1])
    return module.main


def section_owners(section: str) -> list[str]:
    """The recipes that own the top-level ``section`` (one of their ``sections``)."""
    return [name for name, recipe in recipes().items() if section in recipe.sections]


def owners(section: str, key: str) -> list[str]:
    """The recipes whose ``section`` model (``train`` or ``infer``) declares ``key``."""
    out = []
    for name, recipe in recipes().items():
        model = getattr(recipe, section)
        if model is not None and key in model.model_fields:
            out.append(name)
    return out


# -- trainer config fields (a child process: importing TRL imports torch) -------------------------

def _load_class(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in class_name.split("."):
        obj = getattr(obj, part)
    return obj


def dataclass_fields(target: str) -> list[str]:
    """Field names of the dataclass ``"module:Class"`` (imported in this process)."""
    import dataclasses

    return sorted(f.name for f in dataclasses.fields(_load_class(target)))


def trainer_fields(target: str, *, timeout_s: float = 300) -> list[str]:
    """Field names of ``"module:Class"``, read in a child process so that the caller (``submit`` on a
    login node) never imports torch. Raises ``RuntimeError`` with the child's last line when the class
    cannot be imported."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", __name__, "fields", target], env=env, capture_output=True,
                         text=True, timeout=timeout_s)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cannot read the fields of {target}: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "fields":
        print("usage: python -m hfhpc.registry fields MODULE:CLASS", file=sys.stderr)
        return 2
    print(json.dumps(dataclass_fields(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
