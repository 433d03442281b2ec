"""The GPU kinds plan knows: memory and dense bf16 peak, and naming a card from what it calls itself."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GpuKind:
    name: str
    label: str
    memory_gib: float  # what nvidia-smi reports as total
    bf16_tflops: float  # dense tensor-core peak (fp16 on V100, which has no bf16)
    bf16: bool = True
    hbm_tb_s: float = 0.0  # memory bandwidth, TB/s (the vendor's figure): what decoding is bound by


GPUS: dict[str, GpuKind] = {
    "h100": GpuKind("h100", "H100 80GB SXM", 79.6, 989.0, hbm_tb_s=3.35),
    "h200": GpuKind("h200", "H200 141GB", 140.4, 989.0, hbm_tb_s=4.8),
    "a100-80": GpuKind("a100-80", "A100 80GB", 80.0, 312.0, hbm_tb_s=2.04),
    "a100-40": GpuKind("a100-40", "A100 40GB", 40.0, 312.0, hbm_tb_s=1.56),
    "v100": GpuKind("v100", "V100 32GB", 31.7, 125.0, bf16=False, hbm_tb_s=0.9),
    "l40s": GpuKind("l40s", "L40S 48GB", 45.0, 362.0, hbm_tb_s=0.864),
}


def gpu_kind_of(name: str) -> str | None:
    """``NVIDIA H100 80GB HBM3`` → ``h100``; None when the card is not in the table."""
    n = name.lower().replace(" ", "").replace("-", "")
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100"
    if "a100" in n:
        return "a100-40" if "40gb" in n else "a100-80"
    if "v100" in n:
        return "v100"
    if "l40s" in n:
        return "l40s"
    return None
