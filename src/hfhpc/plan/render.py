"""``hfhpc plan``'s text: the memory of each moment of a step, tokens, throughput, time, suggestions."""

from __future__ import annotations

from hfhpc.plan.gpus import GIB
from hfhpc.plan.make import Plan


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: Plan) -> str:
    p, mem = plan.inputs, plan.memory
    strategy = {"fsdp": "FSDP full shard", "ddp": "DDP", "single": "one process"}[p.strategy]
    lines = [
        f"plan for {plan.name}: {plan.model}",
        f"  model:    {p.shape.describe()}"
        + (f"; LoRA r={p.lora_rank}: {p.trainable_params / 1e6:.1f}M trainable" if p.lora else ""),
        f"  layout:   {strategy} on {p.nodes} node{'s' if p.nodes > 1 else ''} × {p.gpus_per_node} {plan.gpu.label}, "
        f"micro-batch {p.micro_batch} × {p.seq_len} tokens, gradient accumulation {p.grad_accum}, "
        f"{'activation checkpointing' if p.activation_checkpointing else 'no activation checkpointing'}, "
        f"{'fp32' if p.mixed_precision == 'no' else p.mixed_precision}, optim {p.optim}",
        "",
        "memory per GPU (GiB) at each moment of a step; the peak is marked *",
    ]
    peak = mem.peak
    for phase in mem.phases:
        mark = "*" if phase is peak else " "
        lines.append(f" {mark} {phase.name:<34} {phase.bytes / GIB:8.2f}")
        for t in phase.terms:
            if t.bytes:
                lines.append(f"      {t.name:<40} {t.gib:8.2f}   {t.formula}")
    over = " + ".join(f"{t.name} {t.gib:.1f}" for t in mem.overhead)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  peak (as torch.cuda.max_memory_allocated)  {mem.peak_gib:8.2f}",
        f"  on the card (+ {over})  {mem.reserved_gib:.1f} of {plan.gpu.memory_gib:.1f}: {verdict}",
    ]
    lines += [f"  {m}" for m in plan.measured]
    lines.append("")
    if plan.data:
        d = plan.data
        pad = f", {d.padded_tokens:,} with padding" if d.padded_tokens is not None else ""
        lines.append(f"tokens per epoch: {d.tokens:,} ({d.rows:,} rows → {d.sequences:,} sequences{pad}); {d.source}")
    else:
        lines.append(f"tokens per epoch: {plan.data_note}")
    if plan.throughput:
        tp = plan.throughput
        lines.append(f"throughput: {tp.tokens_per_s_per_gpu:,.0f} tokens/s per GPU (MFU {tp.mfu:.1%} of "
                     f"{plan.gpu.bf16_tflops:.0f} TFLOP/s at {tp.flops_per_token / 1e9:.1f} GFLOP per token), from:")
        lines += [f"  {a}" for a in tp.anchors]
    s = plan.schedule
    if s:
        lines += [
            f"time: {s.steps:,} steps × {s.step_s:.2f} s = {duration(s.train_s)}, + start-up {duration(s.startup_s)}"
            f" + {s.saves} checkpoint{'s' if s.saves != 1 else ''} × {duration(s.save_s)} = {duration(s.total_s)}",
        ]
    lines += ["", "suggested:", f"  resources: {plan.suggestion}"]
    if plan.keep_activations:
        lines.append(f"  launch.keep_activations: {plan.keep_activations} (fits; each layer kept is not recomputed "
                     f"in the backward: 6 of 32 gave +3.6% on 7.24B)")
    if s:
        allocations = "one allocation" if s.allocations == 1 else f"{s.allocations} allocations: {s.allocations - 1} requeues"
        lines += [
            f"  --time {s.time_limit} ({allocations})",
            f"  train.save_steps: {s.save_steps} (about every {duration(s.save_steps * s.step_s)})",
            f"  with the spec's time {s.spec_time_limit}: "
            + ("one allocation" if s.spec_allocations == 1 else
               f"{s.spec_allocations} allocations ({s.spec_allocations - 1} requeues; the job checkpoints and requeues itself)"
               if s.spec_allocations < 10**6 else "too short to start"),
        ]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
