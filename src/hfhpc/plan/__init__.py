"""``hfhpc plan``: GPU memory per process and wall time of a fine-tuning job, before it queues.

Everything here runs on a login node from files alone: the model's ``config.json`` (staged, found
through the lockfile), the prepared or staged dataset (read with pyarrow), the tokenizer's
``tokenizer.json`` (read with ``tokenizers``). torch is never imported.

One module per idea: ``gpus`` (the cards), ``shape`` (the model), ``memory`` (the memory model),
``throughput`` (measured anchors → tokens/s), ``tokens`` (tokens per epoch), ``schedule`` (steps,
checkpoints, allocations), ``make`` (a spec's plan), ``render`` (its text).
"""

from hfhpc.plan.gpus import GIB, GPUS, GpuKind, gpu_kind_of
from hfhpc.plan.host import host_memory_gb
from hfhpc.plan.make import Plan, inputs_from_spec, make_plan
from hfhpc.plan.memory import MemoryEstimate, PlanInputs, estimate_memory, fewest_gpus, fits, most_kept_layers
from hfhpc.plan.render import render_plan
from hfhpc.plan.schedule import Schedule, schedule
from hfhpc.plan.shape import BENCH_SHAPES, SHAPE_1B, SHAPE_7B, ModelShape, read_model_config
from hfhpc.plan.throughput import Anchor, Throughput, estimate_throughput, load_result_anchors, measured_anchors
from hfhpc.plan.tokens import DatasetTokens, tokens_from_lengths

__all__ = [
    "host_memory_gb",
    "GIB", "GPUS", "GpuKind", "gpu_kind_of", "Plan", "inputs_from_spec", "make_plan", "MemoryEstimate", "PlanInputs",
    "estimate_memory", "fewest_gpus", "fits", "most_kept_layers", "render_plan", "Schedule", "schedule",
    "BENCH_SHAPES", "SHAPE_1B", "SHAPE_7B", "ModelShape", "read_model_config", "Anchor", "Throughput",
    "estimate_throughput", "load_result_anchors", "measured_anchors", "DatasetTokens", "tokens_from_lengths",
]
