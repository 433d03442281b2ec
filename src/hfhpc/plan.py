"""``hfhpc plan``: GPU memory per process and wall time of a fine-tuning job, before it queues.

Everything here runs on a login node from files alone: the model's ``config.json`` (staged, found
through the lockfile), the prepared or staged dataset (read with pyarrow), the tokenizer's
``tokenizer.json`` (read with ``tokenizers``). torch is never imported.

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
checkpointing, ``adamw_torch``: 67.5 GiB measured (NOTES.md), 67.4 GiB here (the optimizer step:
20·N/W bytes). 1.1B shape on one H100, fp32 weights under autocast, no checkpointing, TRL: 51.6 GiB
measured (NOTES.md), 51.2 GiB here; the same without TRL's fused head (full logits), 56.6 GiB
measured, 56.5 GiB here.

Wall time: tokens per second per GPU from measured anchors (``benchmarks/results/*.json`` when they
carry ``gpu``, ``tokens_per_s_per_gpu`` …, else the built-in table below from NOTES.md), converted to
model FLOPs utilisation with 6·N + 12·L·h·ctx FLOPs per token (the bench's formula; ctx is the
flattened b·s under padding-free packing, whose SDPA mask makes attention quadratic in it),
interpolated over log N, and turned back into tokens per second for the target model and card.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hfhpc.errors import HfhpcError, UsageError

GIB = 2**30
Strategy = Literal["single", "ddp", "fsdp"]

# -- GPU kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuKind:
    name: str
    label: str
    memory_gib: float  # what nvidia-smi reports as total
    bf16_tflops: float  # dense tensor-core peak (fp16 on V100, which has no bf16)
    bf16: bool = True


GPUS: dict[str, GpuKind] = {
    "h100": GpuKind("h100", "H100 80GB SXM", 79.6, 989.0),
    "h200": GpuKind("h200", "H200 141GB", 140.4, 989.0),
    "a100-80": GpuKind("a100-80", "A100 80GB", 80.0, 312.0),
    "a100-40": GpuKind("a100-40", "A100 40GB", 40.0, 312.0),
    "v100": GpuKind("v100", "V100 32GB", 31.7, 125.0, bf16=False),
    "l40s": GpuKind("l40s", "L40S 48GB", 45.0, 362.0),
}

# Memory on the card that max_memory_allocated does not count (assumptions, stated in the output).
ALLOCATOR_SLACK = 0.05
CUDA_CONTEXT_GIB = 0.6
NCCL_GIB = 0.5

# Timing assumptions, each stated in the output.
MULTI_NODE_EFFICIENCY = 0.9  # not measured: inter-node all-gathers are slower than NVLink
STARTUP_S = 180.0  # launch, imports, NCCL init, resume
LOAD_BYTES_PER_S = 0.5e9  # weights from Lustre (node-local copy included)
SAVE_BYTES_PER_S = 1.0e9  # checkpoint writes to Lustre
CHECKPOINT_INTERVAL_S = 1800.0  # lose at most half an hour of work to a crash
TIME_LIMITS_H = (3, 12, 24)  # SLURM partitions by time at Alliance sites: shorter limits schedule sooner
TIME_MARGIN = 1.15
SAMPLE_ROWS = 200

DEFAULT_OPTIM = "adamw_torch_fused"  # transformers >= 5 with torch >= 2.8
FOREACH_OPTIMS = {"adamw_torch"}  # torch.optim.AdamW(foreach=True): sqrt(v) is a new tensor per parameter
KNOWN_OPTIMS = {DEFAULT_OPTIM, "adamw_torch", "adamw_apex_fused"}
EIGHT_BIT_OPTIMS = {"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adamw_torch_8bit"}
KNOWN_OPTIMS |= EIGHT_BIT_OPTIMS
TRL_TILE_TOKENS = 4096
TRL_TILE_VOCAB = 32768
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- model shape -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from ``config.json``: a Llama/Mistral-style decoder."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
        cfg = {**config, **(text or {})}
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if not isinstance(cfg.get(k), int)]
        if missing:
            raise UsageError(f"{source}: not a decoder config that plan understands (no {', '.join(missing)})",
                             "plan estimates Llama/Mistral-style decoders; pass --model-config with such a config.json")
        if any(isinstance(cfg.get(k), int) and cfg[k] > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise UsageError(f"{source}: mixture-of-experts models are not modelled by plan",
                             "size the job by hand from a measured run (see benchmarks/)")
        heads = cfg["num_attention_heads"]
        model_type = str(cfg.get("model_type", "?"))
        # Gemma ties its embeddings by default; the Llama family does not.
        tied = cfg.get("tie_word_embeddings", model_type.startswith("gemma"))
        return cls(
            model_type=model_type,
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(tied),
            qkv_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each matmul of a decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layer_linear_params + bias + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when untied."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    def flops_per_token(self, ctx: int, *, trainable_weights: bool = True) -> float:
        """6·N + 12·L·h·ctx: forward and backward matmuls plus attention scores (not halved for
        causality), the seed bench's formula. Frozen weights (LoRA) need no weight gradient: 4·N."""
        dense = (6 if trainable_weights else 4) * self.params
        return dense + 12 * self.layers * self.hidden * ctx

    def describe(self) -> str:
        return (f"{self.params / 1e9:.2f}B parameters ({self.model_type}, {self.layers} layers, hidden {self.hidden}, "
                f"MLP {self.intermediate}, {self.heads} heads / {self.kv_heads} kv, vocab {self.vocab})")


