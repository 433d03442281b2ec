"""Text generation at engine speed: a slot KV cache, continuous batching and graph-replayed decode steps.

The ``text-generation`` pipeline pads a batch, generates until its longest row ends and starts the
next: the GPU waits on Python between small kernels, and every row pays for the slowest. Here:

- **Slots.** One preallocated KV cache per layer (layouts: ``SlotCache``). The
  number of slots comes from the GPU memory left after loading the model (``max_len`` is the longest
  prompt of the shard plus the new tokens), so the user picks no batch size.
- **Prefill** of length-sorted batches of prompts (a token budget per forward); each row's keys and
  values go straight into its slot. On a GPU in bf16/fp16 (the ``varlen`` attention) the prompts are
  packed end to end, no padding, through FlashAttention's variable-length kernel; otherwise they are
  right-padded and run through PyTorch's causal SDPA.
- **Decode** of every slot at once, one token per step: each row attends to its own slot up to its own
  position, so rows of any lengths share a step. ``varlen`` (the GPU default): one FlashAttention
  call per layer reads each slot's own length, grouped query heads sharing their key/value head, and
  one CUDA graph serves every step. ``sdpa``/``matmul`` read every slot up to a shared span, masked;
  on CUDA their step is captured once per span bucket. Graphs are captured while the first prefill
  runs on the GPU and replayed with no Python or launch gaps between kernels. ``Engine(attention=...)`` or ``HFHPC_DECODE_ATTENTION`` picks one (for
  measurements).
- **Continuous batching.** A row that ends (EOS, ``max_new_tokens``, a stop string) frees its slot; the
  next prompts are prefilled into the free slots while the others keep decoding.
- **Order.** Prompts are taken in windows, sorted by length within a window (similar lengths share
  prefill batches and attention buckets); finished rows come back in input order, so the output file
  grows in order and a rerun resumes after its last complete line.

The model is the transformers model itself, with two hooks of transformers' own API (a ``Cache``
object's ``update`` and a registered attention function). While the engine runs, the decoder layers
of Llama-family models take the engine's forwards (``hfhpc.recipes.fused``: the same math in fewer
kernels; ``Engine(fused=False)`` keeps transformers' own). Greedy output equals ``model.generate`` on each prompt alone
(``tests/integration/test_generate.py``, ``tests/gpu/test_gpu_generate.py``). Sampling draws its
random numbers from a hash of (seed, input row, token position), so a fixed seed gives the same text
whatever the batching, the number of ranks or a resume. Speed: ``benchmarks/bench_infer.py``,
``benchmarks/results/infer_1b_h200.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from hfhpc.env import HFHPC_DECODE_ATTENTION
from hfhpc.recipes import fused as fused_forwards

# Decoder-only architectures whose attention goes through transformers' attention interface and
# cache API as Llama's does (rotary positions from position_ids, no logit soft-capping).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = "hfhpc_slots"
# Generation settings the engine implements; any other set to a non-default value goes to the pipeline.
ENGINE_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k",
                   "top_p", "min_p", "eos_token_id", "stop_strings", "pad_token_id", "bos_token_id")
# Settings with no effect on the tokens here: output options, beam-search-only ones, the cache choice (the engine has its own).
NO_EFFECT = ("transformers_version", "use_cache", "cache_implementation", "return_dict_in_generate", "output_scores",
             "output_logits", "output_attentions", "output_hidden_states", "length_penalty", "early_stopping",
             "decoder_start_token_id")
DEFAULT_MAX_SLOTS = {"cuda": 512, "cpu": 64}
PREFILL_TOKENS = {"cuda": 32768, "cpu": 2048}  # tokens per prefill forward (padding included)
WINDOW_PER_SLOT = 8  # prompts sorted by length together: this many per slot
# Decode attention: FlashAttention's variable-length kernel reading each slot's own length (``varlen``,
# GPU), one masked SDPA call over a shared span (``sdpa``), or batched matmuls, a mask and a softmax
# over that span (``matmul``). ``auto`` (the default) takes varlen where it runs, else matmul.
ATTENTIONS = ("varlen", "sdpa", "matmul")
ATTENTION_ENV = HFHPC_DECODE_ATTENTION  # read by decode_attention() alone: a switch for measurements


class NotForEngine(Exception):
    """This job's model or settings are outside what the engine implements (the pipeline runs it)."""


