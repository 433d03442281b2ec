"""Tiny copies of three lm-evaluation-harness benchmarks, with the real Hub ids, configurations,
split names and column schemas (so the harness's own task YAMLs and ``process_docs`` run on them
unchanged): ``Rowan/hellaswag``, ``allenai/ai2_arc`` (config ``ARC-Easy``) and ``cais/mmlu`` (config
``abstract_algebra``), plus a custom task YAML over a dataset of our own."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

HELLASWAG_ID = "Rowan/hellaswag"
ARC_ID = "allenai/ai2_arc"
MMLU_ID = "cais/mmlu"
CUSTOM_ID = "hfhpc-demo/yesno-tiny"
WORDS = ("the cat sat on a mat and looked at the sun while a dog ran past the old red barn near "
         "water under blue sky with green trees").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(dest: Path, configs: dict[str, dict[str, list[dict]]], schema: pa.Schema, features: list[dict]) -> Path:
    """Parquet shards under ``<config>/`` (or ``data/`` for ``default``) and a card whose ``configs:``
    declare each configuration's splits, as the Hub's converted datasets do."""
    dest.mkdir(parents=True, exist_ok=True)
    cards, infos = [], []
    for config, splits in configs.items():
        folder = "data" if config == "default" else config
        sizes = {}
        for split, rows in splits.items():
            path = dest / folder / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, path)
            sizes[split] = (table.num_rows, table.nbytes)
        cards.append({"config_name": config,
                      "data_files": [{"split": s, "path": f"{folder}/{s}-*"} for s in splits]})
        infos.append({"config_name": config, "features": features,
                      "splits": [{"name": s, "num_bytes": b, "num_examples": n} for s, (n, b) in sizes.items()]})
    card = {"configs": cards, "dataset_info": infos if len(infos) > 1 else {k: v for k, v in infos[0].items() if k != "config_name"}}
    (dest / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n\nA tiny test copy.\n")
    return dest


def build_hellaswag(dest: Path) -> Path:
    rng = random.Random("hellaswag")

    def row(i: int, split: str) -> dict:
        return {"ind": i, "activity_label": rng.choice(["Cooking", "Running", "Painting"]),
                "ctx_a": _sentence(rng, 8), "ctx_b": _sentence(rng, 3), "ctx": _sentence(rng, 11),
                "endings": [_sentence(rng, 5) for _ in range(4)], "source_id": f"src~{i}", "split": split,
                "split_type": "indomain", "label": str(rng.randrange(4))}

    schema = pa.schema([("ind", pa.int32()), ("activity_label", pa.string()), ("ctx_a", pa.string()),
                        ("ctx_b", pa.string()), ("ctx", pa.string()), ("endings", pa.list_(pa.string())),
                        ("source_id", pa.string()), ("split", pa.string()), ("split_type", pa.string()),
                        ("label", pa.string())])
    features = [{"name": "ind", "dtype": "int32"}, {"name": "activity_label", "dtype": "string"},
                {"name": "ctx_a", "dtype": "string"}, {"name": "ctx_b", "dtype": "string"},
                {"name": "ctx", "dtype": "string"}, {"name": "endings", "sequence": "string"},
                {"name": "source_id", "dtype": "string"}, {"name": "split", "dtype": "string"},
                {"name": "split_type", "dtype": "string"}, {"name": "label", "dtype": "string"}]
    splits = {s: [row(i, s) for i in range(n)] for s, n in (("train", 6), ("validation", 10), ("test", 4))}
    return _write(dest, {"default": splits}, schema, features)


def build_arc(dest: Path) -> Path:
    rng = random.Random("arc")

    def row(i: int) -> dict:
        labels = ["A", "B", "C", "D"]
        return {"id": f"Q{i}", "question": _sentence(rng, 7) + "?",
                "choices": {"text": [_sentence(rng, 2) for _ in labels], "label": labels},
                "answerKey": rng.choice(labels)}

    choices = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("choices", choices), ("answerKey", pa.string())])
    features = [{"name": "id", "dtype": "string"}, {"name": "question", "dtype": "string"},
                {"name": "choices", "struct": [{"name": "text", "sequence": "string"}, {"name": "label", "sequence": "string"}]},
                {"name": "answerKey", "dtype": "string"}]
    splits = {s: [row(i) for i in range(n)] for s, n in (("train", 5), ("test", 10), ("validation", 5))}
    return _write(dest, {"ARC-Easy": splits}, schema, features)


def build_mmlu(dest: Path) -> Path:
    rng = random.Random("mmlu")

    def row() -> dict:
        return {"question": _sentence(rng, 6) + "?", "subject": "abstract_algebra",
                "choices": [_sentence(rng, 2) for _ in range(4)], "answer": rng.randrange(4)}

    schema = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                        ("answer", pa.int64())])
    features = [{"name": "question", "dtype": "string"}, {"name": "subject", "dtype": "string"},
                {"name": "choices", "sequence": "string"},
                {"name": "answer", "dtype": {"class_label": {"names": {"0": "A", "1": "B", "2": "C", "3": "D"}}}}]
    splits = {s: [row() for _ in range(n)] for s, n in (("test", 8), ("validation", 4), ("dev", 5))}
    return _write(dest, {"abstract_algebra": splits}, schema, features)


def build_custom(dest: Path) -> Path:
    """A yes/no dataset of our own, for a task YAML the harness does not ship."""
    rng = random.Random("yesno")
    schema = pa.schema([("question", pa.string()), ("answer", pa.int64())])
    features = [{"name": "question", "dtype": "string"}, {"name": "answer", "dtype": "int64"}]
    splits = {"test": [{"question": _sentence(rng, 5) + "?", "answer": rng.randrange(2)} for _ in range(8)]}
    return _write(dest, {"default": splits}, schema, features)


CUSTOM_TASK_YAML = f"""\
task: yesno_tiny
dataset_path: {CUSTOM_ID}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

BENCHMARKS = [("dataset", HELLASWAG_ID, build_hellaswag), ("dataset", ARC_ID, build_arc),
              ("dataset", MMLU_ID, build_mmlu), ("dataset", CUSTOM_ID, build_custom)]
