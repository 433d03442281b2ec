"""The plan of a spec: its shape, memory, data, throughput and schedule, and what to ask for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hfhpc.errors import HfhpcError, UsageError
from hfhpc.plan.gpus import GIB, GPUS, GpuKind, gpu_kind_of
from hfhpc.plan.memory import (DEFAULT_OPTIM, KNOWN_OPTIMS, MemoryEstimate, PlanInputs, estimate_memory,
                               fewest_gpus, most_kept_layers, trl_has_fused_lm_head)
from hfhpc.plan.schedule import SAVE_BYTES_PER_S, Schedule, schedule
from hfhpc.plan.shape import LINEAR_NAMES, ModelShape, read_model_config
from hfhpc.plan.throughput import Anchor, Throughput, estimate_throughput, measured_anchors
from hfhpc.plan.tokens import DatasetTokens, dataset_tokens
from hfhpc.store.lock import job_files
from hfhpc.plan import dpo as dpo_plan
from hfhpc.recipes.dpo import RECIPE as DPO
from hfhpc.recipes.sft import RECIPE as SFT
from hfhpc.recipes.compiling import SPEEDUP, break_even_steps, decide
from hfhpc.recipes.sft import own_layers


@dataclass(frozen=True)
class Plan:
    name: str
    model: str
    inputs: PlanInputs
    gpu: GpuKind
    memory: MemoryEstimate
    fits: bool
    min_gpus: int | None  # the fewest GPUs that fit (None: none up to the search limit)
    suggestion: str
    data: DatasetTokens | None
    data_note: str
    throughput: Throughput | None
    schedule: Schedule | None
    measured: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    keep_activations: int | None = None  # a larger launch.keep_activations that still fits, if any

    @property
    def est_hours(self) -> float | None:
        return self.schedule.total_s / 3600 if self.schedule else None

    def to_json(self) -> dict:
        peak = self.memory.peak
        return {
            "name": self.name,
            "model": self.model,
            "params": self.inputs.shape.params,
            "trainable_params": self.inputs.trainable_params,
            "gpu": asdict(self.gpu),
            "config": {k: v for k, v in asdict(self.inputs).items() if k != "shape"} | {"world": self.inputs.world},
            "peak_gib_per_gpu": round(self.memory.peak_gib, 2),
            "peak_phase": peak.name,
            "reserved_gib_per_gpu": round(self.memory.reserved_gib, 2),
            "fits": self.fits,
            "breakdown": {t.name: round(t.gib, 3) for t in peak.terms},
            "phases": {p.name: {"total_gib": round(p.bytes / GIB, 3), "terms": [
                {"name": t.name, "gib": round(t.gib, 3), "formula": t.formula} for t in p.terms]} for p in self.memory.phases},
            "overhead": {t.name: round(t.gib, 3) for t in self.memory.overhead},
            "tokens_per_epoch": self.data.tokens if self.data else None,
            "dataset": asdict(self.data) if self.data else None,
            "dataset_note": self.data_note,
            "tokens_per_s_per_gpu": round(self.throughput.tokens_per_s_per_gpu, 1) if self.throughput else None,
            "mfu": round(self.throughput.mfu, 4) if self.throughput else None,
            "throughput_anchors": list(self.throughput.anchors) if self.throughput else [],
            "est_hours": round(self.est_hours, 3) if self.est_hours is not None else None,
            "schedule": asdict(self.schedule) if self.schedule else None,
            "suggested": {
                "gpus": self.min_gpus, "suggestion": self.suggestion, "keep_activations": self.keep_activations,
                "time": self.schedule.time_limit if self.schedule else None,
                "save_steps": self.schedule.save_steps if self.schedule else None,
                "requeues": self.schedule.allocations - 1 if self.schedule else None,
            },
            "measured": list(self.measured),
            "notes": list(self.notes),
        }


def inputs_from_spec(spec: Any, shape: ModelShape, *, weights_dtype: str | None = None,
                     fused_lm_head: bool | None = None) -> PlanInputs:
    t, launch, res = spec.train, spec.launch, spec.resources
    extra = t.model_extra or {}
    lora = t.lora
    targets: tuple[str, ...] = LINEAR_NAMES
    if lora is not None:
        wanted = lora.get("target_modules", "all-linear")
        if isinstance(wanted, str) and wanted != "all-linear":
            wanted = [wanted]
        if isinstance(wanted, list):
            targets = tuple(n for n in LINEAR_NAMES if n in wanted) or LINEAR_NAMES
    strategy = str(extra.get("packing_strategy", "bfd"))
    # Padding-free rows cost attention over the whole row only with a dense mask (sdpa, eager); the
    # recipe's default attention (auto, varlen) runs each document alone.
    padding_free = bool(extra.get("padding_free", getattr(t, "packing", False) and strategy in ("bfd", "bfd_split"))) and \
        getattr(t, "attention", "sdpa") not in ("auto", "varlen")
    gpn = res.gpus_per_node or res.procs
    return PlanInputs(
        shape=shape, strategy=launch.strategy, nodes=res.nodes, gpus_per_node=gpn, micro_batch=t.per_device_batch_size,
        seq_len=t.max_length, grad_accum=t.gradient_accumulation_steps,
        activation_checkpointing=launch.activation_checkpointing, mixed_precision=launch.mixed_precision,
        kept_layers=launch.keep_activations if own_layers(spec) else 0,
        # The sft recipe keeps fp32 weights for full fine-tuning; LoRA's frozen base is in the compute dtype.
        weights_dtype=weights_dtype or ("bf16" if lora is not None and launch.mixed_precision != "no" else "fp32"),  # type: ignore[arg-type]
        optim=str(extra.get("optim", DEFAULT_OPTIM)), lora_rank=int(lora.get("r", 16)) if lora is not None else None,
        lora_targets=targets, fused_lm_head=trl_has_fused_lm_head() if fused_lm_head is None else fused_lm_head,
        padding_free=padding_free, fsdp_version=spec.fsdp_version,
    )



def _measured_matches(p: PlanInputs, gpu: GpuKind, anchors: Sequence[Anchor], memory: MemoryEstimate) -> list[str]:
    out = []
    for a in anchors:
        same = (a.peak_mem_gib is not None and a.shape == p.shape and a.world == p.world and a.micro_batch == p.micro_batch
                and a.seq_len == p.seq_len and a.checkpointing == p.activation_checkpointing and a.gpu == gpu.name
                and (a.strategy == "fsdp") == p.fsdp)
        if same:
            out.append(f"measured peak for this configuration: {a.peak_mem_gib:.1f} GiB with optim {a.optim} "
                       f"(estimate {memory.peak_gib:.1f} GiB) [{a.source}]")
    return out


def compile_note(spec: Any, plan_schedule: Schedule) -> str:
    """What the recipe will decide about compiling its layers (hfhpc.recipes.compiling), from the
    estimated step time (the estimate is of compiled steps) instead of a measured eager one."""
    setting = (spec.train.model_extra or {}).get("torch_compile")
    eager_step_s = plan_schedule.step_s * SPEEDUP
    choice = decide(None if setting is None else bool(setting), steps_left=plan_schedule.steps,
                    eager_step_s=eager_step_s, stored=False)
    stored = break_even_steps(eager_step_s, stored=True)
    return f"compile: {choice.line()}; with the kernels of an earlier job in the store it pays after ~{stored} steps"


def make_plan(spec: Any, store: Path, *, gpu: str | None = None, model_config: Path | None = None,
              results_dir: Path | None = None, weights_dtype: str | None = None,
              fused_lm_head: bool | None = None) -> Plan:
    """The plan of ``spec``: model shape from its staged config.json (or ``model_config``), data
    from the store, throughput from measured anchors."""
    if spec.recipe not in (SFT.name, DPO.name):
        raise UsageError(f"plan estimates fine-tuning (recipe: {SFT.name} or {DPO.name}) and generation (recipe: infer); "
                         f"this spec's recipe is {spec.recipe!r}", "size such jobs by the model's weights (2 bytes per parameter in bf16)")
    from hfhpc.run.checkpoints import signal_delay_s

    files = job_files(spec, store)
    if model_config is not None:
        config_path = Path(model_config)
    elif files.config_snapshot is not None and (files.config_snapshot / "config.json").is_file():
        config_path = files.config_snapshot / "config.json"
    else:
        raise HfhpcError(f"the config.json of {spec.model.id} is not staged",
                         f"run `{spec.stage_command()}` on a login node, or pass --model-config PATH")
    shape = ModelShape.from_config(read_model_config(config_path), str(config_path))
    kind_name = gpu or gpu_kind_of(spec.resources.gpu_type or "") or "h100"
    if kind_name not in GPUS:
        raise UsageError(f"unknown GPU kind {kind_name!r}", f"use one of {', '.join(GPUS)}")
    kind = GPUS[kind_name]
    p = inputs_from_spec(spec, shape, weights_dtype=weights_dtype, fused_lm_head=fused_lm_head)
    dpo = spec.recipe == DPO.name
    if dpo:
        p = dpo_plan.dpo_inputs(spec, p)
    memory_of = (lambda q: dpo_plan.dpo_memory(spec, q)) if dpo else estimate_memory
    notes: list[str] = []
    if shape.params < 100e6:
        notes.append("a model this small is bound by overheads, not FLOPs: the time estimate is a lower bound")
    on_cpus = spec.resources.gpus_per_node == 0
    if on_cpus:
        notes.append(f"the spec runs on CPU ranks: the memory is what the same layout would take on {kind.label} "
                     "GPUs; no throughput or wall time is estimated (every measurement is a GPU's)")
    if not kind.bf16 and p.mixed_precision == "bf16":
        notes.append(f"{kind.label} has no bf16: use launch.mixed_precision: fp16 there")
    if not p.fused_lm_head:
        notes.append("the installed TRL builds full logits (no fused LM head): 12·b·s·V bytes counted")
    if p.optim not in KNOWN_OPTIMS:
        notes.append(f"optim {p.optim!r} is not modelled: counted as a fused AdamW")
    if p.mixed_precision != "no" and not p.fsdp and p.weights_dtype == "bf16" and not p.lora:
        notes.append("weights, gradients and AdamW states in bf16 (the recipe loads bf16 weights): small updates "
                     "can round away; --weights-dtype fp32 plans fp32 master weights")
    memory = memory_of(p)
    ok = memory.reserved_gib <= kind.memory_gib
    smallest = fewest_gpus(p, kind, memory_of)
    if smallest is None and p.strategy != "fsdp":
        with_fsdp = fewest_gpus(replace(p, strategy="fsdp", gpus_per_node=max(p.gpus_per_node, 4)), kind, memory_of)
        suggestion = (f"does not fit one {kind.label}: use launch.strategy fsdp on {with_fsdp.world} GPUs "
                      f"({with_fsdp.nodes} node{'s' if with_fsdp.nodes > 1 else ''})" if with_fsdp else
                      "does not fit: enable activation checkpointing, lower per_device_batch_size or use LoRA")
    elif smallest is None:
        suggestion = "does not fit on up to 16 nodes: enable activation checkpointing, lower per_device_batch_size or use LoRA"
    elif ok:
        suggestion = f"fits: {p.nodes} node{'s' if p.nodes > 1 else ''} × {p.gpus_per_node} GPUs as the spec asks" + (
            f" (the fewest that fit: {smallest.world})" if smallest.world < p.world else "")
    else:
        nodes = f"{smallest.nodes} node{'s' if smallest.nodes > 1 else ''}"
        suggestion = f"does not fit {p.world} GPUs; needs {nodes} × {smallest.gpus_per_node} GPUs"

    keep = most_kept_layers(p, kind) if ok and own_layers(spec) and p.activation_checkpointing and not dpo else None

    # Time the layout that will run: the spec's when it fits, else the fewest GPUs that fit.
    run_layout = p if ok or smallest is None else smallest
    anchors = measured_anchors(results_dir)
    if dpo:
        data, data_note = dpo_plan.dpo_dataset_tokens(spec, store, files, run_layout)
        # Padding-free, with compiled layers, the dpo recipe runs as the sft recipe does per FLOP
        # (benchmarks/results/dpo_1b_h100.json: 43% MFU at 8N FLOPs a token); with padded batches, at
        # the rate of TRL's own SFT.
        dpo_anchors = anchors if spec.train.padding_free else [a for a in anchors if not a.per_document] or anchors
        tp = None if on_cpus else dpo_plan.dpo_throughput(spec, estimate_throughput(run_layout, kind, dpo_anchors))
    else:
        data, data_note = dataset_tokens(spec, store, files, run_layout)
        tp = None if on_cpus else estimate_throughput(run_layout, kind, anchors)
    delay = signal_delay_s(spec)
    plan_schedule = None if tp is None else schedule(
        run_layout, data, tp, epochs=spec.train.epochs, max_steps=spec.train.max_steps,
        spec_time_s=spec.resources.time_s, signal_delay_s=delay)
    if on_cpus:
        pass
    elif plan_schedule is None:
        notes.append("wall time unknown: the number of steps needs the dataset (stage it) or train.max_steps")
    elif plan_schedule.save_s > delay:
        notes.append(f"a checkpoint takes about {plan_schedule.save_s:.0f} s (at {SAVE_BYTES_PER_S / 1e9:g} GB/s), longer than "
                     f"the {delay} s between SLURM's warning and the time limit: raise launch.signal_delay_s")
    elif run_layout is not p:
        notes.append(f"wall time is for the suggested {run_layout.nodes} node(s) × {run_layout.gpus_per_node} GPUs")
    notes += tp.notes if tp else ()
    if not dpo and own_layers(spec) and plan_schedule is not None:
        notes.append(compile_note(spec, plan_schedule))
    return Plan(
        name=spec.name, model=f"{spec.model.id} ({config_path})", inputs=p, gpu=kind, memory=memory, fits=ok,
        min_gpus=smallest.world if smallest else None, suggestion=suggestion, data=data, data_note=data_note,
        throughput=tp, schedule=plan_schedule, measured=tuple(_measured_matches(p, kind, anchors, memory)),
        notes=tuple(notes), keep_activations=keep if keep and keep > p.kept_layers else None,
    )