# -- settings ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """What the engine needs of a generation config."""

    max_new_tokens: int | None  # None: up to max_length in all
    max_length: int | None
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    eos: tuple[int, ...]
    stop_strings: tuple[str, ...]
    seed: int

    def limit(self, prompt_len: int) -> int:
        """New tokens allowed after a prompt of ``prompt_len`` tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(0, (self.max_length or 20) - prompt_len)


def sampling_of(generation_config: Any, seed: int) -> Sampling:
    """The engine's settings from a (merged) ``GenerationConfig``; raises NotForEngine for any setting
    the engine does not implement (beam search, repetition penalties, several sequences, …)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    for name, value in generation_config.to_diff_dict().items():
        if name in ENGINE_SETTINGS or name in NO_EFFECT or name.startswith("_") or value == getattr(default, name, value):
            continue
        raise NotForEngine(f"generation setting {name}={value!r}")
    eos = generation_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    stops = generation_config.stop_strings
    stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
    sample = bool(generation_config.do_sample)
    top_k = generation_config.top_k if sample and generation_config.top_k else None
    top_p = generation_config.top_p if sample and generation_config.top_p is not None and generation_config.top_p < 1.0 else None
    min_p = generation_config.min_p if sample and generation_config.min_p else None
    temperature = float(generation_config.temperature or 1.0) if sample else 1.0
    if sample and temperature <= 0:
        raise NotForEngine(f"temperature {temperature}")
    return Sampling(
        max_new_tokens=generation_config.max_new_tokens, max_length=generation_config.max_length,
        min_new_tokens=int(generation_config.min_new_tokens or 0), do_sample=sample, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, eos=eos, stop_strings=stops, seed=int(seed),
    )


def check_model(model: Any) -> None:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise NotForEngine(f"model type {getattr(config, 'model_type', None)!r} (the engine runs "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "is_encoder_decoder", False):
        raise NotForEngine("an encoder-decoder model")


# -- the pieces hooked into the transformers model -----------------------------------------------------

