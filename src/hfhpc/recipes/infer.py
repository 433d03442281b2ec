"""Batch inference: a transformers pipeline over a whole dataset split, on every rank of the job.

setup (this rank's contiguous shard of the split, a pipeline of the staged model and tokenizer at
the locked commit) → run (batches appended to ``predictions.rank{r}.jsonl``, flushed after each, so
a rerun resumes after the last complete line) → save (rank 0 joins the shards in rank order, which
is input order, into ``predictions.jsonl``; ``summary.json``).

Each line is ``{"index": i, "input": …, "prediction": …}``, plus ``"score"`` for classifiers and
``"reference"`` when the spec names ``dataset.label_column``.

The model and the tokenizer are always named: a pipeline given only a task fetches a default model
from the Hub, which a compute node cannot reach. The helpers above ``main`` are shared with the
evaluate recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hfhpc import assets
from hfhpc.errors import HfhpcError, SpecError
from hfhpc.launch.jobfile import JobFile
from hfhpc.recipes.common import (
    EXIT_INTERRUPTED,
    StopOnSignal,
    cuda_available,
    is_main,
    log,
    rank,
    spec_path,
    world_size,
    write_summary,
)
from hfhpc.recipes.registry import Recipe
from hfhpc.store.atomic import fsync_dir, tmp_name

PREDICTIONS = "predictions.jsonl"
TEXT_COLUMNS = ("text", "prompt", "sentence", "question")
# Whole-text classifiers: an input longer than the model's window is truncated rather than fatal.
TRUNCATING_TASKS = ("text-classification", "sentiment-analysis")
GENERATED_KEYS = ("generated_text", "summary_text", "translation_text")


class InferSettings(BaseModel):
    """``infer:`` (recipes infer and evaluate): the pipeline task; any other key passes through to
    every pipeline call (generation arguments)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    task: str = Field("text-generation", description="transformers pipeline task")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int = Field(42, description="same on every rank: sampled generations are reproducible")


RECIPE = Recipe(
    name="infer",
    summary="any transformers pipeline task over a dataset split, batched across ranks, to predictions.jsonl",
    needs=("model", "dataset"),
    train=None,
    trainer_config=None,
    infer=InferSettings,
    starter={
        "name": "sentiment-infer",
        "recipe": "infer",
        "model": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "dataset": {"id": "stanfordnlp/imdb", "split": "test", "text_column": "text"},
        "infer": {"task": "text-classification", "batch_size": 64},
        "launch": {"strategy": "ddp"},
        "resources": {"nodes": 1, "gpus_per_node": 1, "time": "0-00:30:00", "account": "def-someone"},
        "output_dir": "runs/sentiment-infer",
    },
)


# -- helpers shared with the evaluate recipe ---------------------------------------------------------

def text_column(columns: list[str], configured: str | None, *, chat: bool, source: str) -> str:
    """The input column: the configured one, else a guess. A chat model generating text prefers the
    whole conversation (``messages``) to a plain prompt, so that its chat template applies.
    ``source`` is the spec file that errors name."""
    if configured:
        if configured not in columns:
            raise SpecError(source, "dataset.text_column", f"the split has no column {configured!r}",
                            f"set it to one of {columns}")
        return configured
    if chat and "messages" in columns:
        return "messages"
    for name in (*TEXT_COLUMNS, "messages"):
        if name in columns:
            return name
    raise SpecError(source, "dataset.text_column", f"cannot tell which column holds the input among {columns}",
                    "set dataset.text_column")


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def inputs_of(values: list[Any], *, chat: bool) -> list[Any]:
    """One batch's pipeline inputs. Strings pass as they are. A conversation is cut after its last
    user turn (what follows is the reference answer): a chat model gets those messages and the
    pipeline applies its template; any other pipeline gets the text of that last user turn."""
    out = []
    for value in values:
        if not _is_conversation(value):
            out.append(value)
            continue
        last_user = max((i for i, m in enumerate(value) if m["role"] == "user"), default=len(value) - 1)
        prompt = [{"role": m["role"], "content": m["content"]} for m in value[: last_user + 1]]
        out.append(prompt if chat else prompt[-1]["content"])
    return out