# -- inputs ------------------------------------------------------------------------------------


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


# -- memory ------------------------------------------------------------------------------------


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
    if p.lora and p.fsdp:
        # A wrapped layer's flat parameter mixes adapters and base weights: upcast, sharded and
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


# -- throughput anchors ------------------------------------------------------------------------

SHAPE_7B = ModelShape("mistral", 4096, 14336, 32, 32, 8, 128, 32000)
SHAPE_1B = ModelShape("mistral", 2048, 5632, 22, 32, 4, 64, 32000)
ANCHOR_SOURCE = "NOTES.md (2026-11-25): seed SFT bench, TRL, sdpa, random-init Mistral shapes"
HFHPC_SOURCE = "benchmarks/results/sft_*.json (2026-11-26): hfhpc sft recipe, varlen attention"


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
BENCH_SHAPES = {"7b": SHAPE_7B, "1b": SHAPE_1B}


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


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source checkout hfhpc runs from."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def load_result_anchors(results_dir: Path | None) -> list[Anchor]:
    """GPU training results in ``results_dir`` (files that name ``gpu``, ``tokens_per_s_per_gpu`` and
    the shape); anything else there is ignored."""
    if results_dir is None or not Path(results_dir).is_dir():
        return []
    anchors = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records = data if isinstance(data, list) else (data.get("runs") or data.get("results") or [data]) if isinstance(data, dict) else []
        for record in records:
            anchor = _anchor_from_result(record, path.name)
            if anchor is not None:
                anchors.append(anchor)
    return anchors


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
    (the plan estimates such a spec): no launch or environment overrides, compile not turned off,
    not a code path the recipe has since replaced (``superseded``)."""
    if r.get("recipe") != "hfhpc":
        return True
    train = [str(x) for x in r.get("train") or []]
    return not (r.get("launch") or r.get("env") or r.get("superseded") or "torch_compile=false" in train)


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


# -- dataset tokens ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetTokens:
    """Training tokens of one epoch under the spec's packing and truncation."""

    rows: int
    tokens: int  # tokens trained on per epoch
    sequences: int  # training sequences per epoch (packed bins, or rows)
    padded_tokens: int | None  # without packing: tokens including padding to each batch's longest row
    source: str
    exact: bool