class SlotCache:
    """Per-layer keys and values of every slot; transformers' attention layers call ``update``.

    Two layouts. ``varlen`` (FlashAttention's variable-length kernel on a GPU): ``[slots, max_len,
    kv_heads, head_dim]``, so that the cache seen as ``[slots * max_len, kv_heads, head_dim]`` is the
    kernel's packed key tensor, slot ``s`` starting at ``s * max_len`` and using its first ``pos + 1``
    positions. The others: ``[slots, kv_heads, max_len, head_dim]``, whose ``[:, :, :span]`` views the
    batched matmuls and SDPA read without a copy.

    Prefill, padded (``prefill_slots`` set): a batch's keys and values are written at positions
    0..T-1 of its slots, and attention runs over the batch alone (causal, right padding never seen by
    a real token). Prefill, packed (``packed`` set, ``varlen`` only): the prompts end to end in one row,
    each token's key and value written at (its slot, its position). Decode: each slot's new key and
    value are written at its own position ``pos``; attention reads each slot up to ``pos`` (``varlen``),
    or the first ``span`` positions of every slot, masked to each slot's ``pos`` (the others).
    """

    is_compileable = False

    def __init__(self, config: Any, slots: int, max_len: int, dtype: Any, device: Any,
                 attention: str = "matmul") -> None:
        import torch

        self.attention = attention
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if attention == "varlen":
            shape = (slots, max_len, self.kv_heads, self.head_dim)
        else:
            shape = (slots, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.slots, self.max_len = slots, max_len
        self.slot_index = torch.arange(slots, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.prefill_slots = None
        self.packed: tuple[Any, Any, Any, int] | None = None  # (token slots, token positions, cu_seqlens, longest)
        self.span = max_len
        self.window = getattr(config, "sliding_window", None)
        # Decode: [slots, span], True where a slot may not attend (past its position; out of its window).
        self.hidden = self.hidden_window = None
        # Decode, varlen: where each slot starts in the packed view, and how many positions it uses.
        self.cu_q = torch.arange(slots + 1, dtype=torch.int32, device=device)
        self.cu_k = self.cu_q * max_len
        self.used = torch.ones(slots, dtype=torch.int32, device=device)

    def set_span(self, span: int) -> None:
        import torch

        self.span = span
        if self.attention == "varlen":
            self.used = (self.pos + 1).to(torch.int32)
            return
        distance = self.pos[:, None] - torch.arange(span, device=self.pos.device)[None, :]
        self.hidden = distance < 0
        self.hidden_window = (self.hidden | (distance >= self.window)) if self.window else self.hidden

    @staticmethod
    def bytes_per_token(config: Any, dtype_bytes: int) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes

    def update(self, key, value, layer_idx: int, *args: Any, **kwargs: Any):
        if self.packed is not None:
            slots, positions = self.packed[0], self.packed[1]
            self.k[layer_idx][slots, positions] = key[0].transpose(0, 1)
            self.v[layer_idx][slots, positions] = value[0].transpose(0, 1)
            return key, value
        if self.prefill_slots is not None:
            t = key.shape[2]
            self.k[layer_idx][self.prefill_slots, :, :t] = key
            self.v[layer_idx][self.prefill_slots, :, :t] = value
            return key, value
        if self.attention == "varlen":
            self.k[layer_idx][self.slot_index, self.pos] = key[:, :, 0]
            self.v[layer_idx][self.slot_index, self.pos] = value[:, :, 0]
            return self.k[layer_idx], self.v[layer_idx]
        self.k[layer_idx][self.slot_index, :, self.pos] = key[:, :, 0]
        self.v[layer_idx][self.slot_index, :, self.pos] = value[:, :, 0]
        return self.k[layer_idx][:, :, : self.span], self.v[layer_idx][:, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


_CACHE: list[SlotCache] = []  # the engine whose model is running (one per process at a time)


def flash_varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, scale: float, *, causal: bool,
                 window: int | None = None, used=None):
    """FlashAttention's variable-length forward as PyTorch ships it (``aten._flash_attention_forward``):
    ``query`` [total_q, heads, d], ``key``/``value`` [total_k, kv_heads, d] (grouped heads read their
    key/value head in place), sequence ``i`` at ``cu[i]:cu[i+1]``, of which the first ``used[i]`` keys
    count when ``used`` is given. A sliding ``window`` keeps keys less than ``window`` positions back,
    as the engine's masks do. On one query per sequence with grouped heads, PyTorch's kernel folds
    the group into the query rows and splits long keys over the SMs (flash-decoding)."""
    import torch

    if query.device.type != "cuda":
        return _varlen_reference(query, key, value, cu_q, cu_k, scale, causal=causal, window=window, used=used)
    left, right = flash_window(window, max_k, causal)
    return torch.ops.aten._flash_attention_forward(
        query, key, value, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
        scale=scale, window_size_left=left, window_size_right=right, seqused_k=used)[0]


def flash_window(window: int | None, max_k: int, causal: bool) -> tuple[int, int]:
    """FlashAttention's (left, right) window bounds, -1 for none. A window no shorter than ``max_k``
    hides nothing and is left out, and so is a right bound where nothing is causal (one query per
    sequence, its keys all before it): with any bound the kernel skips its grouped-heads, split-keys
    decode path (``seqlenq_ngroups_swapped`` in its ``mha_varlen_fwd``)."""
    left = window - 1 if window and window < max_k else -1
    return left, (0 if causal else -1)


def _varlen_reference(query, key, value, cu_q, cu_k, scale: float, *, causal: bool, window: int | None, used):
    """What ``flash_varlen`` computes, one sequence at a time with SDPA: where FlashAttention does not
    run (the CPU), so that the varlen layout and packing are the same code everywhere. Queries are
    the last keys' positions (FlashAttention's bottom-right alignment)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    used = used.tolist() if used is not None else [b - a for a, b in zip(cu_k, cu_k[1:])]
    for i, n in enumerate(used):
        q = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        k = key[cu_k[i]:cu_k[i] + n].transpose(0, 1).repeat_interleave(group, dim=0)
        v = value[cu_k[i]:cu_k[i] + n].transpose(0, 1).repeat_interleave(group, dim=0)
        distance = (torch.arange(n - q.shape[1], n)[:, None] - torch.arange(n)[None, :]).to(query.device)
        mask = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
        if window:
            mask = mask & (distance < window) & (distance >= 0)
        out[cu_q[i]:cu_q[i + 1]] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention function (registered as ``hfhpc_slots``): returns [B, T, heads, head_dim]."""
    import torch
    import torch.nn.functional as F

    cache = _CACHE[-1]
    b, heads, t, d = query.shape
    kv = key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    if cache.packed is not None:
        # Packed prefill: one row of prompts end to end, each attending causally to itself alone.
        # [total, heads, d] views of the projections' output, as they lie: the kernel takes any row
        # and head strides with the last dimension contiguous (no copies; tests/gpu/test_gpu_generate.py).
        _, _, cu, longest = cache.packed
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        out = flash_varlen(q, k, v, cu, cu, longest, longest, scale, causal=True, window=sliding_window)
        return out[None], None
    if cache.prefill_slots is not None:
        # Key/value heads repeated for the grouped query heads: a prefill's copy is small beside its
        # matmuls, and plain causal SDPA (no mask, equal head counts) is what FlashAttention takes.
        key, value = key.repeat_interleave(heads // kv, dim=1), value.repeat_interleave(heads // kv, dim=1)
        mask = None
        if sliding_window and t > sliding_window:
            i = torch.arange(t, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale)
        return out.transpose(1, 2), None
    if cache.attention == "varlen":
        # Decode over the cache as it lies ([slots * max_len, kv, d]): each slot reads its own
        # ``pos + 1`` keys, however long the other slots' rows are.
        kv_all = key.shape[-2]
        out = flash_varlen(query[:, :, 0].contiguous(), key.view(-1, kv_all, d), value.view(-1, kv_all, d),
                           cache.cu_q, cache.cu_k, 1, cache.max_len, scale, causal=False,
                           window=sliding_window, used=cache.used)
        return out.reshape(b, 1, heads, d), None
    # Decode: one query per slot. Grouped heads share their key/value head without copying it.
    q = query.reshape(b, kv, heads // kv, d)
    hidden = cache.hidden_window if sliding_window else cache.hidden
    if cache.attention == "sdpa":
        # One fused kernel (masked, online softmax) with the group's heads as its query rows.
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=~hidden[:, None, None, :], scale=scale)
        return out.reshape(b, 1, heads, d), None
    # Scores in the model's dtype and softmax in float32, as transformers' eager attention does.
    scores = torch.matmul(q * scale, key.transpose(-1, -2))  # [b, kv, group, span]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv, group, d]
    return out.reshape(b, 1, heads, d), None


def decode_attention(model: Any, requested: str | None = None) -> str:
    """The engine's attention, from ``requested``, else ``HFHPC_DECODE_ATTENTION``, else ``auto``:
    ``varlen`` where FlashAttention's variable-length kernel runs (a CUDA GPU, bf16 or fp16, head size
    a multiple of 8 up to 256), else ``matmul``. ``varlen`` asked for on a GPU where the kernel cannot
    run is a ValueError; on the CPU it runs a plain-PyTorch reference of the kernel (for tests)."""
    import os

    name = requested or os.environ.get(ATTENTION_ENV) or "auto"
    if name not in ("auto", *ATTENTIONS):
        raise ValueError(f"decode attention {name!r}: choose one of auto, {', '.join(ATTENTIONS)}")
    if name == "auto" and next(model.parameters()).device.type != "cuda":
        return "matmul"
    if name in ("auto", "varlen"):
        why = _varlen_unavailable(model)
        if why is None:
            return "varlen"
        if name == "varlen":
            raise ValueError(f"decode attention varlen: {why}")
        return "matmul"
    return name


def _varlen_unavailable(model: Any) -> str | None:
    """Why FlashAttention's variable-length kernel cannot serve this model here (None: it can)."""
    import torch

    param = next(model.parameters())
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    if param.device.type != "cuda":
        return None  # the reference in plain PyTorch (what ``auto`` does not pick: it is for tests)
    if param.dtype not in (torch.float16, torch.bfloat16):
        return f"needs bf16 or fp16 weights, not {param.dtype}"
    if d % 8 or d > 256:
        return f"head size {d} (needs a multiple of 8, at most 256)"
    try:  # a build without FlashAttention, or a GPU older than it supports, says so here
        q = torch.zeros(2, heads, d, dtype=param.dtype, device=param.device)
        k = torch.zeros(8, kv, d, dtype=param.dtype, device=param.device)
        cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=param.device)
        flash_varlen(q, k, k, cu, cu * 4, 1, 4, 1.0, causal=False, used=cu[1:].contiguous())
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0][:200]
    return None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, slot_attention)


