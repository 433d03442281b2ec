"""Commented starter specs for ``hfhpc init``: each recipe's ``starter`` (its ``RECIPE``), rendered
with the spec models' field descriptions, so the comments can never drift from what the validator
accepts."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from hfhpc import registry
from hfhpc.spec import job_model, parse_spec

HEADER = """\
# hfhpc job spec, recipe {recipe}: {summary}.
# Unknown keys are an error that lists the valid ones.
# Next: `hfhpc stage {file}` on a login node, `hfhpc check {file}`, then `hfhpc submit {file}`
# (or `hfhpc run {file}` to run it here without SLURM).
"""


def _description(model: type[BaseModel] | None, key: str) -> str | None:
    if model is None:
        return None
    field = model.model_fields.get(key)
    return field.description if field else None


def _child_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    from hfhpc.spec import _unwrap_model

    if model is None or key not in model.model_fields:
        return None
    return _unwrap_model(model.model_fields[key].annotation)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        import yaml

        plain = value and not any(c in value for c in ":#{}[],&*!|>'\"%@`") and value.strip() == value
        # "5", "true" or "null" would come back as another type: quote them.
        return value if plain and yaml.safe_load(value) == value else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return str(value)


def _render(data: dict[str, Any], model: type[BaseModel] | None, indent: int) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for key, value in data.items():
        desc = _description(model, key)
        comment = f"  # {desc}" if desc else ""
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:{comment}")
            lines.extend(_render(value, _child_model(model, key), indent + 1))
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}{comment}")
    return lines


def render_starter(recipe: str, filename: str = "job.yaml") -> str:
    r = registry.get(recipe)
    text = HEADER.format(recipe=recipe, summary=r.summary, file=filename) + "\n".join(_render(r.starter, job_model(recipe), 0)) + "\n"
    # The starter must always be a valid spec.
    import yaml

    parse_spec(yaml.safe_load(text), f"starter {recipe}")
    return text
