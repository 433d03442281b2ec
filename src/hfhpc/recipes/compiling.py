"""Whether compiling the decoder layers pays for itself in this job: compile seconds against the
seconds it saves over the steps left.

``train.torch_compile`` unset: the recipe runs its first steps eager, measures an eager step, and
compiles the layers only when the job has steps enough to earn the compile back (cold, or with the
kernels an earlier job kept in the store); ``true`` compiles before the first step, ``false`` never.
``hfhpc plan`` makes the same decision from its estimated step time. Standard library only: the plan
runs on login nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Measured on one H100 80GB, 1.1B Mistral shape, micro-batch 8 × 2048, no activation checkpointing,
# the decoder layers compiled as one region (benchmarks/results/sft_1b_h100_start.json): a step takes
# 0.378 s eager and 0.255 s compiled; the first compiled step took 15.2 s from nothing (12.9 s of it
# compiling) and 4.4 s with the kernels an earlier job kept in the store.
SPEEDUP = 0.378 / 0.255
COMPILE_S_COLD = 15.0
COMPILE_S_STORED = 4.0
# Eager steps run before deciding: the first warms up allocator and kernels, the second is timed.
MEASURE_AT_STEP = 2


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str

    def line(self) -> str:
        return ("compiling the decoder layers: " if self.compile else "staying eager: ") + self.reason


def saved_per_step(eager_step_s: float, speedup: float = SPEEDUP) -> float:
    return eager_step_s * (1 - 1 / speedup)


def break_even_steps(eager_step_s: float, *, stored: bool, speedup: float = SPEEDUP) -> int:
    """Steps after which compiling has paid for itself."""
    cost = COMPILE_S_STORED if stored else COMPILE_S_COLD
    saved = saved_per_step(eager_step_s, speedup)
    return math.ceil(cost / saved) if saved > 0 else 2**62


def decide(setting: bool | None, *, steps_left: int, eager_step_s: float | None, stored: bool,
           gpu: bool = True) -> CompileChoice:
    """Compile or not, and why (one line for the job's log and the plan)."""
    if setting is not None:
        return CompileChoice(bool(setting), f"train.torch_compile is {str(bool(setting)).lower()} in the spec")
    if not gpu:
        return CompileChoice(False, "no GPU (compiled kernels pay on GPUs; set train.torch_compile: true to compile anyway)")
    if eager_step_s is None:
        return CompileChoice(True, "the step time is unknown")
    cost = COMPILE_S_STORED if stored else COMPILE_S_COLD
    where = "kernels from the store" if stored else "compiled from nothing"
    saved = steps_left * saved_per_step(eager_step_s)
    need = break_even_steps(eager_step_s, stored=stored)
    numbers = (f"~{cost:.0f} s to compile ({where}) against ~{saved:.0f} s saved over {steps_left} steps left "
               f"at {eager_step_s:.2f} s per eager step (pays after ~{need} steps)")
    return CompileChoice(saved > cost, numbers)