# -- sampling ------------------------------------------------------------------------------------------

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's constants, as signed 64-bit integers
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x, s: int):
    """Logical right shift of int64 values (torch's ``>>`` keeps the sign)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(seed: int, rows, steps, vocab: int):
    """Uniform numbers in (0, 1), [len(rows), vocab], a pure function of (seed, row, step, token):
    a row's draws do not depend on which other rows share its batch."""
    import torch

    token = torch.arange(vocab, device=rows.device, dtype=torch.long)
    x = (rows.long() * 0x9E3779B1 + steps.long() * 0x85EBCA77 + seed * 0xC2B2AE3D)[:, None] * 0x100000001B3 + token[None, :]
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def pick_tokens(logits, counts, rows, s: Sampling, eos):
    """Next token per row from float32 logits [B, V]: EOS held back before ``min_new_tokens``, then
    greedy, or temperature / top-k / top-p / min-p and a draw (the Gumbel-max trick on hashed noise)."""
    import torch

    if s.min_new_tokens and eos is not None:
        early = (counts < s.min_new_tokens)[:, None]
        logits = logits.index_put((torch.arange(logits.shape[0], device=logits.device)[:, None], eos[None, :]),
                                  torch.where(early, float("-inf"), logits[:, eos]))
    if not s.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > s.top_p  # keep the smallest head whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if s.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    gumbel = -torch.log(-torch.log(hash_uniform(s.seed, rows, counts, logits.shape[-1])))
    return (logits + gumbel).argmax(dim=-1)


# -- the engine ----------------------------------------------------------------------------------------

@dataclass
class Finished:
    row: int  # the caller's index of the prompt
    tokens: list[int]  # the new tokens (EOS included when it ended the row)


