"""Steps, seconds, checkpoints and SLURM allocations of a training run."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hfhpc import slurmtime
from hfhpc.plan.memory import PlanInputs
from hfhpc.plan.throughput import Throughput
from hfhpc.plan.tokens import DatasetTokens

# Timing assumptions, each stated in the output.
STARTUP_S = 180.0  # launch, imports, NCCL init, resume
LOAD_BYTES_PER_S = 0.5e9  # weights from Lustre (node-local copy included)
SAVE_BYTES_PER_S = 1.0e9  # checkpoint writes to Lustre
CHECKPOINT_INTERVAL_S = 1800.0  # lose at most half an hour of work to a crash
TIME_LIMITS_H = (3, 12, 24)  # SLURM partitions by time at Alliance sites: shorter limits schedule sooner
TIME_MARGIN = 1.15



@dataclass(frozen=True)
class Schedule:
    steps: int
    step_s: float
    train_s: float
    startup_s: float
    save_s: float
    saves: int
    total_s: float
    save_steps: int
    time_limit: str
    allocations: int
    spec_time_limit: str
    spec_allocations: int



def schedule(p: PlanInputs, data: DatasetTokens | None, tp: Throughput, *, epochs: float, max_steps: int,
             spec_time_s: int, signal_delay_s: int) -> Schedule | None:
    """Steps, seconds and allocations; None when neither the data nor max_steps bound the run."""
    global_batch = p.micro_batch * p.grad_accum * p.world
    if max_steps > 0:
        steps = max_steps
    elif data is not None:
        steps = math.ceil(epochs * math.ceil(data.sequences / global_batch))
    else:
        return None
    # Each step runs micro_batch × grad_accum sequences per GPU: full bins when packed, padded rows otherwise.
    seq_tokens: float = p.seq_len
    if data is not None and data.padded_tokens is not None and data.rows:
        seq_tokens = data.padded_tokens / data.rows
    step_s = p.micro_batch * p.grad_accum * seq_tokens / tp.tokens_per_s_per_gpu
    train_s = steps * step_s
    weight_bytes = p.shape.params * (4 if p.weights_dtype == "fp32" else 2)
    startup_s = STARTUP_S + weight_bytes / LOAD_BYTES_PER_S
    # A checkpoint holds the weights and the optimizer states (all shards of them).
    ckpt_bytes = p.trainable_params * (4 if p.lora else p.master_bytes) * 3
    save_s = ckpt_bytes / SAVE_BYTES_PER_S
    interval_s = max(CHECKPOINT_INTERVAL_S, 20 * save_s)  # saves cost at most 5% of the time
    save_steps = max(1, min(steps, round(interval_s / step_s)))
    saves = steps // save_steps
    total_s = startup_s + train_s + saves * save_s

    def allocations(limit_s: float) -> int:
        # Every allocation pays the start-up and stops at SLURM's warning signal to checkpoint.
        usable = limit_s - startup_s - max(signal_delay_s, save_s)
        if usable <= 0:
            return 10**6
        return max(1, math.ceil((train_s + saves * save_s) / usable))

    needed = total_s * TIME_MARGIN
    limit_s = next((h * 3600 for h in TIME_LIMITS_H if needed <= h * 3600), TIME_LIMITS_H[-1] * 3600)
    if needed <= limit_s:
        limit_s = min(limit_s, math.ceil(needed / 900) * 900)  # round up to 15 minutes
    return Schedule(steps=steps, step_s=step_s, train_s=train_s, startup_s=startup_s, save_s=save_s, saves=saves,
                    total_s=total_s, save_steps=save_steps, time_limit=slurmtime.format(limit_s), allocations=allocations(limit_s),
                    spec_time_limit=slurmtime.format(spec_time_s), spec_allocations=allocations(spec_time_s))
