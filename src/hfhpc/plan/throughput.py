"""Tokens per second per GPU: measured anchors (hfhpc's benchmark results, shipped with the package as
``measured.json``, and the page's recipe as measured in docs/performance.md), as model FLOPs
utilisation interpolated over log N on the target card."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhpc.errors import UsageError
from hfhpc.plan.gpus import GPUS, GpuKind, gpu_kind_of
from hfhpc.plan.memory import PlanInputs
from hfhpc.plan.shape import BENCH_SHAPES, SHAPE_1B, SHAPE_7B, ModelShape

MULTI_NODE_EFFICIENCY = 0.9  # not measured: inter-node all-gathers are slower than NVLink
ANCHOR_SOURCE = "docs/performance.md (2026-11-25): the page's recipe, measured"
HFHPC_SOURCE = "benchmarks/results/sft_*.json (2026-11-26): hfhpc sft recipe, varlen attention"
# The benchmark results that make anchors, copied from benchmarks/results by
# benchmarks/ship_results.py so that an installed package carries them (a test keeps the copy current).
MEASURED_FILE = Path(__file__).with_name("measured.json")


@dataclass(frozen=True)
class Anchor:
    """One measured training configuration."""

    source: str
    shape: ModelShape
    gpu: str
    world: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    padding_free: bool
    tokens_per_s_per_gpu: float
    peak_mem_gib: float | None = None
    strategy: str = "single"
    optim: str = "adamw_torch"
    weights_dtype: str = "fp32"
    per_document: bool = False  # hfhpc's sft recipe: packed documents attend only to themselves

    def ctx(self) -> int:
        return self.micro_batch * self.seq_len if self.padding_free else self.seq_len

    def mfu(self) -> float:
        return self.tokens_per_s_per_gpu * self.shape.flops_per_token(self.ctx()) / (GPUS[self.gpu].bf16_tflops * 1e12)

    def label(self) -> str:
        if self.padding_free:
            pack = "bfd packing, sdpa"
        else:
            pack = "bfd packing, attention per document" if self.per_document else "wrapped packing"
        ckpt = "checkpointing" if self.checkpointing else "no checkpointing"
        return (f"{self.shape.params / 1e9:.2f}B {self.strategy} on {self.world}×{self.gpu}, {self.micro_batch}×{self.seq_len}, "
                f"{pack}, {ckpt}: {self.tokens_per_s_per_gpu:,.0f} tok/s/GPU")


BUILTIN_ANCHORS: tuple[Anchor, ...] = (
    Anchor(ANCHOR_SOURCE, SHAPE_7B, "h100", 2, 8, 2048, True, True, 3321, 67.5, "fsdp"),
    Anchor(ANCHOR_SOURCE, SHAPE_1B, "h100", 1, 8, 2048, True, True, 7498),
    Anchor(ANCHOR_SOURCE, SHAPE_1B, "h100", 1, 8, 2048, True, False, 32915),
    Anchor(ANCHOR_SOURCE, SHAPE_1B, "h100", 1, 8, 2048, False, False, 40360, 51.6),
    # hfhpc's sft recipe (attention per document, fused AdamW, compiled; FSDP2 with per-layer
    # checkpointing), same bench.
    Anchor(HFHPC_SOURCE, SHAPE_1B, "h100", 1, 8, 2048, False, False, 61937, 38.0, optim="adamw_torch_fused", per_document=True),
    Anchor(HFHPC_SOURCE, SHAPE_7B, "h200", 2, 8, 2048, True, False, 9089, 58.4, "fsdp", optim="adamw_torch_fused", per_document=True),
    Anchor(HFHPC_SOURCE, SHAPE_7B, "h200", 4, 8, 2048, True, False, 9155, 31.8, "fsdp", optim="adamw_torch_fused", per_document=True),
)
# Measured on the 1.1B shape: wrapped packing without checkpointing runs 40,360 / 32,915 faster.
CHECKPOINTING_SPEEDUP = 40360 / 32915



SFT_RESULTS = "sft_"  # the anchors are SFT measurements (dpo_*, infer_* and the rest measure other things)


def result_records(results_dir: Path) -> list[tuple[str, dict]]:
    """(file name, record) of every GPU training result in ``results_dir`` that makes an anchor."""
    if not Path(results_dir).is_dir():
        return []
    out = []
    for path in sorted(Path(results_dir).glob(f"{SFT_RESULTS}*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records = data if isinstance(data, list) else (data.get("runs") or data.get("results") or [data]) if isinstance(data, dict) else []
        out += [(path.name, r) for r in records if _anchor_from_result(r, path.name) is not None]
    return out


def load_result_anchors(results_dir: Path | None) -> list[Anchor]:
    """Anchors from the GPU training results in ``results_dir`` (files that name ``gpu``,
    ``tokens_per_s_per_gpu`` and the shape), or from the copy shipped with the package (None)."""
    if results_dir is None:
        try:
            pairs = [(p["file"], p["record"]) for p in json.loads(MEASURED_FILE.read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            pairs = []
    else:
        pairs = result_records(results_dir)
    return [a for name, r in pairs if (a := _anchor_from_result(r, name)) is not None]


def measured_anchors(results_dir: Path | None = None) -> list[Anchor]:
    """The results' anchors, then the built-in ones no result measures again."""
    anchors = load_result_anchors(results_dir)
    return anchors + [a for a in BUILTIN_ANCHORS if not any(
        r.shape == a.shape and r.world == a.world and r.gpu == a.gpu and r.padding_free == a.padding_free
        and r.checkpointing == a.checkpointing for r in anchors)]