class Engine:
    """Continuous-batching generation over one model on one device. ``run`` takes (row, prompt ids)
    pairs and yields ``Finished`` rows in the order they were given."""

    def __init__(self, model: Any, sampling: Sampling, *, slots: int, max_len: int,
                 prefill_tokens: int | None = None, graphs: bool | None = None, tokenizer: Any = None,
                 attention: str | None = None, overlap_capture: bool = True, fused: bool = True) -> None:
        import torch

        check_model(model)
        _register_attention()
        self.model, self.s = model, sampling
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.graphs = self.cuda if graphs is None else graphs
        # Capture the decode graphs while the first prefill runs on the GPU (the capture's host work,
        # first use of its kernels included, hidden behind it) rather than before it.
        self.overlap_capture = overlap_capture
        self.decoder = model.get_decoder()
        # The layers' forwards in fewer kernels (``hfhpc.recipes.fused``) while the engine runs.
        self.layers = list(getattr(self.decoder, "layers", []))
        self.fused = fused and all(fused_forwards.supported(layer) for layer in self.layers) and bool(self.layers)
        self.head = model.get_output_embeddings()
        self.slots, self.max_len = slots, max_len
        self.prefill_tokens = prefill_tokens or PREFILL_TOKENS["cuda" if self.cuda else "cpu"]
        self.tokenizer = tokenizer  # needed for stop strings only
        if sampling.stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        dtype = next(model.parameters()).dtype
        self.attention = decode_attention(model, attention)
        self.cache = SlotCache(model.config, slots, max_len, dtype, self.device, self.attention)
        self.max_new = max(1, min(max_len, sampling.max_new_tokens or max_len))
        dev = self.device
        self.eos = torch.tensor(sampling.eos, device=dev, dtype=torch.long) if sampling.eos else None
        # Per-slot state, on the device: what the captured step reads and writes.
        self.cur = torch.zeros(slots, dtype=torch.long, device=dev)  # the token to feed next
        self.count = torch.zeros(slots, dtype=torch.long, device=dev)  # new tokens so far
        self.limit = torch.zeros(slots, dtype=torch.long, device=dev)
        self.row = torch.zeros(slots, dtype=torch.long, device=dev)
        self.live = torch.zeros(slots, dtype=torch.bool, device=dev)  # holds a row still generating
        self.out = torch.zeros(slots, self.max_new, dtype=torch.long, device=dev)
        self._graphs: dict[int, Any] = {}
        # Where the time went (seconds; the device synchronised at each boundary).
        self.stats = {"attention": self.attention, "fused": self.fused, "capture_s": 0.0, "prefill_s": 0.0, "prefill_forwards": 0,
                      "prompt_tokens": 0, "first_prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0,
                      "rows_per_step": 0.0}
        # varlen reads each slot's own length whatever the span: one graph serves every step.
        self.buckets = [max_len] if self.attention == "varlen" else _buckets(max_len)
        self._old_attention = model.config._attn_implementation

    def row_limit(self, prompt_len: int) -> int:
        """New tokens a prompt gets: its setting, cut to what its slot holds (the last new token is
        never fed back, so a slot holds prompt + limit - 1 positions)."""
        return max(0, min(self.s.limit(prompt_len), self.max_new, self.max_len - prompt_len + 1))

    # -- one decode step over every slot ---------------------------------------------------------------
    def _step(self, span: int) -> None:
        import torch

        c = self.cache
        c.set_span(span)
        hidden = self.decoder(input_ids=self.cur[:, None], position_ids=c.pos[:, None], cache=c,
                              use_cache=True).last_hidden_state[:, -1]
        tok = pick_tokens(self.head(hidden).float(), self.count, self.row, self.s, self.eos)
        live = self.live
        at = self.count.clamp(max=self.max_new - 1)
        self.out[c.slot_index, at] = torch.where(live, tok, self.out[c.slot_index, at])
        self.cur.copy_(torch.where(live, tok, self.cur))
        step = live.long()
        self.count.add_(step)
        c.pos.add_(step).clamp_(max=self.max_len - 1)
        ended = self.count >= self.limit
        if self.eos is not None:
            ended = ended | torch.isin(tok, self.eos)
        self.live.copy_(live & ~ended)

    def _capture_graphs(self) -> None:
        """Capture, timed; a model whose decode step cannot be captured decodes eagerly."""
        import torch

        t0 = time.perf_counter()
        try:
            waited = self._capture()  # for the prefill queued before it: that time is the prefill's
            self.stats["capture_s"] = round(time.perf_counter() - t0 - waited, 3)
        except RuntimeError as e:
            print(f"hfhpc: decoding without CUDA graphs ({str(e).splitlines()[0][:200]})", flush=True)
            self.graphs, self._graphs = False, {}
            torch.cuda.synchronize()

    def _capture(self) -> float:
        """One CUDA graph per attention bucket, warmed up and captured with every slot held as not live:
        a step then changes no slot's tokens, count or position (it writes each slot's key and value
        at its next position, which that slot's next real step overwrites). Returns the seconds spent
        waiting for the GPU work queued before the warm-up."""
        import torch

        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        live = self.live.clone()
        self.live.zero_()
        side.wait_stream(torch.cuda.current_stream())
        try:
            # capture_begin/end rather than ``torch.cuda.graph``, which runs gc.collect() before each
            # capture: with transformers and datasets loaded that is ~0.5 s a graph.
            with torch.cuda.stream(side):
                for span in self.buckets:
                    self._step(span)  # warm-up: allocations and library handles outside the capture
                t0 = time.perf_counter()
                side.synchronize()
                waited = time.perf_counter() - t0
                for span in self.buckets:
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=pool)
                    try:
                        self._step(span)
                    finally:
                        graph.capture_end()
                    self._graphs[span] = graph
        finally:  # the slots' own flags back, captured or not
            torch.cuda.current_stream().wait_stream(side)
            self.live.copy_(live)
        torch.cuda.synchronize()
        return waited

    def _decode(self, span: int) -> None:
        graph = self._graphs.get(span)
        if graph is not None:
            graph.replay()
        else:
            self._step(span)

    # -- prefill --------------------------------------------------------------------------------------
    def _prefill(self, batch: list[tuple[int, int, list[int]]]) -> None:
        """Prompts ``(slot, row, ids)`` into their slots; their first new token is picked. ``varlen``
        packs them end to end (no padding); the others pad them to the longest."""
        import torch

        dev, c, up = self.device, self.cache, self._upload
        lens = [len(p) for _, _, p in batch]
        slots = up(torch.tensor([s for s, _, _ in batch]))
        lengths = up(torch.tensor(lens))
        if self.attention == "varlen":
            flat = torch.tensor([t for _, _, p in batch for t in p], dtype=torch.long)
            positions = up(torch.cat([torch.arange(n) for n in lens]))
            ends = torch.tensor(lens).cumsum(0)
            cu = up(torch.cat([torch.zeros(1, dtype=torch.long), ends]).to(torch.int32))
            owner = torch.tensor([s for s, _, _ in batch]).repeat_interleave(torch.tensor(lens))
            c.packed = (up(owner), positions, cu, max(lens))
            try:
                hidden = self.decoder(input_ids=up(flat)[None], position_ids=positions[None], cache=c,
                                      use_cache=True).last_hidden_state[0]
            finally:
                c.packed = None
            last = hidden[up(ends - 1)]
        else:
            width = max(lens)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (_, _, p) in enumerate(batch):
                ids[i, : len(p)] = torch.as_tensor(p)
            c.prefill_slots = slots
            try:
                positions = torch.arange(width, device=dev)[None, :].expand(len(batch), width)
                hidden = self.decoder(input_ids=up(ids), position_ids=positions, cache=c,
                                      use_cache=True).last_hidden_state
            finally:
                c.prefill_slots = None
            last = hidden[torch.arange(len(batch), device=dev), lengths - 1]
        rows = up(torch.tensor([r for _, r, _ in batch]))
        limits = up(torch.tensor([self.row_limit(n) for n in lens]))
        zero = torch.zeros(len(batch), dtype=torch.long, device=dev)
        tok = pick_tokens(self.head(last).float(), zero, rows, self.s, self.eos)
        self.out[slots, 0] = tok
        self.cur[slots] = tok
        self.count[slots] = 1
        self.limit[slots] = limits
        self.row[slots] = rows
        c.pos[slots] = lengths
        ended = limits <= 1
        if self.eos is not None:
            ended = ended | torch.isin(tok, self.eos)
        self.live[slots] = ~ended

    def _prefill_or_unfuse(self, batch: list[tuple[int, int, list[int]]]) -> None:
        """``_prefill``; if the fused forwards fail on the first one (a kernel this build lacks), once
        more on transformers' own, for the rest of the run. A failed prefill changed no slot's state:
        the keys and values it wrote are written again."""
        if not (self.fused and not self.stats["prefill_forwards"]):
            return self._prefill(batch)
        try:
            self._prefill(batch)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            print(f"hfhpc: the engine's fused layer forwards failed ({str(e).splitlines()[0][:200]}): "
                  "using transformers' own", flush=True)
            fused_forwards.uninstall(self.layers)
            self.fused = self.stats["fused"] = False
            self._prefill(batch)

    def _upload(self, t):
        """A host tensor onto the device without waiting for the queued GPU work (pinned, asynchronous):
        prefill forwards queue up behind each other, and behind them the graph capture's host work."""
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _prefill_cost(self, lengths: list[int]) -> int:
        """Tokens one prefill forward of prompts of these lengths computes (padding included)."""
        return sum(lengths) if self.attention == "varlen" else max(lengths) * len(lengths)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, prompts: Iterable[tuple[int, list[int]]], *, should_stop: Callable[[], bool] = lambda: False,
            check_every: int | None = None) -> Iterator[Finished]:
        """Generate for every prompt; yield the finished rows in input order. Stops early (yielding
        nothing more) once ``should_stop()`` is true."""
        import torch

        _CACHE.append(self.cache)
        self.model.config._attn_implementation = ATTENTION
        installed = self.fused and fused_forwards.install(self.layers)
        try:
            with torch.inference_mode():
                if self.graphs and not self._graphs and not self.overlap_capture:
                    self._capture_graphs()
                yield from self._loop(iter(prompts), should_stop, check_every or (4 if self.cuda else 1))
        finally:
            self.model.config._attn_implementation = self._old_attention
            _CACHE.remove(self.cache)
            if installed:
                fused_forwards.uninstall(self.layers)

    def _loop(self, prompts: Iterator[tuple[int, list[int]]], should_stop, check_every: int) -> Iterator[Finished]:
        import torch

        s = self.s
        free = list(range(self.slots - 1, -1, -1))  # a stack: the lowest slots are used first
        busy: dict[int, tuple[int, int, list[int]]] = {}  # slot → (row, prompt length, prompt ids)
        steps_since: dict[int, int] = {}  # slot → decode steps since its prefill (an upper bound of its count - 1)
        pending: list[tuple[int, list[int]]] = []  # this window's prompts, longest last
        order: list[int] = []  # rows in input order, not yet yielded
        done: dict[int, list[int]] = {}
        exhausted = False
        window = self.slots * WINDOW_PER_SLOT
        nxt = 0  # position in ``order`` of the next row to yield
        while True:
            if should_stop():
                return
            # Refill: a new window when this one is used up; prefill into free slots.
            if not pending and not exhausted:
                for _ in range(window):
                    item = next(prompts, None)
                    if item is None:
                        exhausted = True
                        break
                    row, ids = item
                    if len(ids) == 0 or self.row_limit(len(ids)) <= 0:
                        done[row] = []  # nothing to generate (no room, or nothing allowed)
                        order.append(row)
                        continue
                    order.append(row)
                    pending.append((row, ids))
                pending.sort(key=lambda p: len(p[1]), reverse=True)
            t0 = time.perf_counter()
            admitted = bool(pending and free)
            while pending and free:
                batch: list[tuple[int, int, list[int]]] = []
                while pending and free:
                    row, ids = pending[-1]
                    if batch and self._prefill_cost([len(ids)] + [len(b[2]) for b in batch]) > self.prefill_tokens:
                        break
                    pending.pop()
                    slot = free.pop()
                    batch.append((slot, row, ids))
                    busy[slot] = (row, len(ids), ids)
                    steps_since[slot] = 0
                self._prefill_or_unfuse(batch)
                if not self.stats["prefill_forwards"]:  # the first forward pays for first use (kernels, memory)
                    self._sync()
                    self.stats["first_prefill_s"] = time.perf_counter() - t0
                self.stats["prefill_forwards"] += 1
                self.stats["prompt_tokens"] += sum(len(b[2]) for b in batch)
            capture_s = 0.0
            if admitted and self.graphs and not self._graphs:
                self._capture_graphs()  # its host work while the GPU still runs the prefill queued above
                capture_s = self.stats["capture_s"]
            if admitted:
                self._sync()
                self.stats["prefill_s"] += time.perf_counter() - t0 - capture_s
            if not busy:
                while nxt < len(order) and order[nxt] in done:
                    row = order[nxt]
                    yield Finished(row, done.pop(row))
                    nxt += 1
                if exhausted and not pending:
                    return
                continue
            # Decode ``check_every`` steps (fewer when a row is due to reach its limit sooner), then look.
            longest = max(busy[sl][1] + steps_since[sl] for sl in busy)
            due = min(self.row_limit(busy[sl][1]) - 1 - steps_since[sl] for sl in busy)
            t0 = time.perf_counter()
            steps = max(1, min(check_every, due))
            for _ in range(steps):
                span = _bucket(self.buckets, min(longest + 1, self.max_len))
                self._decode(span)
                longest += 1
            for sl in busy:
                steps_since[sl] += steps
            live = self.live.tolist()  # a list: indexing a CPU tensor per slot costs ~1 µs a slot, with the GPU idle
            st = self.stats
            st["rows_per_step"] = (st["rows_per_step"] * st["decode_steps"] + len(busy) * steps) / (st["decode_steps"] + steps)
            st["decode_steps"] += steps
            st["decode_s"] += time.perf_counter() - t0
            finished = [sl for sl in busy if not live[sl]]
            if s.stop_strings:
                finished += self._stopped([sl for sl in busy if live[sl]])
            if finished:
                idx = torch.tensor(finished, device=self.device)
                counts, toks = self.count[idx].cpu().tolist(), self.out[idx].cpu().tolist()
                for sl, n, t in zip(finished, counts, toks):
                    row = busy.pop(sl)[0]
                    del steps_since[sl]
                    done[row] = self._cut(t[:n])
                    free.append(sl)
                self.live[idx] = False
                free.sort(reverse=True)
            while nxt < len(order) and order[nxt] in done:
                row = order[nxt]
                yield Finished(row, done.pop(row))
                nxt += 1

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _cut(self, tokens: list[int]) -> list[int]:
        """A row's tokens up to its first EOS, or to where a stop string first appears."""
        for i, t in enumerate(tokens):
            if t in self.s.eos:
                return tokens[: i + 1]
        if self.s.stop_strings and self.tokenizer is not None:
            return tokens[: _stop_at(self.tokenizer, tokens, self.s.stop_strings)]
        return tokens

    def _stopped(self, slots: list[int]) -> list[int]:
        """Slots whose text so far holds a stop string."""
        if not slots or self.tokenizer is None:
            return []
        import torch

        idx = torch.tensor(slots, device=self.device)
        counts, toks = self.count[idx].cpu().tolist(), self.out[idx].cpu().tolist()
        texts = self.tokenizer.batch_decode([t[:n] for t, n in zip(toks, counts)])
        return [sl for sl, text in zip(slots, texts) if any(stop in text for stop in self.s.stop_strings)]


