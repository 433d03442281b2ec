"""Fine-tune a sequence classifier with the transformers Trainer, offline from the store.

setup (tokenizer, the labels from the dataset's ClassLabel, tokenized splits, the model with a head
of that many labels, Evaluate metrics) → train (resuming from the newest complete checkpoint,
scoring the eval split at each evaluation) → save (``model/`` with the tokenizer and the label
names, ``eval.json``, ``summary.json``).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from hfhpc import assets
from hfhpc.errors import HfhpcError, SpecError
from hfhpc.recipes import checkpoint, metrics
from hfhpc.recipes.common import (
    EXIT_INTERRUPTED,
    StopOnSignal,
    is_main,
    log,
    spec_path,
    train_from_checkpoint,
    trainer_callbacks,
    training_kwargs,
    write_summary,
)
from hfhpc.recipes.infer import inputs_of, text_column
from hfhpc.registry import Recipe
from hfhpc.spec import TrainBase
from hfhpc.run.jobfile import JobFile
from hfhpc.atomic import atomic_write_json
# What Trainer.evaluate() reports besides scores: it belongs in the summary, not in eval.json.
NOT_SCORES = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step"}


class ClassifyTrain(TrainBase):
    """``train:`` of the classify recipe; any other key passes through to ``TrainingArguments``."""

    max_length: int = Field(1024, ge=8, description="tokens per input (longer ones are truncated)")


def _check(spec: Any) -> None:
    if spec.train.lora is not None:
        raise ValueError("train.lora: classify trains every weight: remove it")


RECIPE = Recipe(
    name="classify",
    summary="fine-tune a sequence classifier with the transformers Trainer, scored by Evaluate metrics",
    needs=("model", "dataset"),
    train=ClassifyTrain,
    trainer_config="transformers:TrainingArguments",
    starter={
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
    check=_check,
)


def main(job: JobFile) -> int:
    import numpy as np
    from datasets import ClassLabel
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    stop = StopOnSignal().install()
    spec, t, dref = job.spec, job.spec.train, job.spec.dataset
    model_id, commit, bases = spec.model.id, job.model_commit, job.model_bases

    # -- setup -------------------------------------------------------------------------------------
    tokenizer = assets.load_tokenizer(model_id, commit, bases)
    splits = {}
    for split in dref.all_splits():
        ds = assets.load_split(dref.id, job.dataset_commit, split, dref.config)
        splits[split] = ds.select(range(min(dref.max_samples, len(ds)))) if dref.max_samples else ds
    train_raw = splits[dref.split]
    eval_raw = splits.get(dref.eval_split) if dref.eval_split else None

    label_column = dref.label_column or "label"
    if label_column not in train_raw.column_names:
        raise SpecError(spec_path(job), "dataset.label_column", f"the split has no column {label_column!r}",
                        f"set dataset.label_column to one of {train_raw.column_names}")
    column = text_column(train_raw.column_names, dref.text_column, chat=False, source=spec_path(job))
    feature = train_raw.features[label_column]
    # A ClassLabel fixes the names and their ids; plain values are numbered in sorted order.
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for v in train_raw[label_column]})
    label2id = {name: i for i, name in enumerate(names)}

    def label_id(value: Any) -> int:
        if isinstance(feature, ClassLabel):
            return int(value)
        if str(value) not in label2id:
            raise HfhpcError(f"label {value!r} of the eval split is not among the training split's {names}",
                             "use an eval split with the training split's labels")
        return label2id[str(value)]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(inputs_of(batch[column], chat=False), truncation=True, max_length=t.max_length)
        enc["labels"] = [label_id(v) for v in batch[label_column]]
        return enc

    def tokenized(ds):
        # In memory: a cache file would land beside the dataset's Arrow files, in the (shared) store.
        return ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True)

    train_ds = tokenized(train_raw)
    eval_ds = tokenized(eval_raw) if eval_raw is not None else None
    log(f"{len(names)} labels {names}; {len(train_ds)} training rows"
        + (f", {len(eval_ds)} eval rows" if eval_ds is not None else "") + f" (column {column!r})")

    kwargs = training_kwargs(job)
    if eval_ds is None:
        kwargs.update(eval_strategy="no")
        kwargs.pop("eval_steps", None)
    else:
        # Score the eval split once per epoch unless train.eval_steps asks for more often.
        kwargs.setdefault("eval_strategy", "epoch")
    args = TrainingArguments(**kwargs)

    # A checkpoint that already has a classification head of another size gets a new one.
    model = assets.load_model(
        AutoModelForSequenceClassification, model_id, commit, bases, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id,
        ignore_mismatched_sizes=True,
    )
    # The loss is a mean over this rank's batch, whatever `num_items_in_batch` says. Left to guess
    # from `forward(**kwargs)`, the Trainer would take it for a token-sum loss: multiply it by the
    # number of ranks (logged and trained on: 2× with 2 ranks) and skip the gradient-accumulation
    # division. transformers' own models say so with this same class attribute.
    model.accepts_loss_kwargs = False
    score = metrics.load_metrics([m.id for m in spec.metrics]) if spec.metrics else None

    def compute_metrics(eval_pred) -> dict[str, Any]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return score(np.argmax(logits, axis=-1).tolist(), np.asarray(eval_pred.label_ids).tolist())

    class NoEvalWhenStopping(TrainerCallback):
        """A stop cuts the epoch short, and the Trainer then runs the end-of-epoch evaluation: on a
        large eval split that can outlast the grace time before the time limit. Skip it."""

        def on_epoch_end(self, args, state, control, **kw):
            if stop.stopped:
                control.should_evaluate = False
            return control

    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        compute_metrics=compute_metrics if score else None,
        callbacks=[*trainer_callbacks(job, stop), NoEvalWhenStopping()],
    )
    checkpoint.install(trainer, stop)  # checkpoints that are complete or absent

    # -- train -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    result, resumed_from = train_from_checkpoint(trainer, job.run_dir, stop)
    if result is None:
        return EXIT_INTERRUPTED
    train_seconds = time.perf_counter() - t0

    # -- save --------------------------------------------------------------------------------------
    final: dict[str, Any] = {}
    if eval_ds is not None:
        # Training that ended on an evaluation (the last epoch's) is not evaluated a second time.
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        final = last if last and last.get("step") == trainer.state.global_step else trainer.evaluate()
    scores = {k.removeprefix("eval_"): v for k, v in final.items()
              if k.startswith("eval_") and k.removeprefix("eval_") not in NOT_SCORES}
    out = job.paths.model
    trainer.save_model(str(out))
    if is_main():
        tokenizer.save_pretrained(str(out))
        if eval_ds is not None:
            atomic_write_json(job.paths.eval, {**scores, "rows": len(eval_ds)})
    write_summary(job, {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(train_seconds, 2),
        "eval": scores,
        "epochs": trainer.state.epoch,
        "labels": names,
        "model_dir": str(out),
        "resumed_from": resumed_from,
        "world_size": args.world_size,
    })
    log("done: model in " + str(out) + "".join(f", {k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    return 0
