"""``hfhpc plan`` for ``recipe: infer`` generating text: the GPU memory (weights, KV cache, the work
beside it), how many rows generate at once, and the time from the measured rate.

The engine (``hfhpc.recipes.generate``) sizes its slots from the memory left after loading the model
(``slots_in``, the same formula here); a slot holds the longest prompt plus the new tokens. Its rate
was measured on one card and one model; decoding reads the weights and the rows' caches every step,
and prefill computes two FLOPs per weight per prompt token, so the rate is scaled by the parameters
and by the card's memory bandwidth. An estimate, said to be one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hfhpc.errors import HfhpcError, UsageError
from hfhpc.plan.gpus import GIB, GPUS, GpuKind, gpu_kind_of
from hfhpc.plan.shape import ModelShape, read_model_config
from hfhpc.plan.tokens import NOT_STAGED, sample_row_lengths
from hfhpc.recipes.chatdata import chat_template_of
from hfhpc.store.lock import job_files
from hfhpc.store.prepare import staged_sample

# The measured rates: the recipe's defaults, 256 chat prompts (574.5 tokens on average), 128 new
# tokens each, on the 1.1B bench model, per card it was measured on. Another card's is the H100's,
# scaled by memory bandwidth (an H200, 1.43x the bandwidth, measured only 1.06x: at this size the
# engine is far from its bandwidth bound, so the scaling is optimistic for a small model).
ANCHORS = {
    "h100": (18_388, "benchmarks/results/infer_1b_h100_fused.json"),
    "h200": (19_482, "benchmarks/results/infer_1b_h200_fused.json"),
}
ANCHOR_PARAMS = 1.1e9
ANCHOR_ROWS = 256  # rows generating at once in those measurements
ANCHOR_GPU = "h100"  # the one other cards are scaled from
SMALLEST_PARAMS = 100e6  # below this, scaling the measured rate by the parameters means nothing
CONTEXT_BYTES = 1 << 29  # the CUDA context and libraries' workspaces, outside the caching allocator


@dataclass(frozen=True)
class InferPlan:
    name: str
    model: str
    gpu: GpuKind
    shape: ModelShape
    weights_gib: float
    kv_bytes_per_token: int
    rows: int | None
    prompt_mean: float | None
    prompt_max: int | None
    new_tokens: int
    max_len: int | None
    slots: int | None
    kv_gib: float | None
    fits: bool
    new_tokens_per_s: float | None
    est_s: float | None
    data_note: str
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        out = asdict(self)
        out["gpu"], out["shape"] = asdict(self.gpu), {"params": self.shape.params, "layers": self.shape.layers}
        return out | {"measured": [anchor_of(self.gpu)[1]]}


def anchor_of(kind: GpuKind) -> tuple[float, str]:
    """The rate measured on ``kind`` (new tokens/s of the 1.1B bench model) and its source; for a card
    not measured, the H100's scaled by memory bandwidth."""
    if kind.name in ANCHORS:
        return ANCHORS[kind.name]
    rate, source = ANCHORS[ANCHOR_GPU]
    return rate * kind.hbm_tb_s / GPUS[ANCHOR_GPU].hbm_tb_s, source