def tokens_from_lengths(lengths: Sequence[int], *, rows: int | None = None, seq_len: int, packing: bool,
                        packing_strategy: str, micro_batch: int, source: str, exact: bool) -> DatasetTokens:
    """Per-epoch tokens from per-row token counts (all rows, or a sample scaled to ``rows``).

    bfd packing truncates rows longer than ``seq_len`` (TRL's ``pack_dataset``), bfd_split and wrapped
    keep every token; without packing each row is truncated and batches pad to their longest row.
    """
    n = len(lengths)
    total_rows = rows if rows is not None else n
    scale = total_rows / n if n else 0.0
    clipped = [min(x, seq_len) for x in lengths]
    if packing and packing_strategy in ("wrapped", "bfd_split"):
        tokens = round(sum(lengths) * scale)
    else:
        tokens = round(sum(clipped) * scale)
    padded = None
    if packing:
        # Best-fit decreasing fills bins almost completely when most rows are shorter than a bin.
        sequences = max(1, math.ceil(tokens / seq_len)) if tokens else 0
    else:
        sequences = total_rows
        shuffled = clipped[:]
        random.Random(0).shuffle(shuffled)  # the Trainer's sampler shuffles: batch maxima of a random order
        batches = [shuffled[k:k + micro_batch] for k in range(0, n, micro_batch)]
        per_row = sum(len(b) * max(b) for b in batches) / n if n else 0.0
        padded = round(per_row * total_rows)
    return DatasetTokens(total_rows, tokens, sequences, padded, source, exact)


def _arrow_table_lengths(paths: Iterable[Path], column: str) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths: list[int] = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        lengths.extend(pc.list_value_length(table.column(column)).to_pylist())
    return lengths


def _arrow_head_rows(path: Path, limit: int) -> list[dict]:
    import pyarrow as pa

    rows: list[dict] = []
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        for batch in reader:
            rows.extend(batch.to_pylist()[: limit - len(rows)])
            if len(rows) >= limit:
                break
    return rows


