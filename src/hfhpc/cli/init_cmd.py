"""``hfhpc init RECIPE [-o FILE]``: write a commented starter spec."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hfhpc.errors import UsageError
from hfhpc import registry


def configure(p: argparse.ArgumentParser) -> None:
    recipes = registry.recipes()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "recipes:\n" + "\n".join(f"  {name:<10} {r.summary}" for name, r in recipes.items())
    p.add_argument("recipe", choices=list(recipes), help=" | ".join(recipes))
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: print to stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    from hfhpc.starters import render_starter
    from hfhpc.atomic import atomic_write_text

    if not args.output:
        sys.stdout.write(render_starter(args.recipe))
        return 0
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists", "choose another -o FILE, or pass --force to overwrite it")
    atomic_write_text(out, render_starter(args.recipe, out.name))
    print(f"wrote {out}: edit it, then `hfhpc stage {out}`")
    return 0