def make_infer_plan(spec: Any, store: Path, *, gpu: str | None = None, model_config: Path | None = None) -> InferPlan:
    from hfhpc.recipes.generate import DEFAULT_MAX_SLOTS, slots_in
    from hfhpc.recipes.infer import inputs_of

    if spec.infer.task != "text-generation":
        raise UsageError(f"plan estimates text generation; this spec's infer.task is {spec.infer.task!r}",
                         "size other pipeline tasks by the model's weights (2 bytes per parameter in bf16)")
    files = job_files(spec, store)
    config_path = Path(model_config) if model_config else (files.config_snapshot / "config.json" if files.config_snapshot else None)
    if config_path is None or not config_path.is_file():
        raise HfhpcError(f"the config.json of {spec.model.id} is not staged",
                         f"run `{spec.stage_command()}` on a login node, or pass --model-config PATH")
    shape = ModelShape.from_config(read_model_config(config_path), str(config_path))
    kind_name = gpu or gpu_kind_of(spec.resources.gpu_type or "") or ANCHOR_GPU
    if kind_name not in GPUS:
        raise UsageError(f"unknown GPU kind {kind_name!r}", f"use one of {', '.join(GPUS)}")
    kind = GPUS[kind_name]
    element = 4 if spec.launch.mixed_precision == "no" else 2  # the recipe's dtype on GPUs (hfhpc.recipes.infer)
    weights = shape.params * element
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * element
    new = spec.infer.max_new_tokens or 256
    notes = [] if spec.infer.max_new_tokens else ["infer.max_new_tokens is unset: 256 new tokens a row assumed (the model's generation_config may say otherwise)"]

    rows = prompt_mean = prompt_max = None
    data_note = NOT_STAGED
    if files.dataset_commit is not None and files.model_snapshot is not None and spec.dataset is not None:
        staged = staged_sample(store, spec.dataset, files.dataset_commit)
        if staged is not None:
            rows, sample = staged
            column = spec.dataset.text_column or ("messages" if "messages" in sample[0] else "text")
            prompts = inputs_of([r.get(column) for r in sample], chat=True)
            as_rows = [{"messages": p} if isinstance(p, list) else {"text": p} for p in prompts]
            lengths, how = sample_row_lengths(as_rows, files.model_snapshot, chat_template_of(files.model_snapshot, None))
            if lengths:
                prompt_mean, prompt_max = sum(lengths) / len(lengths), max(lengths)
                data_note = f"a {len(lengths)}-row sample ({how}), cut after the last user turn"
    max_len = prompt_max + new if prompt_max is not None else None
    slots = kv_gib = None
    fits = weights + CONTEXT_BYTES < kind.memory_gib * GIB
    if max_len is not None:
        free = kind.memory_gib * GIB - weights - CONTEXT_BYTES
        slots = min(DEFAULT_MAX_SLOTS["cuda"], rows or 1, slots_in(free, hidden=shape.hidden, intermediate=shape.intermediate,
                                                                   vocab=shape.vocab, kv_bytes_per_token=kv_per_token,
                                                                   max_len=max_len, element_size=element))
        kv_gib = slots * max_len * kv_per_token / GIB
        fits = fits and slots >= 1
    rate = est = None
    if kind.hbm_tb_s and fits:
        rate = anchor_of(kind)[0] * (ANCHOR_PARAMS / shape.params)
        if slots is not None and rows and slots < min(rows, ANCHOR_ROWS):
            rate *= slots / min(rows, ANCHOR_ROWS)  # fewer rows at once than measured: each step makes fewer tokens
        est = rows * new / rate if rows else None
    if shape.params < SMALLEST_PARAMS:
        notes.append("a model this small is bound by per-step overheads, not by its weights: no time is estimated")
        rate = est = None
    if spec.resources.gpus_per_node == 0:
        notes.append("the spec runs on CPU ranks: the memory is what it would take on the GPU named; no time is estimated")
        rate = est = None
    elif rows and spec.resources.gpus_per_node * spec.resources.nodes > 1 and est is not None:
        est /= spec.resources.gpus_per_node * spec.resources.nodes  # each rank a contiguous shard
    return InferPlan(name=spec.name, model=spec.model.id, gpu=kind, shape=shape, weights_gib=weights / GIB,
                     kv_bytes_per_token=kv_per_token, rows=rows, prompt_mean=prompt_mean, prompt_max=prompt_max,
                     new_tokens=new, max_len=max_len, slots=slots, kv_gib=kv_gib, fits=fits, new_tokens_per_s=rate,
                     est_s=est, data_note=data_note, notes=tuple(notes))


def render_infer_plan(plan: InferPlan) -> str:
    from hfhpc.plan.render import duration

    lines = [f"plan for {plan.name}: {plan.model} (text generation on the engine)",
             f"  model:    {plan.shape.describe()}",
             f"  GPU:      {plan.gpu.label}: weights {plan.weights_gib:.2f} GiB, KV cache {plan.kv_bytes_per_token / 1024:.1f} KiB a token"]
    if plan.rows is not None and plan.prompt_mean is not None:
        lines.append(f"  data:     {plan.rows:,} rows; prompts {plan.prompt_mean:.0f} tokens on average, {plan.prompt_max} at most "
                     f"({plan.data_note}); {plan.new_tokens} new tokens a row")
    else:
        lines.append(f"  data:     {plan.data_note}")
    if plan.slots is not None:
        lines.append(f"  at once:  {plan.slots} rows of {plan.max_len} positions: KV cache {plan.kv_gib:.1f} GiB "
                     f"({'fits' if plan.fits else 'DOES NOT FIT'} in {plan.gpu.memory_gib:.0f} GiB beside the weights)")
    elif not plan.fits:
        lines.append(f"  DOES NOT FIT: the weights alone exceed {plan.gpu.memory_gib:.0f} GiB")
    if plan.new_tokens_per_s is not None:
        scaled = "parameters" + ("" if plan.gpu.name in ANCHORS else f" and memory bandwidth from the {ANCHOR_GPU.upper()}'s")
        lines.append(f"  speed:    ~{plan.new_tokens_per_s:,.0f} new tokens/s a GPU (from {anchor_of(plan.gpu)[1]}, scaled by {scaled})"
                     + (f"; ~{duration(plan.est_s)} for the whole split" if plan.est_s else ""))
    lines += [f"  note:     {n}" for n in plan.notes]
    return "\n".join(lines)