def prepared_dataset_tokens(folder: Path, **kw: Any) -> DatasetTokens | None:
    """Exact counts from a dataset saved by ``save_to_disk`` with an ``input_ids`` column."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
        lengths = _arrow_table_lengths(files, "input_ids")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tokens_from_lengths(lengths, source=f"prepared dataset {folder} (exact)", exact=True, **kw)


# -- chat rendering for a sample (jinja2 + tokenizers, no transformers) ----------------------------

def _render_chat(template: str | None, messages: list[dict], special: Mapping[str, str]) -> str:
    if template:
        try:
            return _jinja_env().from_string(template).render(messages=messages, add_generation_prompt=False, **special)
        except Exception:  # noqa: BLE001 - a template using features we lack: fall back to the plain text
            pass
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def _jinja_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' ``{% generation %}`` block (marks assistant text); renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env


def _special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def chat_template_of(snapshot: Path, override: str | None) -> str | None:
    """The template the sft recipe applies: the spec's, else the tokenizer's."""
    if override:
        return override
    jinja_file = snapshot / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    try:
        value = json.loads((snapshot / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def sample_row_lengths(rows: list[dict], snapshot: Path, template: str | None) -> tuple[list[int], str]:
    """Token counts of sample rows, rendered as the recipe renders them; and how they were counted."""
    texts = []
    try:
        special = _special_tokens(json.loads((snapshot / "tokenizer_config.json").read_text()))
    except (OSError, ValueError):
        special = {}
    for row in rows:
        if isinstance(row.get("messages"), list):
            texts.append(_render_chat(template, row["messages"], special))
        elif "prompt" in row and "completion" in row:
            texts.append(f"{row['prompt']}{row['completion']}")
        else:
            texts.append(str(row.get("text", "")))
    tokenizer_file = snapshot / "tokenizer.json"
    if tokenizer_file.is_file() and importlib.util.find_spec("tokenizers") is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)], "tokenizer.json"
    # A tokenizer without tokenizer.json (sentencepiece only): the usual 4 characters per token.
    return [math.ceil(len(t) / 4) for t in texts], "4 characters per token (no tokenizer.json or no tokenizers library)"


# -- the job's own files ---------------------------------------------------------------------------

@dataclass(frozen=True)
class JobFiles:
    """Where the staged model and dataset of a spec are, as far as the lockfile and store tell."""

    model_snapshot: Path | None
    model_commit: str | None
    dataset_commit: str | None


def job_files(spec: Any, store: Path) -> JobFiles:
    from hfhpc.store.layout import snapshot_dir
    from hfhpc.store.lock import load_lock

    lock = load_lock(spec.lock_path(), missing_ok=True)
    model = lock.get("model", spec.model.id) if spec.model else None
    dataset = lock.get("dataset", spec.dataset.id) if spec.dataset else None
    snap = snapshot_dir(store, "model", model.id, model.commit) if model else None
    return JobFiles(snap if snap and snap.is_dir() else None, model.commit if model else None,
                    dataset.commit if dataset else None)


def read_model_config(path: Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file", "give the model's config.json (or its folder) to --model-config") from None
    except ValueError as e:
        raise UsageError(f"{p}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: not a model config")
    return data


def dataset_tokens(spec: Any, store: Path, files: JobFiles, inputs: PlanInputs) -> tuple[DatasetTokens | None, str]:
    """Tokens of one epoch of the training split: exact from the prepared dataset, else estimated
    from a sample of the staged dataset, else None with the reason."""
    from hfhpc.recipes.chatdata import cache_key, template_marks_assistant
    from hfhpc.store.prepare import dataset_cache_dir

    t, dref = spec.train, spec.dataset
    if dref is None:
        return None, "the spec has no dataset"
    extra = t.model_extra or {}
    kw = dict(seq_len=t.max_length, packing=t.packing, packing_strategy=str(extra.get("packing_strategy", "bfd")),
              micro_batch=inputs.micro_batch)
    if files.model_snapshot is None:
        return None, "unknown: the model is not staged (its tokenizer and template are needed)"
    template = chat_template_of(files.model_snapshot, t.chat_template)
    assistant_only = t.assistant_only_loss if t.assistant_only_loss is not None else template_marks_assistant(template)
    key = cache_key(dataset_id=dref.id, commit=files.dataset_commit, config=dref.config, split=dref.split,
                    tokenizer_commit=files.model_commit, template=template, assistant_only=assistant_only,
                    max_samples=dref.max_samples)
    if importlib.util.find_spec("pyarrow") is None:  # the datasets library's Arrow reader; absent on a bare login venv
        return None, "unknown: counting tokens needs pyarrow (install the `train` extra on the login node)"
    for root in (Path(store) / "hfhpc" / "prepared", spec.run_dir() / "prepared"):
        if (root / key / "dataset_info.json").is_file():
            found = prepared_dataset_tokens(root / key, **kw)
            if found is not None:
                return found, found.source
    if files.dataset_commit is None:
        return None, "unknown: the dataset is not in the lockfile (run `hfhpc stage SPEC`)"
    for folder in dataset_cache_dir(store, dref.id, dref.config, files.dataset_commit):
        arrow = sorted(folder.glob(f"*-{dref.split}.arrow")) or sorted(folder.glob(f"*-{dref.split}-*-of-*.arrow"))
        try:
            info = json.loads((folder / "dataset_info.json").read_text())
            rows = int(info["splits"][dref.split]["num_examples"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not arrow:
            continue
        if dref.max_samples:
            rows = min(rows, dref.max_samples)
        sample = _arrow_head_rows(arrow[0], SAMPLE_ROWS)
        if not sample:
            continue
        lengths, how = sample_row_lengths(sample, files.model_snapshot, template)
        found = tokens_from_lengths(lengths, rows=rows, exact=False, **kw,
                                    source=f"estimate: {len(sample)}-row sample ({how}) × {rows:,} rows")
        return found, found.source
    return None, "unknown: the dataset is not staged in this store (run `hfhpc stage SPEC` on a login node)"


# -- the plan ---------------------------------------------------------------------------------------

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
    padding_free = bool(extra.get("padding_free", t.packing and strategy in ("bfd", "bfd_split"))) and \
        getattr(t, "attention", "sdpa") not in ("auto", "varlen")
    gpn = res.gpus_per_node or res.procs
    return PlanInputs(
        shape=shape, strategy=launch.strategy, nodes=res.nodes, gpus_per_node=gpn, micro_batch=t.per_device_batch_size,
        seq_len=t.max_length, grad_accum=t.gradient_accumulation_steps,
        activation_checkpointing=launch.activation_checkpointing, mixed_precision=launch.mixed_precision,
        kept_layers=launch.keep_activations if spec.per_layer_fsdp else 0,
        # The sft recipe keeps fp32 weights for full fine-tuning; LoRA's frozen base is in the compute dtype.
        weights_dtype=weights_dtype or ("bf16" if lora is not None and launch.mixed_precision != "no" else "fp32"),  # type: ignore[arg-type]
        optim=str(extra.get("optim", DEFAULT_OPTIM)), lora_rank=int(lora.get("r", 16)) if lora is not None else None,
        lora_targets=targets, fused_lm_head=trl_has_fused_lm_head() if fused_lm_head is None else fused_lm_head,
        padding_free=padding_free,
    )


def trl_has_fused_lm_head() -> bool:
    """Whether the installed TRL computes the loss in tiles (read from its file list, not imported)."""
    from importlib import metadata

    try:
        files = metadata.distribution("trl").files or []
    except metadata.PackageNotFoundError:
        return False
    return any(str(f).endswith("kernels/chunked_logprob.py") for f in files)


def fits(p: PlanInputs, gpu: GpuKind) -> bool:
    return estimate_memory(p).reserved_gib <= gpu.memory_gib


def fewest_gpus(p: PlanInputs, gpu: GpuKind, max_nodes: int = 16) -> PlanInputs | None:
    """The smallest layout that fits: 1..G GPUs on one node, then whole nodes (G = the spec's
    GPUs per node). Only FSDP spreads memory; for single/DDP it is one GPU or nothing."""
    per_node = max(1, p.gpus_per_node)
    if p.strategy != "fsdp":
        one = replace(p, nodes=1, gpus_per_node=1)
        return one if fits(one, gpu) else None
    layouts = [(1, g) for g in range(1, per_node + 1)] + [(n, per_node) for n in range(2, max_nodes + 1)]
    for nodes, g in layouts:
        candidate = replace(p, nodes=nodes, gpus_per_node=g)
        if fits(candidate, gpu):
            return candidate
    return None


def slurm_time(seconds: float) -> str:
    s = int(math.ceil(seconds))
    days, s = divmod(s, 86400)
    return f"{days}-{s // 3600:02}:{s % 3600 // 60:02}:{s % 60:02}"


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
                    total_s=total_s, save_steps=save_steps, time_limit=slurm_time(limit_s), allocations=allocations(limit_s),
                    spec_time_limit=slurm_time(spec_time_s), spec_allocations=allocations(spec_time_s))


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


def make_plan(spec: Any, store: Path, *, gpu: str | None = None, model_config: Path | None = None,
              results_dir: Path | None = None, weights_dtype: str | None = None,
              fused_lm_head: bool | None = None) -> Plan:
    """The plan of ``spec``: model shape from its staged config.json (or ``model_config``), data
    from the store, throughput from measured anchors."""
    if spec.recipe != "sft":
        raise UsageError(f"plan estimates fine-tuning (recipe: sft); this spec's recipe is {spec.recipe!r}",
                         "size inference jobs by the model's weights (2 bytes per parameter in bf16)")
    from hfhpc.launch.sbatch import signal_delay_s

    files = job_files(spec, store)
    if model_config is not None:
        config_path = Path(model_config)
    elif files.model_snapshot is not None and (files.model_snapshot / "config.json").is_file():
        config_path = files.model_snapshot / "config.json"
    else:
        raise HfhpcError(f"the config.json of {spec.model.id} is not staged",
                         f"run `hfhpc stage {spec.source or 'SPEC'}` on a login node, or pass --model-config PATH")
    shape = ModelShape.from_config(read_model_config(config_path), str(config_path))
    kind_name = gpu or gpu_kind_of(spec.resources.gpu_type or "") or "h100"
    if kind_name not in GPUS:
        raise UsageError(f"unknown GPU kind {kind_name!r}", f"use one of {', '.join(GPUS)}")
    kind = GPUS[kind_name]
    p = inputs_from_spec(spec, shape, weights_dtype=weights_dtype, fused_lm_head=fused_lm_head)
    notes: list[str] = []
    if shape.params < 100e6:
        notes.append("a model this small is bound by overheads, not FLOPs: the time estimate is a lower bound")
    if spec.resources.gpus_per_node == 0:
        notes.append(f"the spec runs on CPUs: the numbers are for the same layout on {kind.label} GPUs")
    if not kind.bf16 and p.mixed_precision == "bf16":
        notes.append(f"{kind.label} has no bf16: use launch.mixed_precision: fp16 there")
    if not p.fused_lm_head:
        notes.append("the installed TRL builds full logits (no fused LM head): 12·b·s·V bytes counted")
    if p.optim not in KNOWN_OPTIMS:
        notes.append(f"optim {p.optim!r} is not modelled: counted as a fused AdamW")
    if p.mixed_precision != "no" and not p.fsdp and p.weights_dtype == "bf16" and not p.lora:
        notes.append("weights, gradients and AdamW states in bf16 (the recipe loads bf16 weights): small updates "
                     "can round away; --weights-dtype fp32 plans fp32 master weights")
    memory = estimate_memory(p)
    ok = memory.reserved_gib <= kind.memory_gib
    smallest = fewest_gpus(p, kind)
    if smallest is None and p.strategy != "fsdp":
        with_fsdp = fewest_gpus(replace(p, strategy="fsdp", gpus_per_node=max(p.gpus_per_node, 4)), kind)
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

    keep = most_kept_layers(p, kind) if ok and spec.per_layer_fsdp and p.activation_checkpointing else None

    # Time the layout that will run: the spec's when it fits, else the fewest GPUs that fit.
    run_layout = p if ok or smallest is None else smallest
    anchors = list(load_result_anchors(results_dir if results_dir is not None else default_results_dir()))
    # A result file measuring a built-in configuration again supersedes it.
    anchors += [a for a in BUILTIN_ANCHORS if not any(
        r.shape == a.shape and r.world == a.world and r.gpu == a.gpu and r.padding_free == a.padding_free
        and r.checkpointing == a.checkpointing for r in anchors)]
    data, data_note = dataset_tokens(spec, store, files, run_layout)
    tp = estimate_throughput(run_layout, kind, anchors)
    delay = signal_delay_s(spec)
    plan_schedule = schedule(run_layout, data, tp, epochs=spec.train.epochs, max_steps=spec.train.max_steps,
                             spec_time_s=spec.resources.time_s, signal_delay_s=delay)
    if plan_schedule is None:
        notes.append("wall time unknown: the number of steps needs the dataset (stage it) or train.max_steps")
    elif plan_schedule.save_s > delay:
        notes.append(f"a checkpoint takes about {plan_schedule.save_s:.0f} s (at {SAVE_BYTES_PER_S / 1e9:g} GB/s), longer than "
                     f"the {delay} s between SLURM's warning and the time limit: raise launch.signal_delay_s")
    elif run_layout is not p:
        notes.append(f"wall time is for the suggested {run_layout.nodes} node(s) × {run_layout.gpus_per_node} GPUs")
    notes += tp.notes
    return Plan(
        name=spec.name, model=f"{spec.model.id} ({config_path})", inputs=p, gpu=kind, memory=memory, fits=ok,
        min_gpus=smallest.world if smallest else None, suggestion=suggestion, data=data, data_note=data_note,
        throughput=tp, schedule=plan_schedule, measured=tuple(_measured_matches(p, kind, anchors, memory)),
        notes=tuple(notes), keep_activations=keep if keep and keep > p.kept_layers else None,
    )


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


# -- rendering ---------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
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
            f"time: {s.steps:,} steps × {s.step_s:.2f} s = {_duration(s.train_s)}, + start-up {_duration(s.startup_s)}"
            f" + {s.saves} checkpoint{'s' if s.saves != 1 else ''} × {_duration(s.save_s)} = {_duration(s.total_s)}",
        ]
    lines += ["", "suggested:", f"  resources: {plan.suggestion}"]
    if plan.keep_activations:
        lines.append(f"  launch.keep_activations: {plan.keep_activations} (fits; each layer kept is not recomputed "
                     f"in the backward: 6 of 32 gave +3.6% on 7.24B)")
    if s:
        allocations = "one allocation" if s.allocations == 1 else f"{s.allocations} allocations: {s.allocations - 1} requeues"
        lines += [
            f"  --time {s.time_limit} ({allocations})",
            f"  train.save_steps: {s.save_steps} (about every {_duration(s.save_steps * s.step_s)})",
            f"  with the spec's time {s.spec_time_limit}: "
            + ("one allocation" if s.spec_allocations == 1 else
               f"{s.spec_allocations} allocations ({s.spec_allocations - 1} requeues; the job checkpoints and requeues itself)"
               if s.spec_allocations < 10**6 else "too short to start"),
        ]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Host memory per node (SLURM's --mem): self-contained, read by launch/sbatch.py.

HOST_RUNTIME_GIB = 3.0  # per rank: Python, torch and its CUDA libraries, NCCL buffers (not measured here)
HOST_WORKER_GIB = 1.0  # per dataloader worker: a forked rank whose pages diverge as refcounts change
HOST_DATA_GIB = 2.0  # per node: the tokenizer, datasets' Arrow tables (memory-mapped) and their indices
HOST_HEADROOM = 1.25  # the terms are estimates: exceeding --mem kills the job (OOM), unused memory does not
HOST_MIN_GB = 8
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "float8_e4m3fn": 1}


def host_memory_gb(spec: Any, store: Path) -> int:
    """Host memory one node of the job needs, in GB (what ``--mem`` asks for when the spec sets none).

    Why each term is there:
    - the weight files once per node: safetensors are memory-mapped, and the page cache of a mapped
      file is charged to the job's memory cgroup, shared by the node's ranks;
    - one CPU copy of the model per rank: every rank calls ``from_pretrained`` (recipes/sft.py,
      classify.py, infer.py), which builds the model on the CPU before it moves to the GPU or is
      sharded (FSDP2 shards after loading; accelerate's ``fsdp_cpu_ram_efficient_loading`` spares
      the other ranks only for FSDP1 scripts, so this counts every rank). Its dtype is fp32 for full
      fine-tuning (master weights) and on CPU, half precision for inference or LoRA on GPUs;
    - each rank's runtime (:data:`HOST_RUNTIME_GIB`) and its dataloader workers
      (``train.dataloader_num_workers``, :data:`HOST_WORKER_GIB` each);
    - the tokenizer and datasets' tables once per node (:data:`HOST_DATA_GIB`).
    """
    from hfhpc.store.layout import snapshot_dir
    from hfhpc.store.lock import load_lock

    res = spec.resources
    procs = res.procs
    file_bytes, bytes_per_param = 0, 2  # unknown dtype: assume half precision, the Hub's usual
    if spec.model is not None:
        locked = load_lock(spec.lock_path(), missing_ok=True).get("model", spec.model.id)
        if locked is not None:
            weights = [f.size for f in locked.files if f.path.endswith(".safetensors")]
            weights = weights or [f.size for f in locked.files if f.path.endswith((".bin", ".pt", ".pth"))]
            file_bytes = sum(weights)
            try:
                config = json.loads((snapshot_dir(store, "model", locked.id, locked.commit) / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            saved = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
            bytes_per_param = _DTYPE_BYTES.get(str(saved), bytes_per_param)
    half = spec.launch.mixed_precision in ("bf16", "fp16") and res.gpus_per_node > 0
    lora = spec.recipe == "sft" and getattr(spec.train, "lora", None) is not None
    load_bytes_per_param = 2 if half and (spec.recipe in ("infer", "evaluate") or lora) else 4
    cpu_copy = file_bytes / bytes_per_param * load_bytes_per_param
    workers = (spec.train.model_extra or {}).get("dataloader_num_workers") or 0
    workers = workers if isinstance(workers, int) and workers > 0 else 0
    total = (
        file_bytes
        + procs * cpu_copy
        + procs * (HOST_RUNTIME_GIB + workers * HOST_WORKER_GIB) * GIB
        + HOST_DATA_GIB * GIB
    )
    return max(HOST_MIN_GB, math.ceil(total * HOST_HEADROOM / GIB))  # SLURM's G is GiB