def write_measured(results_dir: Path, path: Path = MEASURED_FILE) -> Path:
    records = [{"file": name, "record": r} for name, r in result_records(results_dir)]
    path.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    return path


def _anchor_from_result(r: Any, source: str) -> Anchor | None:
    if not isinstance(r, dict) or not isinstance(r.get("tokens_per_s_per_gpu"), (int, float)):
        return None
    if not _recipe_defaults(r):
        return None
    kind = gpu_kind_of(str(r.get("gpu", "")))
    shape = r.get("shape")
    model_shape: ModelShape | None
    if isinstance(shape, dict):
        try:
            model_shape = ModelShape.from_config(shape, source)
        except UsageError:
            return None
    else:
        model_shape = BENCH_SHAPES.get(str(shape))
    if kind is None or model_shape is None:
        return None
    packing = str(r.get("packing", "bfd"))
    return Anchor(
        source=f"benchmarks/results/{source}", shape=model_shape, gpu=kind, world=int(r.get("world", 1)),
        micro_batch=int(r.get("bs") or r.get("micro_batch") or 8), seq_len=int(r.get("seq") or r.get("seq_len") or 2048),
        checkpointing=bool(r.get("ckpt", r.get("activation_checkpointing", True))),
        # hfhpc's own recipe runs attention per document: no dense mask over the flattened row.
        padding_free=packing in ("bfd", "bfd_split") and r.get("attn", "sdpa") == "sdpa" and r.get("recipe") != "hfhpc",
        tokens_per_s_per_gpu=float(r["tokens_per_s_per_gpu"]),
        peak_mem_gib=float(r["peak_mem_gib"]) if isinstance(r.get("peak_mem_gib"), (int, float)) else None,
        strategy=str(r.get("strategy", "fsdp" if int(r.get("world", 1)) > 1 else "single")),
        per_document=r.get("recipe") == "hfhpc",
    )


def _recipe_defaults(r: dict) -> bool:
    """Whether an hfhpc benchmark run used the sft recipe as a spec without extra settings gets it
    (the plan estimates such a spec): no launch or environment overrides, compile not turned off
    (nor left off by a short job: the plan times the compiled steps of a long one), no LoRA (its own
    cost per token), not a code path the recipe has since replaced (``superseded``)."""
    train = [str(x) for x in r.get("train") or []]
    if r.get("lora") or any(x.startswith("lora=") for x in train):
        return False
    if r.get("recipe") != "hfhpc":
        return True
    return not (r.get("launch") or r.get("env") or r.get("superseded") or "torch_compile=false" in train
                or r.get("compile_decision") == "staying eager")


@dataclass(frozen=True)
class Throughput:
    tokens_per_s_per_gpu: float
    mfu: float
    flops_per_token: float
    anchors: tuple[str, ...]
    notes: tuple[str, ...]


def estimate_throughput(p: PlanInputs, gpu: GpuKind, anchors: Sequence[Anchor]) -> Throughput:
    """Tokens per second per GPU: the anchors' MFU, interpolated over log N, on the target card."""
    same_mode = [a for a in anchors if a.padding_free == p.padding_free] or list(anchors)
    # Measurements on the target card win over the rest; otherwise MFU is assumed to carry over.
    # Cards of the same peak bf16 FLOPs (H100 and H200) share their measurements.
    on_card = [a for a in same_mode if GPUS[a.gpu].bf16_tflops == gpu.bf16_tflops]
    pool = on_card or same_mode
    notes = []
    if not on_card:
        notes.append(f"no measurement on {gpu.label}: MFU measured on {pool[0].gpu} assumed to carry over")

    def mfu_of(a: Anchor) -> float:
        value = a.mfu()
        if a.checkpointing and not p.activation_checkpointing:
            value *= CHECKPOINTING_SPEEDUP
        elif not a.checkpointing and p.activation_checkpointing:
            value /= CHECKPOINTING_SPEEDUP
        return value

    # One MFU per model size, from the anchor whose checkpointing (then GPU count) matches the plan.
    by_size: dict[int, list[float]] = {}
    for a in sorted(pool, key=lambda a: (a.checkpointing != p.activation_checkpointing, a.world != p.world)):
        by_size.setdefault(a.shape.params, []).append(mfu_of(a))
    points = sorted((math.log(n), vs[0]) for n, vs in by_size.items())
    x = math.log(p.shape.params)
    if x <= points[0][0]:
        mfu = points[0][1]
    elif x >= points[-1][0]:
        mfu = points[-1][1]
    else:
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= x <= x1:
                mfu = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                break
    if p.nodes > 1:
        mfu *= MULTI_NODE_EFFICIENCY
        notes.append(f"{p.nodes} nodes: {MULTI_NODE_EFFICIENCY:.0%} of the single-node throughput assumed (not measured)")
    ctx = p.tokens if p.padding_free else p.seq_len
    flops = p.shape.flops_per_token(ctx, trainable_weights=not p.lora)
    if p.lora:
        notes.append("LoRA: 4·N FLOPs per token (no weight gradients for frozen weights) at full fine-tuning's MFU")
    if p.padding_free:
        notes.append("bfd packing with sdpa: attention over the whole flattened micro-batch (measured 4.4× slower than "
                     "wrapped packing on 1.1B); `packing_strategy: wrapped` or a varlen attention avoids it")
    tps = mfu * gpu.bf16_tflops * 1e12 / flops
    return Throughput(tps, mfu, flops, tuple(dict.fromkeys(a.label() + f" [{a.source}]" for a in pool)), tuple(notes))

