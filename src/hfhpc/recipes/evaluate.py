"""Scoring with staged Evaluate metrics, over a predictions file or a model run on a split.

(a) ``predictions:`` — a ``predictions.jsonl`` (the infer recipe's output, or any file of that
    format): each line's ``prediction`` against its ``reference``.
(b) ``model:`` + ``dataset:`` — a pipeline of the model over ``dataset.split`` (every rank takes a
    contiguous shard; rank 0 gathers them in order), each prediction against ``label_column``. Text
    generation runs on the infer recipe's generation engine (:mod:`hfhpc.recipes.generate`).
    Class labels meet as ids: the model's label names go through its ``label2id`` and the dataset's
    names through its ClassLabel. The rows go to ``predictions.jsonl`` too, to see what was missed.

Writes ``eval.json`` (``{metric: value, …, "rows": n}``) and ``summary.json``. Path (b) does not
resume; for a split that takes hours, run the infer recipe with ``label_column`` (it resumes), then
score its predictions with (a).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hfhpc import assets
from hfhpc.errors import HfhpcError, SpecError
from hfhpc.recipes import metrics
from hfhpc.recipes.common import is_main, log, rank, spec_path, world_size, write_summary
from hfhpc.recipes.infer import (
    InferSettings,
    build_pipeline,
    call_kwargs,
    engine_outputs,
    engine_settings,
    init_distributed,
    inputs_of,
    is_chat,
    jsonable,
    load_rows,
    prediction_of,
    reference_of,
    shard_start,
    text_column,
)
from hfhpc.registry import Recipe
from hfhpc.run.jobfile import JobFile
from hfhpc.atomic import atomic_write_json, atomic_write_text


def _check(spec: Any) -> None:
    if not spec.predictions and not (spec.model and spec.dataset):
        raise ValueError("recipe 'evaluate' needs `predictions:` or both `model:` and `dataset:`")


RECIPE = Recipe(
    name="evaluate",
    summary="score Evaluate metrics over a predictions.jsonl, or over a model's predictions on a labelled split",
    needs=("metrics",),
    train=None,
    trainer_config=None,
    infer=InferSettings,
    starter={
        "name": "sentiment-eval",
        "recipe": "evaluate",
        "model": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "dataset": {"id": "stanfordnlp/imdb", "split": "test", "text_column": "text", "label_column": "label"},
        "metrics": ["accuracy", "f1"],
        "resources": {"nodes": 1, "gpus_per_node": 1, "time": "0-00:30:00", "account": "def-someone"},
        "output_dir": "runs/sentiment-eval",
    },
    check=_check,
)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions.jsonl; each must carry a ``reference``."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise HfhpcError(f"predictions file {path} does not exist",
                         "`predictions:` is relative to the spec's folder: run the infer job first or fix the path") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise HfhpcError(f"{path}:{number} is not a JSON line", "point `predictions:` at an infer job's predictions.jsonl") from None
        if "prediction" not in record or "reference" not in record:
            raise HfhpcError(f"{path}:{number} lacks `prediction` or `reference`",
                             "set dataset.label_column in the infer spec that wrote it")
        records.append(record)
    return records


def main(job: JobFile) -> int:
    import torch.distributed as dist
    from datasets import ClassLabel

    spec = job.spec
    t0 = time.perf_counter()
    score = metrics.load_metrics([m.id for m in spec.metrics])

    # -- (a) a predictions file ------------------------------------------------------------------
    if spec.predictions:
        path = spec.resolve_path(spec.predictions)
        records = read_predictions(path)
        log(f"scoring {len(records)} predictions from {path} with {', '.join(m.id for m in spec.metrics)}")
        results = score([r["prediction"] for r in records], [r["reference"] for r in records])
        source: dict[str, Any] = {"predictions": str(path)}

    # -- (b) a model on a split ------------------------------------------------------------------
    else:
        dref = spec.dataset
        ds = load_rows(job)
        label_column = dref.label_column or ("label" if "label" in ds.column_names else None)
        if label_column not in ds.column_names:
            raise SpecError(spec_path(job), "dataset.label_column", "no column to score against",
                            f"set it to one of {ds.column_names}")
        feature = ds.features[label_column]
        tokenizer = assets.load_tokenizer(spec.model.id, job.model_commit, job.model_bases)
        chat = is_chat(job, tokenizer)
        column = text_column(ds.column_names, dref.text_column, chat=chat, source=spec_path(job))
        r, world = rank(), world_size()
        distributed = init_distributed(job)
        shard = ds.shard(num_shards=world, index=r, contiguous=True)
        start = shard_start(len(ds), world, r)
        pipe = build_pipeline(job, tokenizer)
        kwargs = call_kwargs(job)
        batch_size = spec.infer.batch_size
        log(f"{spec.infer.task} with {spec.model.id} on {len(ds)} rows of {dref.id}:{dref.split}, {world} rank(s)")

        records = []
        settings = engine_settings(job, pipe, kwargs)
        generated = engine_outputs(job, pipe, settings, shard, column, chat=chat, start=start) if settings else ()
        for lo, text, prediction, _ in generated:
            records.append({"index": start + lo, "input": text, "prediction": prediction,
                            "reference": reference_of(shard[lo][label_column], feature)})
        for lo in range(0, len(shard), batch_size) if not settings else ():
            batch = shard[lo: lo + batch_size]
            inputs = inputs_of(batch[column], chat=chat)
            outputs = pipe(inputs, batch_size=batch_size, **kwargs)
            for k, (text, output) in enumerate(zip(inputs, outputs, strict=True)):
                prediction, confidence = prediction_of(output)
                record: dict[str, Any] = {"index": start + lo + k, "input": text, "prediction": prediction}
                if confidence is not None:
                    record["score"] = confidence
                record["reference"] = reference_of(batch[label_column][k], feature)
                records.append(record)
        if distributed:
            shards: list[list[dict[str, Any]] | None] = [None] * world if is_main() else []
            dist.gather_object(records, shards if is_main() else None, dst=0)
            dist.destroy_process_group()
            if not is_main():
                return 0
            records = [rec for part in shards for rec in (part or [])]

        predictions = [rec["prediction"] for rec in records]
        references = [rec["reference"] for rec in records]
        if isinstance(feature, ClassLabel):
            # Compare class ids. A model whose labels are the dataset's names (one the classify recipe
            # trained) maps by name; any other (LABEL_0, LABEL_1, …) is taken to number the classes
            # as the dataset does, through its label2id.
            model_names = set(pipe.model.config.id2label.values())
            by_name = model_names == set(feature.names)
            label2id = pipe.model.config.label2id

            def class_id(label: Any) -> int:
                if isinstance(label, int):
                    return label
                if by_name:
                    return feature.str2int(label)
                return int(label2id.get(label, -1))

            predictions = [class_id(p) for p in predictions]
            references = [feature.str2int(ref) for ref in references]
        results = score(predictions, references)
        # The scored rows, in the infer recipe's format: to see what was missed.
        lines = "".join(json.dumps(rec, default=jsonable) + "\n" for rec in records)
        atomic_write_text(job.paths.predictions, lines)
        source = {"model": spec.model.id, "model_commit": job.model_commit, "dataset": dref.id, "split": dref.split,
                  "world_size": world}

    # -- save --------------------------------------------------------------------------------------
    if not is_main():
        return 0
    rows = len(records)
    atomic_write_json(job.paths.eval, {**results, "rows": rows})
    write_summary(job, {"rows": rows, "metrics": results, "seconds": round(time.perf_counter() - t0, 3), **source})
    log("done: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
    return 0
