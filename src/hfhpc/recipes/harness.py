"""``recipe: harness``: lm-evaluation-harness benchmarks on the spec's model, sealed and offline.

setup → resolve the tasks through the harness's registry (their datasets were staged and checked) →
``simple_evaluate`` with the harness's own HF model class on the staged commit, data-parallel over
the job's ranks → save ``eval.json`` (task → metric → value and stderr), the harness's results file
and its per-sample logs under ``harness/``.

The harness keeps no state between requests, so a run stopped by a signal cannot resume: it exits 3
(the batch script requeues it) and the next run starts the evaluation again, saying so.
"""

from __future__ import annotations

import inspect
import json
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hfhpc.recipes import harness_tasks
from hfhpc.registry import Recipe

# The arguments of ``lm_eval.simple_evaluate`` hfhpc sets itself; every other one passes through.
OWN_ARGUMENTS = frozenset({"model", "model_args", "tasks", "task_manager", "device", "log_samples",
                           "num_fewshot", "batch_size", "limit", "use_cache", "cache_requests"})
CPU_BATCH_SIZE = 8


class HarnessSpec(BaseModel):
    """lm-evaluation-harness settings. Other keys pass through to ``lm_eval.simple_evaluate``
    (``bootstrap_iters``, ``apply_chat_template``, ``fewshot_as_multiturn``, ``gen_kwargs``,
    ``random_seed`` …)."""

    model_config = ConfigDict(extra="allow")

    tasks: list[str] = Field(min_length=1, description="task, group or tag names (hellaswag, arc_easy, mmlu …) or paths of task YAML files")
    include: list[str] = Field(default_factory=list, description="folders of custom task YAMLs (the harness's include_path)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (default: each task's own)")
    batch_size: int | Literal["auto"] | None = Field(None, description="requests per forward (default: auto on GPUs, 8 on CPUs)")
    limit: float | None = Field(None, gt=0, description="only the first N documents of each task (or a fraction below 1): for testing")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("batch_size must be at least 1, or auto")
        return v


RECIPE = Recipe(
    name="harness",
    summary="lm-evaluation-harness benchmarks (hellaswag, arc_easy, mmlu …) on the model, offline",
    needs=("model", "harness"),
    train=None,
    trainer_config=None,
    starter={
        "name": "zephyr-harness",
        "recipe": "harness",
        "model": "HuggingFaceH4/zephyr-7b-beta",
        "harness": {"tasks": ["hellaswag", "arc_easy", "mmlu"], "num_fewshot": 0},
        "launch": {"strategy": "ddp", "mixed_precision": "bf16"},
        "resources": {"nodes": 1, "gpus_per_node": 4, "time": "0-02:00:00", "account": "def-someone"},
        "output_dir": "runs/zephyr-harness",
    },
    sections={"harness": HarnessSpec},
    datasets=harness_tasks.task_datasets,
    offline_check=harness_tasks.offline_check,
)


def unknown_arguments(spec: HarnessSpec) -> list[str]:
    """Pass-through keys ``simple_evaluate`` does not take (they would fail after the queue)."""
    import lm_eval

    names = set(inspect.signature(lm_eval.simple_evaluate).parameters)
    return sorted(k for k in (spec.model_extra or {}) if k not in names or k in OWN_ARGUMENTS)


def task_arguments(spec) -> tuple[list[str], list[str]]:
    """The spec's tasks (YAML paths made absolute against the spec's folder) and include folders."""
    tasks = []
    for t in spec.harness.tasks:
        is_file = t.endswith((".yaml", ".yml")) or "/" in t
        tasks.append(str(spec.resolve_path(t)) if is_file else t)
    return tasks, [str(spec.resolve_path(p)) for p in spec.harness.include]


def eval_table(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{task: {metric: {"value", "stderr"}}}`` from the harness's ``results`` block, whose keys are
    ``metric,filter`` (``acc,none``) beside ``metric_stderr,filter``; a filter other than ``none``
    stays in the name (``exact_match/strict-match``)."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, row in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            stderr = row.get(f"{metric}_stderr,{filt}")
            metrics[name] = {"value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        table[task] = metrics
    return table


class _Stopped(Exception):
    pass


def main(job) -> int:
    import torch
    import torch.distributed as dist

    import lm_eval
    from hfhpc.recipes.common import EXIT_INTERRUPTED, is_main, log, rank, world_size, write_summary
    from hfhpc.atomic import atomic_write_json, atomic_write_text
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    spec, settings = job.spec, job.spec.harness
    t0 = time.perf_counter()
    tasks, include = task_arguments(spec)
    cuda = torch.cuda.is_available()
    world = world_size()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    batch_size = settings.batch_size or ("auto" if cuda else CPU_BATCH_SIZE)

    def stop(signum, frame):  # noqa: ARG001
        raise _Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, stop)

    log(f"lm-evaluation-harness {lm_eval.__version__}: {', '.join(settings.tasks)} on {spec.model.id} "
        f"({world} rank{'s' if world > 1 else ''}, batch size {batch_size})")
    try:
        if job.model_bases:
            # A LoRA run's adapters: their base with them merged in, handed to the harness loaded.
            from transformers import AutoModelForCausalLM

            from hfhpc import assets

            model = assets.load_model(AutoModelForCausalLM, spec.model.id, job.model_commit, job.model_bases,
                                      dtype=torch.bfloat16 if cuda else torch.float32).to(device).eval()
            lm = HFLM(pretrained=model, tokenizer=assets.load_tokenizer(spec.model.id, job.model_commit, job.model_bases),
                      batch_size=batch_size)
        else:
            lm = HFLM(pretrained=spec.model.id, revision=job.model_commit, device=device,
                      dtype="bfloat16" if cuda else "float32", batch_size=batch_size)
        if world > 1:
            # The harness splits requests by its model's rank and world size but counts ranks per
            # node (local_process_index); hfhpc's ranks are global, over every node.
            lm._rank, lm._world_size = rank(), world
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
            task_manager=TaskManager(include_path=include or None), log_samples=True,
            **(settings.model_extra or {}),
        )
    except _Stopped as e:
        log(f"stopped on {e}: lm-evaluation-harness cannot resume a run; running the job again starts "
            "the evaluation again")
        return EXIT_INTERRUPTED
    if not is_main() or results is None:
        return 0
    out = Path(job.run_dir)
    folder = out / "harness"
    folder.mkdir(exist_ok=True)
    for task, samples in (results.pop("samples", None) or {}).items():
        lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
        atomic_write_text(folder / f"samples_{Path(task).name}.jsonl", lines)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    table = eval_table(results.get("results", {}))
    atomic_write_json(job.paths.eval, table)
    seconds = time.perf_counter() - t0
    write_summary(job, {"tasks": settings.tasks, "eval": table, "seconds": round(seconds, 1),
                        "harness": lm_eval.__version__})
    for task, metrics in table.items():
        shown = ", ".join(f"{m} {v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v["stderr"] is not None else "")
                          for m, v in metrics.items())
        log(f"{task}: {shown}")
    log(f"eval.json and the harness's results in {out} ({seconds:.0f} s)")
    return 0
