"""Where a training step's time goes: ``HFHPC_PROFILE_STEPS=A-B`` profiles steps A to B of each rank
(counted from this process's start) with ``torch.profiler`` and writes ``logs/profile-rank<N>.txt``:
GPU time by kind of kernel (matrix multiplies, attention, compiled fusions, optimizer, copies,
communication), the time the GPU sat idle, and the busiest kernels."""

from __future__ import annotations

import os
import re
import time

from hfhpc.atomic import atomic_write_text
from hfhpc.env import HFHPC_PROFILE_STEPS
from hfhpc.recipes.common import log, rank
from hfhpc.run.jobfile import JobFile

# Kernel name → kind; the first match wins.
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|sm90_|sm100_|nvjet|cublas|matmul|xmma", re.I)),
    ("compiled fusion", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat|fill", re.I)),
)


def steps_to_profile() -> tuple[int, int] | None:
    value = os.environ.get(HFHPC_PROFILE_STEPS, "")
    m = re.fullmatch(r"(\d+)-(\d+)", value.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < int(m.group(1)):
        if value:
            log(f"warning: {HFHPC_PROFILE_STEPS}={value!r} is not A-B with 1 <= A <= B: no profile")
        return None
    return int(m.group(1)), int(m.group(2))


def summarize(events, wall_s: float, steps: int) -> str:
    """The profile's text: device time by kind and idle time per step, then the top kernels."""
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for e in events:
        # Kernels only: an operator's device time is its kernels' again (aten::mm holds its gemm's).
        if not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        us = getattr(e, "self_device_time_total", 0.0) or 0.0
        if us <= 0:
            continue
        kind = next((k for k, pattern in KINDS if pattern.search(e.key)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        kernels[e.key] = kernels.get(e.key, 0.0) + us
    busy = sum(kinds.values()) / 1e6
    per = 1e3 / steps
    lines = [f"{steps} step(s), {wall_s * per:.1f} ms per step; GPU busy {busy * per:.1f} ms, "
             f"idle {max(0.0, wall_s - busy) * per:.1f} ms ({max(0.0, 1 - busy / wall_s):.1%})", ""]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:>16}: {us / 1e3 / steps:9.1f} ms per step ({us / 1e6 / wall_s:6.1%} of the wall time)")
    lines += ["", "busiest kernels (ms per step):"]
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {us / 1e3 / steps:8.2f}  {name[:140]}")
    return "\n".join(lines) + "\n"


def callback(job: JobFile):
    """A TrainerCallback profiling the steps ``HFHPC_PROFILE_STEPS`` names, or None when unset."""
    window = steps_to_profile()
    if window is None:
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    first, last = window
    path = job.paths.profile(rank())

    class Profile(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0
            self.prof = None
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if self.steps + 1 == first:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=activities)
                self.prof.__enter__()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1
            if self.steps == last and self.prof is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, summarize(self.prof.key_averages(), wall, last - first + 1))
                log(f"profile of steps {first}-{last}: {path}")
                self.prof = None

    return Profile()
