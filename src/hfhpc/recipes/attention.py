"""Attention over packed documents: every document attends only to itself, at full speed.

Packed, padding-free batches are one row holding several documents; position ids restart at 0 at
each document and TRL's collator also passes the documents' boundaries (``cu_seq_lens_q``). With
``sdpa``, transformers turns those into a dense block-diagonal mask over the whole row, which
rules out the fused kernels (the cost grows with the square of the row, not of the documents).

``hfhpc_varlen`` is registered with transformers as an attention implementation: on CUDA it calls
PyTorch's variable-length FlashAttention (``torch.nn.attention.varlen``), which takes the boundaries
directly; elsewhere (CPU, or a torch without it) it runs ``scaled_dot_product_attention`` per
document, the reference the fast kernel is checked against. Rows without boundaries (no packing)
are plain causal attention.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "hfhpc_varlen"


_VARLEN: tuple | None = None  # (varlen_attn, its keyword parameters, native GQA), once looked up
_MAX_LEN: int | None = None  # the packed sequences' length bound, when the recipe knows it


def _varlen() -> tuple | None:
    """PyTorch's varlen attention, the keyword arguments this torch version takes, and whether it
    shares key/value heads itself (GQA); None without it."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = ()
        else:
            params = frozenset(inspect.signature(varlen_attn).parameters)
            _VARLEN = (varlen_attn, params, "enable_gqa" in params)
    return _VARLEN or None


def kernel_available(device: torch.device | str = "cuda") -> bool:
    """Whether the fused kernel runs on ``device`` (CUDA with a torch that has varlen attention)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _varlen() is not None


def boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths (int32, starting at 0) of one packed row, from its position ids."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def _reference(query, key, value, cu: list[int], scaling, window: int | None) -> torch.Tensor:
    """(h, total, d) inputs → (total, h, d): causal attention within each document."""
    outs = []
    gqa = query.shape[0] != key.shape[0]
    for a, b in zip(cu, cu[1:]):
        q, k, v = query[:, a:b], key[:, a:b], value[:, a:b]
        if window is not None and b - a > window:
            i = torch.arange(b - a, device=q.device)
            allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        outs.append(out)
    return torch.cat(outs, dim=1).transpose(0, 1)


def _fused(query, key, value, cu: torch.Tensor, max_len: int, scaling, window: int | None) -> torch.Tensor:
    """(total, h, d) inputs → (total, h, d) with PyTorch's varlen FlashAttention."""
    varlen_attn, params, native_gqa = _varlen()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scaling
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif not native_gqa:  # share the key/value heads by copying them
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # Causal is a window open to the left: (-1, 0); a sliding window of W tokens is (W - 1, 0).
    left = window - 1 if (window is not None and max_len > window) else -1
    if "window_size" in params:
        kwargs["window_size"] = (left, 0)
    else:  # only causal without a window: the caller sends windowed rows to the reference instead
        kwargs["is_causal"] = True
    return varlen_attn(query, key, value, cu, cu, max_len, max_len, **kwargs)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The half precision the kernels run in: the tensor's own, else autocast's (rotary embeddings
    computed in fp32 promote q and k to fp32 inside autocast)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.dtype
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``(batch, heads, seq, dim)`` in, ``(batch, seq, heads, dim)`` out."""
    if dropout:
        raise ValueError(f"{NAME} does not implement attention dropout; set the model's attention_dropout to 0")
    batch, heads, seq, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if cu is None and position_ids is not None and batch == 1:
        cu = boundaries(position_ids)
    if cu is None or batch != 1:
        # Not a packed row: each row is one causal sequence (right padding never reaches a real token).
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != heads
        )
        return out.transpose(1, 2).contiguous(), None
    window = sliding_window if sliding_window and sliding_window < seq else None
    dtype = _compute_dtype(query)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # A torch whose kernel has no window argument runs windowed documents per document instead.
    longest = _MAX_LEN or max_len
    windowed_ok = (window is None or (longest is not None and longest <= window)
                   or "window_size" in (_varlen() or (None, ()))[1])
    if kernel_available(query.device) and dtype in (torch.float16, torch.bfloat16) and windowed_ok:
        cu = cu.to(device=query.device, dtype=torch.int32, non_blocking=True)
        # A fixed bound (the recipe's max_length, which packing never exceeds) keeps the kernel's
        # arguments the same from batch to batch: a compiled model is not recompiled for each
        # longest document.
        if _MAX_LEN is not None:
            max_len = _MAX_LEN
        elif max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        q = query[0].transpose(0, 1)  # (total, heads, dim)
        out = _fused(q, key[0].transpose(0, 1), value[0].transpose(0, 1), cu, int(max_len), scaling, window)
    else:
        out = _reference(query[0], key[0], value[0], cu.tolist(), scaling, window)
    return out.unsqueeze(0), None


def register(max_length: int | None = None) -> str:
    """Make ``attn_implementation="hfhpc_varlen"`` known to transformers; returns the name.

    ``max_length`` bounds every packed document (the recipe's ``train.max_length``).
    """
    global _MAX_LEN, _VARLEN
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    _MAX_LEN = max_length
    found = _varlen()
    if found and not found[2] and torch.cuda.is_available():
        _VARLEN = (found[0], found[1], _shares_kv_heads(found[0], found[1]))
    return NAME


def _shares_kv_heads(varlen_attn, params) -> bool:
    """Whether this torch's varlen kernel takes fewer key/value heads than query heads as GQA."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(16, 1, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, 9, 16], device="cuda", dtype=torch.int32)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    try:
        native = varlen_attn(q, kv, kv, cu, cu, 9, 9, **kwargs)
    except (RuntimeError, ValueError):
        return False
    copied = varlen_attn(q, kv.expand(16, 4, 64).contiguous(), kv.expand(16, 4, 64).contiguous(), cu, cu, 9, 9, **kwargs)
    return bool(torch.allclose(native, copied, atol=1e-3))
