"""Batch inference: a transformers pipeline over a whole dataset split, on every rank of the job.

setup (this rank's contiguous shard of the split, a pipeline of the staged model and tokenizer at
the locked commit) → run (rows appended in input order to ``predictions.rank{r}.jsonl``, flushed as
they come, so a rerun resumes after the last complete line) → save (rank 0 joins the shards in rank
order, which is input order, into ``predictions.jsonl``; ``summary.json``).

Text generation runs on the engine of :mod:`hfhpc.recipes.generate` (continuous batching over a KV
cache sized from free GPU memory) unless ``infer.engine: pipeline`` asks for the pipeline, or the
model or a setting is one the engine does not implement (the log says which); the pipeline runs every
other task, in batches of ``infer.batch_size``. Progress (rows, new tokens/s, ETA) goes to
``metrics.jsonl``.

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hfhpc import assets
from hfhpc.errors import HfhpcError, SpecError
from hfhpc.recipes.common import (
    EXIT_INTERRUPTED,
    StopOnSignal,
    append_jsonl,
    cuda_available,
    is_main,
    log,
    rank,
    spec_path,
    weights_dtype,
    world_size,
    write_summary,
)
from hfhpc.registry import Recipe
from hfhpc.run.jobfile import JobFile
from hfhpc.atomic import fsync_dir, tmp_name

TEXT_COLUMNS = ("text", "prompt", "sentence", "question")
# Whole-text classifiers: an input longer than the model's window is truncated rather than fatal.
TRUNCATING_TASKS = ("text-classification", "sentiment-analysis")
GENERATED_KEYS = ("generated_text", "summary_text", "translation_text")
# ``infer:`` keys read by the recipe itself, never passed to the pipeline.
PROGRESS_EVERY_S = 10.0


class InferSettings(BaseModel):
    """``infer:`` (recipes infer and evaluate): the pipeline task; any other key passes through to
    every pipeline call (generation arguments)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    task: str = Field("text-generation", description="transformers pipeline task")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int = Field(42, description="same on every rank: sampled generations are reproducible")
    engine: Literal["auto", "pipeline"] = Field(
        "auto", description="auto: text generation on hfhpc's engine where it applies; pipeline: always the pipeline")
    max_concurrent: int | None = Field(None, ge=1, description="at most this many rows generated at once (default: what fits)")


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
    dtype = weights_dtype(spec, gpu=gpu, frozen=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching pads; generation stops at EOS anyway
    if job.model_bases:
        # A LoRA run's adapters: the pipeline gets their base with them merged in, loaded by the task's model class.
        from transformers.pipelines import check_task

        auto_class = check_task(spec.infer.task)[1]["pt"][0]
        model = assets.load_model(auto_class, spec.model.id, job.model_commit, job.model_bases, dtype=dtype)
        return pipeline(spec.infer.task, model=model, tokenizer=tokenizer, device=device)
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


def engine_settings(job: JobFile, pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """(sampling, decoding options) when the generation engine runs this job, else None (the pipeline
    does: another task, ``infer.engine: pipeline``, or a model or setting the engine lacks; logged)."""
    from hfhpc.recipes import generate

    infer = job.spec.infer
    if infer.task != "text-generation" or infer.engine == "pipeline":
        return None
    try:
        return generate.generation_settings(pipe, kwargs, infer.seed)
    except generate.NotForEngine as e:
        log(f"generating with the pipeline, batches of {infer.batch_size}: the engine does not implement {e}")
        return None


def encode_prompts(tokenizer: Any, values: Any, options: dict[str, Any], *, chat: bool, chunk: int = 1024):
    """Token ids (int32 arrays) of every prompt of ``values`` (a dataset column, or a list), prepared as
    the pipeline prepares them."""
    import numpy as np

    from hfhpc.recipes import generate
    from hfhpc.recipes.chatdata import tokenizer_threads

    add = bool(options.get("add_special_tokens", False))
    out = []
    with tokenizer_threads("true"):  # no worker processes here: the fast tokenizer's threads may run
        for lo in range(0, len(values), chunk):
            ids = generate.encode_many(tokenizer, inputs_of(list(values[lo: lo + chunk]), chat=chat), add_special_tokens=add)
            out.extend(np.asarray(x, dtype=np.int32) for x in ids)
    return out


def build_engine(job: JobFile, pipe: Any, sampling: Any, prompts: list[Any]) -> Any:
    """The engine for these prompts: slot length from the longest, slot count from free memory (at most
    ``infer.max_concurrent`` when set)."""
    from hfhpc.recipes import generate

    model = pipe.model
    max_len = generate.max_len_for(model, sampling, (len(p) for p in prompts))
    slots = generate.plan_slots(model, max_len, len(prompts), job.spec.infer.max_concurrent)
    if prompts and slots < 1:
        raise HfhpcError(f"the KV cache of one {max_len}-token row does not fit in the GPU memory left after "
                         "loading the model", "lower infer.max_new_tokens, or use a GPU with more memory")
    log(f"generation engine: {max(slots, 1)} rows at once, {max_len} positions each")
    return generate.Engine(model, sampling, slots=max(slots, 1), max_len=max_len, tokenizer=pipe.tokenizer)


def engine_outputs(job: JobFile, pipe: Any, settings: tuple[Any, dict[str, Any]], shard: Any, column: str, *,
                   chat: bool, start: int = 0, first: int = 0, should_stop: Any = lambda: False,
                   stats: dict | None = None):
    """Generate for rows ``first``.. of ``shard`` (whose row 0 is row ``start`` of the split) on the
    engine; yield (shard row, input, prediction, new tokens) in row order. Rows are named to the
    engine by their index in the split, so that sampled text depends on the seed alone, not on the
    ranks or a resume. ``stats`` receives the engine's account of where the time went."""
    from hfhpc.recipes.generate import decode

    sampling, options = settings
    todo = shard.select(range(first, len(shard))) if first else shard
    prompts = encode_prompts(pipe.tokenizer, todo[column], options, chat=chat)
    engine = build_engine(job, pipe, sampling, prompts)
    base = start + first
    for finished in engine.run(((base + k, p) for k, p in enumerate(prompts)), should_stop=should_stop):
        row = finished.row - start
        text = inputs_of([shard[row][column]], chat=chat)[0]
        yield row, text, decode(pipe.tokenizer, finished.tokens, options), len(finished.tokens)
    if stats is not None:
        stats.update(slots=engine.slots, max_len=engine.max_len,
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in engine.stats.items()})
        log(f"engine: {stats['prompt_tokens']:,} prompt tokens in {stats['prefill_forwards']} prefills "
            f"({stats['prefill_s']:.2f} s), {stats['decode_steps']} decode steps of {stats['rows_per_step']:.0f} rows "
            f"({stats['decode_s']:.2f} s), graphs captured in {stats['capture_s']:.2f} s")


class GenerationProgress:
    """Rows done, new tokens/s and ETA, in the log and in ``metrics.jsonl`` (what ``hfhpc status``
    reads: ``step``/``max_steps`` are this rank's rows, ``step_s`` its seconds per row)."""

    def __init__(self, job: JobFile, rows: int, resumed: int, *, tokens: bool) -> None:
        self.path = job.paths.metrics
        self.rows, self.done, self.resumed = rows, resumed, resumed
        self.count_tokens = tokens  # the pipeline's outputs are text: its new tokens are not counted
        self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.first_row_s: float | None = None

    def add(self, rows: int, tokens: int) -> None:
        now = time.perf_counter()
        if self.first_row_s is None and rows:
            self.first_row_s = now - self.t0
        self.done += rows
        self.tokens += tokens
        if now - self.last >= PROGRESS_EVERY_S:
            self.write()

    def write(self) -> dict[str, Any]:
        now = time.perf_counter()
        self.last = now
        elapsed = now - self.t0
        new_rows = self.done - self.resumed
        per_row = elapsed / new_rows if new_rows else None
        record = {
            "step": self.done, "max_steps": self.rows, "rows_done": self.done, "rows": self.rows,
            "new_tokens": self.tokens if self.count_tokens else None,
            "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed > 0 and self.count_tokens else None,
            "rows_per_s": round(new_rows / elapsed, 3) if elapsed > 0 else None,
            "eta_s": round(per_row * (self.rows - self.done), 1) if per_row is not None else None,
            "step_s": round(per_row, 5) if per_row is not None else None,
            "elapsed_s": round(elapsed, 3), "unix_time": round(time.time(), 3),
        }
        if is_main():
            append_jsonl(self.path, record)
            eta = f", ETA {timedelta(seconds=int(record['eta_s']))}" if record["eta_s"] is not None else ""
            rate = (f"{record['tokens_per_s']:,.0f} new tokens/s" if record["tokens_per_s"] is not None
                    else f"{record['rows_per_s'] or 0:,.2f} rows/s")
            log(f"{self.done}/{self.rows} rows, {rate}{eta}")
        return record


# -- this recipe's own helpers --------------------------------------------------------------------------

def rank_file(job: JobFile, r: int) -> Path:
    return job.paths.rank_predictions(r)


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
    final = job.paths.predictions

    # -- setup -------------------------------------------------------------------------------------
    ds = load_rows(job)
    rows = len(ds)
    if count_lines(final) == rows:
        log(f"{final} already holds all {rows} predictions: nothing to do")
        return 0
    tokenizer = assets.load_tokenizer(spec.model.id, job.model_commit, job.model_bases)
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
    t0 = time.perf_counter()
    settings = engine_settings(job, pipe, kwargs)
    log(f"{spec.infer.task} with {spec.model.id} on {rows} rows of {dref.id}:{dref.split} (column {column!r}), "
        f"{world} rank(s), " + ("the generation engine" if settings else f"batches of {batch_size}"))

    def record_of(lo: int, text: Any, prediction: Any, score: float | None, reference: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"index": start + lo, "input": text, "prediction": prediction}
        if score is not None:
            record["score"] = score
        if label_column:
            record["reference"] = reference_of(reference, label_feature)
        return record

    # -- run ---------------------------------------------------------------------------------------
    progress = GenerationProgress(job, len(shard), done, tokens=settings is not None)
    engine_stats: dict[str, Any] = {}
    with open(part, "a") as out:
        if settings:
            for lo, text, prediction, tokens in engine_outputs(job, pipe, settings, shard, column, chat=chat, start=start, first=done,
                                                                should_stop=lambda: stop.stopped, stats=engine_stats):
                reference = shard[lo][label_column] if label_column else None
                out.write(json.dumps(record_of(lo, text, prediction, None, reference), default=jsonable) + "\n")
                out.flush()  # per row: a killed job loses only the rows still generating
                progress.add(1, tokens)
        else:
            for lo in range(done, len(shard), batch_size):
                if stop.stopped:
                    break
                batch = shard[lo: lo + batch_size]
                inputs = inputs_of(batch[column], chat=chat)
                outputs = pipe(inputs, batch_size=batch_size, **kwargs)
                for k, (text, output) in enumerate(zip(inputs, outputs, strict=True)):
                    prediction, score = prediction_of(output)
                    record = record_of(lo + k, text, prediction, score, batch[label_column][k] if label_column else None)
                    out.write(json.dumps(record, default=jsonable) + "\n")
                # Per batch, so that what a killed job leaves is at most one batch short.
                out.flush()
                progress.add(len(inputs), 0)
    if stop.stopped and progress.done < len(shard):
        print(f"hfhpc: rank {r} stopped after {progress.done} of {len(shard)} rows: "
              "run the same command again to resume", flush=True)
        return EXIT_INTERRUPTED
    final_progress = progress.write()

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
            "engine": "generate" if settings else "pipeline",
            "engine_stats": engine_stats or None,
            "first_row_s": round(progress.first_row_s, 3) if progress.first_row_s is not None else None,
            "new_tokens": final_progress["new_tokens"],
            "new_tokens_per_s": final_progress["tokens_per_s"],
            "text_column": column,
            "world_size": world,
            "predictions": str(final),
        })
        log(f"done: {rows} predictions in {final}")
    if distributed:
        dist.destroy_process_group()
    return 0
