"""Commented starter specs for ``hfhpc init``, rendered from the spec models' field descriptions,
so the comments can never drift from what the validator accepts."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from hfhpc.spec import JobSpec, parse_spec

STARTERS: dict[str, dict[str, Any]] = {
    "sft": {
        "name": "zephyr-sft",
        "recipe": "sft",
        "model": {"id": "HuggingFaceH4/zephyr-7b-beta", "revision": "main"},
        "dataset": {"id": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "eval_split": "test_sft"},
        "train": {"max_length": 2048, "packing": True, "epochs": 1, "learning_rate": 2.0e-5,
                  "per_device_batch_size": 8, "save_steps": 200},
        "launch": {"strategy": "fsdp", "mixed_precision": "bf16"},
        "resources": {"nodes": 1, "gpus_per_node": 4, "cpus_per_gpu": 12, "time": "0-03:00:00",
                      "account": "def-someone"},
        "site": {"preamble": ["module load python/3.11 gcc arrow"]},
        "output_dir": "runs/zephyr-sft",
    },
    "infer": {
        "name": "sentiment-infer",
        "recipe": "infer",
        "model": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "dataset": {"id": "stanfordnlp/imdb", "split": "test", "text_column": "text"},
        "infer": {"task": "text-classification", "batch_size": 64},
        "launch": {"strategy": "ddp"},
        "resources": {"nodes": 1, "gpus_per_node": 1, "time": "0-00:30:00", "account": "def-someone"},
        "output_dir": "runs/sentiment-infer",
    },
    "evaluate": {
        "name": "sentiment-eval",
        "recipe": "evaluate",
        "model": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "dataset": {"id": "stanfordnlp/imdb", "split": "test", "text_column": "text", "label_column": "label"},
        "metrics": ["accuracy", "f1"],
        "resources": {"nodes": 1, "gpus_per_node": 1, "time": "0-00:30:00", "account": "def-someone"},
        "output_dir": "runs/sentiment-eval",
    },
    "classify": {
        "name": "imdb-classify",
        "recipe": "classify",
        "model": "google-bert/bert-base-uncased",
        "dataset": {"id": "stanfordnlp/imdb", "split": "train", "eval_split": "test",
                    "text_column": "text", "label_column": "label"},
        "metrics": ["accuracy"],
        "train": {"max_length": 512, "epochs": 2, "learning_rate": 3.0e-5, "per_device_batch_size": 16},
        "launch": {"strategy": "ddp"},
        "resources": {"nodes": 1, "gpus_per_node": 2, "time": "0-02:00:00", "account": "def-someone"},
        "output_dir": "runs/imdb-classify",
    },
    "script": {
        "name": "cifar10",
        "recipe": "script",
        "script": "cifar10_train.py",
        "args": ["--epochs", "5"],
        "launch": {"strategy": "ddp"},
        "resources": {"nodes": 2, "gpus_per_node": 4, "time": "0-01:00:00", "account": "def-someone"},
        "output_dir": "runs/cifar10",
    },
}

HEADER = """\
# hfhpc job spec ({recipe}). Unknown keys are an error that lists the valid ones.
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
    data = STARTERS[recipe]
    text = HEADER.format(recipe=recipe, file=filename) + "\n".join(_render(data, JobSpec, 0)) + "\n"
    # The starter must always be a valid spec.
    import yaml

    parse_spec(yaml.safe_load(text), f"starter {recipe}")
    return text