def is_chat(job: JobFile, tokenizer: Any) -> bool:
    return job.spec.infer.task == "text-generation" and bool(getattr(tokenizer, "chat_template", None))


def build_pipeline(job: JobFile, tokenizer: Any) -> Any:
    """The pipeline of the staged model at its locked commit, on this rank's GPU or on the CPU."""
    import torch
    from transformers import pipeline, set_seed

    spec = job.spec
    # Every rank draws the same numbers: a head missing from the checkpoint gets the same random
    # init on all of them, and sampled generations are reproducible.
    set_seed(spec.infer.seed)
    gpu = spec.resources.gpus_per_node > 0 and cuda_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.launch.mixed_precision)
    dtype = half if (gpu and half is not None) else torch.float32
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching pads; generation stops at EOS anyway
    return pipeline(spec.infer.task, model=spec.model.id, tokenizer=tokenizer, revision=job.model_commit,
                    device=device, dtype=dtype)


def call_kwargs(job: JobFile) -> dict[str, Any]:
    """Keyword arguments of every pipeline call: the spec's ``infer:`` extras, plus defaults that
    make the output a prediction (only the new text of a generation)."""
    infer = job.spec.infer
    kwargs = dict(infer.model_extra or {})
    if infer.max_new_tokens is not None:
        kwargs["max_new_tokens"] = infer.max_new_tokens
    if infer.task == "text-generation":
        kwargs.setdefault("return_full_text", False)
    if infer.task in TRUNCATING_TASKS:
        kwargs.setdefault("truncation", True)
    return kwargs


def prediction_of(output: Any) -> tuple[Any, float | None]:
    """One input's pipeline output → (prediction, score): a classifier's label and its score, a
    generation's text; anything else (top-k lists, entities, several sequences) as it is."""
    if isinstance(output, list) and len(output) == 1:
        output = output[0]  # generation pipelines wrap each input's result in a list
    if isinstance(output, dict):
        if set(output) == {"label", "score"}:
            return output["label"], float(output["score"])
        if len(output) == 1 and next(iter(output)) in GENERATED_KEYS:
            return next(iter(output.values())), None
    return output, None


def reference_of(value: Any, feature: Any) -> Any:
    """A label as its class name when the column is a ClassLabel, so it reads like a prediction."""
    from datasets import ClassLabel

    return feature.int2str(value) if isinstance(feature, ClassLabel) else value


def jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for the numpy and torch values pipelines return."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def init_distributed(job: JobFile) -> bool:
    """Join the job's process group when there are several ranks; True when there is one.

    gloo, even on GPU nodes: it only carries a few row counts and Python objects, never tensors on a
    GPU. The timeout is the job's time limit: a rank that finished early waits at the final
    collective for the slowest one, which after a resume may have much more left to do.
    """
    import torch.distributed as dist

    if world_size() <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=job.spec.resources.time_s))
    return True


