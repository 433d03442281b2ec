"""GPU memory per process of a training step: the states, what is kept for backward, the LM head
and FSDP's buffers, at the three moments that can be the peak.

Memory model (bytes per GPU; the result is comparable with ``torch.cuda.max_memory_allocated``)
------------------------------------------------------------------------------------------------
N parameters, W processes, b micro-batch, s sequence length, T = b·s tokens per micro-batch,
h hidden size, i MLP width, L layers, a heads and kv key/value heads of size d, V vocabulary,
c bytes of the compute dtype (2 for bf16/fp16), m bytes of the trainable weights.

* States. Weights m·N, gradients m·N, AdamW moments 2·m·N. The sft recipe loads the weights in the
  compute dtype, so on one GPU or DDP m = 2 ("pure bf16"); under FSDP, accelerate upcasts every
  trainable flat parameter to fp32 (``Accelerator.prepare_model``: "we follow DeepSpeed's strategy
  to hold the parameters in full precision"), so m = 4 and FSDP all-gathers bf16 copies to compute.
  FSDP full shard divides the states by W; DDP replicates them and adds its gradient buckets (one
  more copy of the gradients, ``gradient_as_bucket_view`` being off). The foreach AdamW
  (``optim: adamw_torch``) allocates ``sqrt(v)`` for every parameter during the step (one more m·N);
  the fused AdamW (transformers' default with torch >= 2.8) works in place. Weights kept in fp32
  under autocast are also cast to bf16 once per forward and kept for backward (2 bytes per matmul
  weight). LoRA: only r·(in+out) per adapted linear is trainable, in fp32 (peft's
  ``autocast_adapter_dtype``); the frozen base weights stay in the compute dtype, except under FSDP,
  where a wrapped layer's flat parameter holds adapters and base weights together and is upcast,
  sharded and given a gradient as a whole.
* Activations kept for backward, per decoder layer and token. Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", arXiv:2205.05198, §4.1) give
  34·s·b·h + 5·a·s²·b bytes for a GPT layer with 16-bit activations. Redone here tensor by tensor
  for a Llama/Mistral layer as transformers 5 writes it, with SDPA/FlashAttention (which keep q, k,
  v, the output and a log-sum-exp instead of the a·s² scores: the s² term vanishes), no dropout,
  RMSNorm upcasting to fp32, grouped key/value heads and a SwiGLU MLP:
    2 RMSNorms: the fp32 input, 4h each, and the normalised input of the weight multiply (c·h, 4h
      in an fp32 stream) when the norm weight trains;
    linear inputs: the attention and MLP inputs once each (c·h each; with fp32 weights under
      autocast every linear casts its own bf16 copy: 3·2h + 2·2h) and down_proj's c·i;
    SDPA: q and the output c·a·d each (the output is also o_proj's input), k and v c·kv·d each
      (c·a·d when a mask forces ``repeat_kv``, as TRL's padding-free packing does);
    SwiGLU: gate, SiLU(gate) and up, c·i each.
  That is 16h + 4·a·d + 4·kv·d + 8i in bf16 and 26h + 4·a·d + 4·kv·d + 8i with fp32 weights under
  autocast, which also keeps a bf16 copy of every matmul weight (2 bytes per weight). Measured on an
  H100 (torch 2.11, transformers 5.17, memory after forward, difference between layer counts):
  1.1B shape 42.57·h per token in bf16 (formula 42.5), 7.24B shape 49.03·h (49.0), 1.1B under
  autocast 57.8·h (52.5 + 5.25 of weight copies). With activation checkpointing each layer keeps
  only its input (2h in bf16, 4h in an fp32 stream: measured exactly) and one layer is recomputed at
  a time in backward. LoRA adds a c·in input copy per adapted linear and drops what frozen weights
  would keep (not measured).
* LM head. TRL's SFTTrainer (since its fused LM head) never builds the b·s·V logits: a
  4096 × min(V, 32768) tile, the fp32 gradient accumulators of the head (4·V·h) and of its input
  (4·T·h). Without it (older TRL, plain Trainer): logits c·T·V, their fp32 copy and log-softmax 4·T·V
  each in forward, and in backward the saved log-softmax plus its gradient and the input gradient:
  12·T·V at the start of backward.
* FSDP buffers: the root unit (embeddings, head) stays gathered in c bytes between forward and
  backward; two layers are gathered at a time (prefetch), three layer-sized buffers in backward
  (the gradient before its reduce-scatter).
* Peak = the largest of three moments: the loss (states + everything saved + the head), backward
  through the first layer (states with all gradients + one layer's activations + the backward
  workspace 2·r·h + 3·c·i per token, r the stream's bytes) and the optimizer step (states + its
  temporaries).

Not in ``max_memory_allocated`` but on the card: the caching allocator's slack (5% assumed), the CUDA
context (0.6 GiB assumed) and NCCL's buffers (0.5 GiB assumed when W > 1). The plan adds them to say
whether the job fits; ``peak_gib_per_gpu`` excludes them so that it compares with the measurement.

Checked against: 7.24B Mistral shape, FSDP full shard on 2×H100, micro-batch 8 × 2048, activation
checkpointing, ``adamw_torch``: 67.5 GiB measured (docs/performance.md), 67.4 GiB here (the optimizer step:
20·N/W bytes). 1.1B shape on one H100, fp32 weights under autocast, no checkpointing, TRL: 51.6 GiB
measured (docs/performance.md), 51.2 GiB here; the same without TRL's fused head (full logits), 56.6 GiB
measured, 56.5 GiB here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from hfhpc.plan.gpus import GIB, GpuKind
from hfhpc.plan.shape import LINEAR_NAMES, ModelShape

Strategy = Literal["single", "ddp", "fsdp"]

# Memory on the card that max_memory_allocated does not count (assumptions, stated in the output).
ALLOCATOR_SLACK = 0.05
CUDA_CONTEXT_GIB = 0.6
NCCL_GIB = 0.5

DEFAULT_OPTIM = "adamw_torch_fused"  # transformers >= 5 with torch >= 2.8
FOREACH_OPTIMS = {"adamw_torch"}  # torch.optim.AdamW(foreach=True): sqrt(v) is a new tensor per parameter
KNOWN_OPTIMS = {DEFAULT_OPTIM, "adamw_torch", "adamw_apex_fused"}
EIGHT_BIT_OPTIMS = {"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adamw_torch_8bit"}
KNOWN_OPTIMS |= EIGHT_BIT_OPTIMS
TRL_TILE_TOKENS = 4096
TRL_TILE_VOCAB = 32768


@dataclass(frozen=True)
class PlanInputs:
    """One training configuration: everything the memory and time model reads."""

    shape: ModelShape
    strategy: Strategy = "single"
    nodes: int = 1
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    activation_checkpointing: bool = True
    kept_layers: int = 0  # launch.keep_activations: layers whose activations are saved, not recomputed
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    weights_dtype: Literal["fp32", "bf16"] = "bf16"  # what the recipe loads the weights as
    optim: str = DEFAULT_OPTIM
    lora_rank: int | None = None
    fsdp_version: int = 2  # under FSDP: 2 shards each parameter as it is; 1 flattens each unit (JobSpec.fsdp_version)
    lora_targets: tuple[str, ...] = LINEAR_NAMES
    fused_lm_head: bool = True  # TRL's chunked head; False: full logits
    padding_free: bool = True  # TRL's bfd packing: one flattened row with a block-diagonal SDPA mask

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def compute_bytes(self) -> int:
        return 4 if self.mixed_precision == "no" else 2

    @property
    def master_bytes(self) -> int:
        """Bytes of each trainable weight (and its gradient and each AdamW moment)."""
        if self.mixed_precision == "no" or self.fsdp:
            return 4  # FSDP: accelerate upcasts trainable flat parameters to fp32
        return 4 if self.weights_dtype == "fp32" else 2

    @property
    def autocast_fp32_weights(self) -> bool:
        """fp32 weights computed in bf16 by autocast: an fp32 residual stream and per-linear casts."""
        return self.mixed_precision != "no" and not self.fsdp and self.weights_dtype == "fp32" and not self.lora

    @property
    def stream_bytes(self) -> int:
        """Bytes per element of the residual stream between layers."""
        return 4 if (self.mixed_precision == "no" or self.autocast_fp32_weights) else 2

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def foreach_optim(self) -> bool:
        return self.optim in FOREACH_OPTIMS

    def lora_params_per_layer(self) -> int:
        if self.lora_rank is None:
            return 0
        shapes = self.shape.linear_shapes()
        return sum(self.lora_rank * (shapes[n][0] + shapes[n][1]) for n in self.lora_targets)

    @property
    def trainable_params(self) -> int:
        return self.shape.layers * self.lora_params_per_layer() if self.lora else self.shape.params


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Phase:
    name: str
    terms: tuple[Term, ...]

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass(frozen=True)
class MemoryEstimate:
    phases: tuple[Phase, ...]
    overhead: tuple[Term, ...]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_gib(self) -> float:
        """Comparable with torch.cuda.max_memory_allocated."""
        return self.peak.bytes / GIB

    @property
    def reserved_gib(self) -> float:
        """What the card must hold: the peak plus allocator slack, CUDA context and NCCL buffers."""
        return (self.peak.bytes + sum(t.bytes for t in self.overhead)) / GIB


def layer_activation_bytes_per_token(p: PlanInputs) -> tuple[float, list[str]]:
    """Bytes one decoder layer keeps for backward, per token, and the terms that make it up."""
    s = p.shape
    h, i, ad = s.hidden, s.intermediate, s.heads * s.head_dim
    c = p.compute_bytes
    # SDPA with a mask (padding-free packing) takes k/v after repeat_kv; without one, enable_gqa.
    kvd = ad if p.padding_free else s.kv_heads * s.head_dim
    fp32_stream = p.stream_bytes == 4
    shapes = s.linear_shapes()
    terms: list[tuple[str, float]] = []
    terms.append(("2 RMSNorm fp32 inputs", 2 * 4 * h))
    if not p.lora:
        terms.append(("2 normalised inputs of the norm weights", 2 * (4 if fp32_stream else c) * h))
    if p.lora:
        # Frozen base linears keep nothing; every adapter keeps its own copy of its input.
        copies = sum(c * shapes[n][0] + c * (p.lora_rank or 0) for n in p.lora_targets)
        terms.append(("LoRA adapter input copies", copies))
    elif p.autocast_fp32_weights:
        terms.append(("linear inputs (autocast casts per linear: q,k,v + gate,up; down_proj)", 5 * 2 * h + 2 * i))
    else:
        terms.append(("linear inputs (attention, MLP, down_proj)", 2 * c * h + c * i))
    # o_proj's input is SDPA's output itself (the transpose back is already contiguous): counted once.
    terms.append(("SDPA q, k, v, output", 2 * c * ad + 2 * c * kvd))
    terms.append(("SwiGLU gate, SiLU(gate), up", 3 * c * i))
    total = sum(b for _, b in terms)
    return total, [f"{name} {b / h:.1f}h" for name, b in terms]


def estimate_memory(p: PlanInputs) -> MemoryEstimate:
    """Per-GPU memory at the loss, in backward through the first layer and at the optimizer step."""
    s = p.shape
    W = p.world if p.fsdp else 1
    T = p.tokens
    c, m = p.compute_bytes, p.master_bytes
    n_train = p.trainable_params

    # -- states
    if p.lora and p.fsdp and p.fsdp_version == 2:
        # Each parameter sharded as it is: the frozen base in its loaded dtype (accelerate upcasts only
        # trainable parameters to fp32), the adapters and their gradients in fp32.
        base = 4 if p.weights_dtype == "fp32" else c
        params = Term("parameters", (base * s.params + 4 * n_train) / W,
                      f"FSDP2 shards of the frozen base ({base} bytes) + fp32 adapters")
        grads = Term("gradients", 4 * n_train / W, "fp32 adapter gradient shards")
    elif p.lora and p.fsdp:
        # FSDP1: a wrapped layer's flat parameter mixes adapters and base weights: upcast, sharded and
        # given a gradient as a whole; the root unit (embeddings, head) is frozen and stays as loaded.
        layer_flat = s.layers * (s.layer_params + p.lora_params_per_layer())
        frozen_root = s.embedding_params + s.hidden
        params = Term("parameters", (4 * layer_flat + c * frozen_root) / W,
                      "FSDP shards of fp32 layers (base + LoRA) + frozen embeddings in bf16")
        grads = Term("gradients", 4 * layer_flat / W, "fp32 shards of the wrapped layers (FSDP1 grads whole flat params)")
    elif p.lora:
        base = 4 if p.weights_dtype == "fp32" else c
        params = Term("parameters", base * s.params + 4 * n_train, f"frozen base ({base} bytes) + fp32 adapters")
        grads = Term("gradients", 4 * n_train, "fp32 adapter gradients")
    else:
        where = f"/ {W} (FSDP full shard)" if p.fsdp else ("replicated (DDP)" if p.strategy == "ddp" and p.world > 1 else "")
        params = Term("parameters", m * s.params / W, f"{m}·N {where}".strip())
        grads = Term("gradients", m * s.params / W, f"{m}·N {where}".strip())
    opt_bytes_per_param = 2.0 if p.optim in EIGHT_BIT_OPTIMS else 2 * (4 if p.lora else m)
    optimizer = Term("optimizer states", opt_bytes_per_param * n_train / W,
                     f"AdamW m and v, {opt_bytes_per_param:g} bytes per trainable parameter" + (f" / {W}" if W > 1 else ""))
    states = [params, optimizer]
    buckets: list[Term] = []
    if p.strategy == "ddp" and p.world > 1:
        buckets.append(Term("DDP gradient buckets", grads.bytes, "one more copy of the gradients"))
    copies: list[Term] = []
    if p.autocast_fp32_weights:
        # autocast's cache holds a bf16 copy of every weight until the forward ends (and autograd
        # keeps them for backward when nothing is recomputed); TRL's fused head casts its own tile.
        cast = s.layers * s.layer_linear_params + (0 if p.fused_lm_head else s.vocab * s.hidden)
        copies = [Term("autocast bf16 weight copies", 2 * cast, "2 bytes per matmul weight")]
    gathered_fwd: list[Term] = []
    gathered_bwd: list[Term] = []
    if p.fsdp:
        root = Term("FSDP gathered root unit", c * (s.embedding_params + s.hidden), "embeddings + head in the compute dtype")
        gathered_fwd = [root, Term("FSDP gathered layers", 2 * c * s.layer_params, "current + prefetched layer")]
        gathered_bwd = [root, Term("FSDP gathered layers", 3 * c * s.layer_params, "2 layers + an unsharded layer gradient")]

    # -- activations
    per_token, parts = layer_activation_bytes_per_token(p)
    layer_act = per_token * T
    stream = p.stream_bytes
    kept = min(p.kept_layers, s.layers) if p.activation_checkpointing else 0
    if p.activation_checkpointing and kept:
        saved = Term("activations (checkpointed layer inputs, kept layers)",
                     (s.layers - kept) * stream * s.hidden * T + kept * layer_act,
                     f"{s.layers - kept}·{stream}·h·T + {kept} kept layers · {per_token / s.hidden:.0f}·h·T")
    elif p.activation_checkpointing:
        saved = Term("activations (checkpointed layer inputs)", s.layers * stream * s.hidden * T,
                     f"L·{stream}·h·T; per recomputed layer {per_token / s.hidden:.0f}·h·T")
    else:
        saved = Term("activations", s.layers * layer_act, f"L·({' + '.join(parts)})·T")
    final = Term("final norm + head input", (4 + 2 * stream) * s.hidden * T, "RMSNorm and the head's input copy")
    if p.fused_lm_head:
        tile = c * min(T, TRL_TILE_TOKENS) * min(s.vocab, TRL_TILE_VOCAB)
        head = Term("LM head (TRL chunked)", tile + 4 * s.vocab * s.hidden + 4 * T * s.hidden,
                    "a 4096×32768 logit tile + fp32 gradients of the head weight and input")
    else:
        head = Term("logits", 12 * T * s.vocab, "fp32 log-softmax + its gradient + input gradient: 12·T·V")
    accumulated = [grads] if p.grad_accum > 1 else []

    phase_loss = Phase("loss (end of forward)",
                       tuple(states + accumulated + buckets + copies + gathered_fwd + [saved, final, head]))
    workspace = Term("backward workspace", (2 * stream * s.hidden + 3 * c * s.intermediate) * T,
                     "gradients inside one layer: 2·r·h + 3·c·i per token")
    recompute = [Term("one layer's activations", layer_act, "recomputed (checkpointing) or still saved")]
    if p.autocast_fp32_weights:
        recompute.append(Term("its autocast weight copies", 2 * s.layer_linear_params, "2 bytes per matmul weight"))
    if p.activation_checkpointing:
        recompute.append(Term("its checkpointed input", stream * s.hidden * T, "r·h·T"))
    phase_bwd = Phase("backward (first layer)", tuple(states + [grads] + buckets + gathered_bwd + recompute + [workspace]))
    temp = Term("optimizer step temporaries", (4 if p.lora else m) * n_train / W if p.foreach_optim else 0.0,
                "foreach AdamW's sqrt(v)" if p.foreach_optim else f"none ({p.optim} works in place)")
    phase_opt = Phase("optimizer step", tuple([params, grads, optimizer, temp] + buckets))

    overhead = [Term("allocator slack", ALLOCATOR_SLACK * max(phase_loss.bytes, phase_bwd.bytes, phase_opt.bytes),
                     f"{ALLOCATOR_SLACK:.0%} of the peak (assumed)"),
                Term("CUDA context", CUDA_CONTEXT_GIB * GIB, "assumed")]
    if p.world > 1:
        overhead.append(Term("NCCL buffers", NCCL_GIB * GIB, "assumed"))
    return MemoryEstimate((phase_loss, phase_bwd, phase_opt), tuple(overhead))


def trl_has_fused_lm_head() -> bool:
    """Whether the installed TRL computes the loss in tiles (read from its file list, not imported)."""
    from importlib import metadata

    try:
        files = metadata.distribution("trl").files or []
    except metadata.PackageNotFoundError:
        return False
    return any(str(f).endswith("kernels/chunked_logprob.py") for f in files)


def fits(p: PlanInputs, gpu: GpuKind, memory: Callable[[PlanInputs], MemoryEstimate] | None = None) -> bool:
    return (memory or estimate_memory)(p).reserved_gib <= gpu.memory_gib


def fewest_gpus(p: PlanInputs, gpu: GpuKind, memory: Callable[[PlanInputs], MemoryEstimate] | None = None,
                max_nodes: int = 16) -> PlanInputs | None:
    """The smallest layout that fits: 1..G GPUs on one node, then whole nodes (G = the spec's
    GPUs per node). Only FSDP spreads memory; for single/DDP it is one GPU or nothing."""
    per_node = max(1, p.gpus_per_node)
    if p.strategy != "fsdp":
        one = replace(p, nodes=1, gpus_per_node=1)
        return one if fits(one, gpu, memory) else None
    layouts = [(1, g) for g in range(1, per_node + 1)] + [(n, per_node) for n in range(2, max_nodes + 1)]
    for nodes, g in layouts:
        candidate = replace(p, nodes=nodes, gpus_per_node=g)
        if fits(candidate, gpu, memory):
            return candidate
    return None


KEEP_MARGIN = 0.9  # kept layers are suggested up to this share of the card (the estimate is not exact)


def most_kept_layers(p: PlanInputs, kind: GpuKind) -> int:
    """The most decoder layers that can keep their activations (launch.keep_activations) and still fit."""
    fits = lambda n: estimate_memory(replace(p, kept_layers=n)).reserved_gib <= KEEP_MARGIN * kind.memory_gib  # noqa: E731
    lo, hi = p.kept_layers, p.shape.layers
    if not fits(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