def _stop_at(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> int:
    """The fewest leading tokens whose text holds a stop string (all of them when none does)."""
    lo, hi = 1, len(tokens)
    if not any(stop in tokenizer.decode(tokens) for stop in stops):
        return len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(stop in tokenizer.decode(tokens[:mid]) for stop in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _buckets(max_len: int) -> list[int]:
    """Attention lengths a decode step is captured for: steps of 256 up to 2,048, then ×1.5."""
    out, span = [], 256
    while span < max_len:
        out.append(span)
        span = span + 256 if span < 2048 else int(math.ceil(span * 1.5 / 256) * 256)
    out.append(max_len)
    return out


def _bucket(buckets: list[int], need: int) -> int:
    for span in buckets:
        if span >= need:
            return span
    return buckets[-1]


# -- sizing ------------------------------------------------------------------------------------------

def plan_slots(model: Any, max_len: int, rows: int, cap: int | None = None) -> int:
    """How many rows generate at once: what the free GPU memory holds as KV cache (after room for the
    prefill and sampling work), at most ``cap`` (default 512 on a GPU, 64 on the CPU) and the rows."""
    import torch

    param = next(model.parameters())
    device = param.device
    kind = "cuda" if device.type == "cuda" else "cpu"
    limit = cap or DEFAULT_MAX_SLOTS[kind]
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        c = model.config
        limit = min(limit, slots_in(free, hidden=c.hidden_size, intermediate=c.intermediate_size, vocab=c.vocab_size,
                                    kv_bytes_per_token=SlotCache.bytes_per_token(c, param.element_size()),
                                    max_len=max_len, element_size=param.element_size()))
    return max(0, min(limit, rows))


def slots_in(free_bytes: float, *, hidden: int, intermediate: int, vocab: int, kv_bytes_per_token: int,
             max_len: int, element_size: int) -> int:
    """Slots of ``max_len`` positions that ``free_bytes`` of GPU memory holds, after the work outside
    the cache: a prefill forward (hidden and MLP activations of its tokens), a decode step's float32
    logits and sampling temporaries for each slot, and 1 GiB to spare. ``hfhpc plan`` uses it too."""
    prefill = PREFILL_TOKENS["cuda"] * (hidden * 8 + intermediate * 4) * element_size
    per_slot = kv_bytes_per_token * max_len + vocab * 4 * 8
    return max(0, int((free_bytes * 0.9 - prefill - (1 << 30)) // per_slot))


def generation_settings(pipe: Any, kwargs: dict[str, Any], seed: int) -> tuple[Sampling, dict[str, Any]]:
    """The engine's settings for a text-generation pipeline called with ``kwargs``: the same merge of
    the model's generation config, the pipeline's defaults and the spec's ``infer:`` keys as the pipeline
    makes. Returns (sampling, decoding options); raises NotForEngine for what only the pipeline does."""
    import copy

    from transformers import GenerationConfig

    check_model(pipe.model)
    kwargs = dict(kwargs)
    decode_opts: dict[str, Any] = {}
    if kwargs.pop("return_full_text", False):
        raise NotForEngine("return_full_text")
    for key in ("add_special_tokens", "skip_special_tokens", "clean_up_tokenization_spaces"):
        if key in kwargs:
            decode_opts[key] = kwargs.pop(key)
    fields = set(GenerationConfig().to_dict())
    others = [k for k in kwargs if k not in fields and k != "generation_config"]
    if others:
        raise NotForEngine(f"pipeline argument(s) {', '.join(sorted(others))}")
    merged = pipe._prepare_generate_kwargs(kwargs)
    config = copy.deepcopy(merged.pop("generation_config", None) or pipe.model.generation_config)
    config.update(**merged)
    return sampling_of(config, seed), decode_opts


# -- prompts in, text out ------------------------------------------------------------------------------

def encode(tokenizer: Any, value: Any, *, add_special_tokens: bool = False) -> list[int]:
    """A prompt's token ids as the text-generation pipeline makes them: a conversation through the chat
    template (a generation prompt added unless it ends with an assistant turn to continue), a string
    through the tokenizer (no special tokens unless asked)."""
    if isinstance(value, list):
        continue_final = value[-1]["role"] == "assistant"
        out = tokenizer.apply_chat_template(value, add_generation_prompt=not continue_final,
                                            continue_final_message=continue_final, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(value, add_special_tokens=add_special_tokens)["input_ids"])


def encode_many(tokenizer: Any, values: list[Any], *, add_special_tokens: bool = False) -> list[list[int]]:
    """``encode`` of every value, in one call of the tokenizer per kind of prompt (conversations to
    answer, conversations to continue, strings): the same ids, tokenized by the fast tokenizer's
    threads rather than one row at a time."""
    kinds: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        kind = "text" if not isinstance(value, list) else "continue" if value[-1]["role"] == "assistant" else "answer"
        kinds.setdefault(kind, []).append(i)
    out: list[list[int]] = [[] for _ in values]
    for kind, rows in kinds.items():
        group = [values[i] for i in rows]
        if kind == "text":
            ids = tokenizer(group, add_special_tokens=add_special_tokens)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(group, add_generation_prompt=kind == "answer",
                                                continue_final_message=kind == "continue", return_dict=True)["input_ids"]
        for i, row in zip(rows, ids, strict=True):
            out[i] = list(row)
    return out


def decode(tokenizer: Any, tokens: list[int], options: dict[str, Any]) -> str:
    """New tokens as the pipeline returns them (``return_full_text=False``): special tokens skipped."""
    skip = options.get("skip_special_tokens", True)
    if getattr(tokenizer, "response_template", None):
        skip = False
    return tokenizer.decode(tokens, skip_special_tokens=skip,
                            clean_up_tokenization_spaces=options.get("clean_up_tokenization_spaces"))


def max_len_for(model: Any, sampling: Sampling, prompt_lengths: Iterable[int]) -> int:
    """Positions a slot needs: the longest prompt plus its new tokens, within the model's window."""
    need = max((n + sampling.limit(n) for n in prompt_lengths), default=1)
    window = getattr(model.config, "max_position_embeddings", None)
    return max(2, min(need, window) if window else need)