def shard_start(rows: int, shards: int, index: int) -> int:
    """Global index of the first row of ``Dataset.shard(shards, index, contiguous=True)``."""
    return (rows // shards) * index + min(index, rows % shards)


def load_rows(job: JobFile):
    """The spec's input split, cut to ``dataset.max_samples``."""
    dref = job.spec.dataset
    ds = assets.load_split(dref.id, job.dataset_commit, dref.split, dref.config)
    if dref.max_samples:
        ds = ds.select(range(min(dref.max_samples, len(ds))))
    return ds


# -- this recipe's own helpers --------------------------------------------------------------------------

def rank_file(job: JobFile, r: int) -> Path:
    return job.run_dir / f"predictions.rank{r}.jsonl"


def keep_complete_prefix(path: Path, first_index: int, rows: int) -> int:
    """Cut ``path`` to its complete lines whose indices run on from ``first_index``, at most ``rows``
    of them; return how many.

    A rank killed mid-write leaves a truncated last line; a file written with another number of ranks
    starts elsewhere or runs past this shard. Either way only the prefix that is exactly right is kept.
    """
    if not path.exists():
        return 0
    kept, size = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if kept == rows or not line.endswith(b"\n"):
                break
            try:
                if json.loads(line).get("index") != first_index + kept:
                    break
            except ValueError:
                break
            kept, size = kept + 1, size + len(line)
    os.truncate(path, size)
    return kept


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def main(job: JobFile) -> int:
    import torch
    import torch.distributed as dist

    stop = StopOnSignal().install()
    spec, dref = job.spec, job.spec.dataset
    r, world = rank(), world_size()
    distributed = init_distributed(job)
    final = job.run_dir / PREDICTIONS

    # -- setup -------------------------------------------------------------------------------------
    ds = load_rows(job)
    rows = len(ds)
    if count_lines(final) == rows:
        log(f"{final} already holds all {rows} predictions: nothing to do")
        return 0
    tokenizer = assets.load_tokenizer(spec.model.id, job.model_commit)
    chat = is_chat(job, tokenizer)
    column = text_column(ds.column_names, dref.text_column, chat=chat, source=spec_path(job))
    label_column = dref.label_column
    if label_column and label_column not in ds.column_names:
        raise SpecError(spec_path(job), "dataset.label_column", f"the split has no column {label_column!r}",
                        f"set it to one of {ds.column_names}")
    label_feature = ds.features[label_column] if label_column else None

    # Contiguous shards: joining them in rank order gives back the input order.
    shard = ds.shard(num_shards=world, index=r, contiguous=True)
    start = shard_start(rows, world, r)
    part = rank_file(job, r)
    done = keep_complete_prefix(part, start, len(shard))
    if done:
        print(f"hfhpc: rank {r} resumes after {done} of its {len(shard)} rows", flush=True)
    pipe = build_pipeline(job, tokenizer)
    kwargs = call_kwargs(job)
    batch_size = spec.infer.batch_size
    log(f"{spec.infer.task} with {spec.model.id} on {rows} rows of {dref.id}:{dref.split} (column {column!r}), "
        f"{world} rank(s), batches of {batch_size}")

    # -- run ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with open(part, "a") as out:
        for lo in range(done, len(shard), batch_size):
            batch = shard[lo: lo + batch_size]
            inputs = inputs_of(batch[column], chat=chat)
            outputs = pipe(inputs, batch_size=batch_size, **kwargs)
            for k, (text, output) in enumerate(zip(inputs, outputs, strict=True)):
                prediction, score = prediction_of(output)
                record: dict[str, Any] = {"index": start + lo + k, "input": text, "prediction": prediction}
                if score is not None:
                    record["score"] = score
                if label_column:
                    record["reference"] = reference_of(batch[label_column][k], label_feature)
                out.write(json.dumps(record, default=jsonable) + "\n")
            # Per batch, so that what a killed job leaves is at most one batch short.
            out.flush()
            if stop.stopped:
                print(f"hfhpc: rank {r} stopped after {lo + len(inputs)} of {len(shard)} rows: "
                      "run the same command again to resume", flush=True)
                return EXIT_INTERRUPTED

    # -- save --------------------------------------------------------------------------------------
    new_rows = torch.tensor([len(shard) - done])
    if distributed:
        # A collective completes only once every rank has reached it: after this, every rank's file
        # is complete (it doubles as the barrier).
        dist.all_reduce(new_rows)
    seconds = time.perf_counter() - t0
    if is_main():
        tmp = tmp_name(final)
        with open(tmp, "wb") as joined:
            for i in range(world):
                with open(rank_file(job, i), "rb") as src:
                    shutil.copyfileobj(src, joined)
            joined.flush()
            os.fsync(joined.fileno())
        joined_rows = count_lines(tmp)
        if joined_rows != rows:
            tmp.unlink()
            raise HfhpcError(f"the rank files hold {joined_rows} predictions, not {rows}", "run the job again")
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for i in range(world):
            rank_file(job, i).unlink()
        predicted = int(new_rows.item())
        write_summary(job, {
            "rows": rows,
            "predicted_rows": predicted,
            "resumed_rows": rows - predicted,
            "seconds": round(seconds, 3),
            "rows_per_s": round(predicted / seconds, 3) if seconds > 0 else None,
            "task": spec.infer.task,
            "text_column": column,
            "world_size": world,
            "predictions": str(final),
        })
        log(f"done: {rows} predictions in {final}")
    if distributed:
        dist.destroy_process_group()
    return 0
