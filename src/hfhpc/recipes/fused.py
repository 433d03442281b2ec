"""The generation engine's forwards for Llama-family decoder layers: the same math in fewer kernels.

Where a batch is small (a decode step: one token per slot) or the tensors are large (a packed
prefill of ~32k tokens), transformers' layer forwards spend their time in elementwise kernels rather
than matrix multiplies: each RMSNorm is eight kernels in float32, rotary embeddings ten (on transposed,
non-contiguous views), and every projection is its own matrix multiply. Measured on one H100 for the
1.1B bench model (``benchmarks/results/infer_1b_h100_profile.txt``): elementwise kernels took ~420 ms
of a ~880 ms prefill of 147k prompt tokens, and ~2.4 ms of a 6.2 ms decode step of 256 rows.

``install`` gives each decoder layer of a supported model:

- **one matrix multiply for the query, key and value projections** and one for the MLP's gate and up
  projections: the weights are concatenated once, and the modules' own weights become views of the
  concatenation (no second copy);
- **RMSNorm as one kernel** (``torch.nn.functional.rms_norm``: fused on CUDA), the weight applied in
  it;
- **rotary embeddings on the queries and keys together**, in their projection layout: the half swap as
  one copy with its sign folded into the sine, then ``q * cos + rotate_half(q) * sin`` as two kernels
  (a product, then ``addcmul``: the second product and the sum in one);
- **the residual sums in the output projections**: the decoder layer's forward (``_layer``, the same
  two pre-norm blocks as transformers') adds each block's output to its input inside the matrix
  multiply (``addmm_``, written into the layer's input: under inference mode nothing else reads it),
  not as a separate kernel over the hidden states.

The attention itself and the KV cache stay the engine's (``generate.slot_attention``, ``SlotCache``).
In float32 the result equals transformers' forwards (``tests/integration/test_generate.py`` compares
greedy tokens with ``model.generate``); in bf16 the fused norm and the fused sums round once where
transformers rounds twice, and the fused projections may sum in another order, as any change of
batch shape does.
``uninstall`` puts transformers' forwards back (the weights stay views: the same values).
"""

from __future__ import annotations

import types
from typing import Any

# Attributes the engine adds to modules it fused.
QKV, GATE_UP = "_hfhpc_qkv", "_hfhpc_gate_up"
_PATCHED = "_hfhpc_fused"


def _linear_parts(*linears: Any) -> bool:
    """Linear layers that can be one: the same input size and dtype, biases on all or on none."""
    import torch

    if not all(isinstance(m, torch.nn.Linear) for m in linears):
        return False
    first = linears[0].weight
    return (len({m.in_features for m in linears}) == 1 and all(m.weight.dtype == first.dtype for m in linears)
            and len({m.bias is None for m in linears}) == 1)


def _is_rms_norm(module: Any) -> bool:
    """transformers' Llama-style RMSNorm: ``weight * (x * rsqrt(mean(x²) + eps))`` (not Gemma's 1 + weight)."""
    name = type(module).__name__
    return (name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(module, "variance_epsilon")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 1)


# Decoder layers whose forward is ``_layer``'s: a pre-norm attention block and a pre-norm MLP block,
# each added to its input, nothing else (transformers 5's Llama, Mistral, Qwen2 and Qwen3).
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def supported(layer: Any) -> bool:
    """A decoder layer whose modules are the ones ``install`` knows."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(layer).__name__ not in LAYERS or attn is None or mlp is None:
        return False
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")):
        return False
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    return (_linear_parts(attn.q_proj, attn.k_proj, attn.v_proj) and _linear_parts(mlp.gate_proj, mlp.up_proj)
            and all(n is not None and _is_rms_norm(n) for n in norms))


def _fuse(owner: Any, attr: str, linears: list[Any]) -> None:
    """One weight (and bias) for ``linears``, kept on ``owner``; each linear's own becomes a view of it."""
    import torch

    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        at = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[at: at + n]
            if bias is not None:
                m.bias.data = bias[at: at + n]
            at += n
    setattr(owner, attr, (weight, bias))


def _still_fused(owner: Any, attr: str, linears: list[Any]) -> bool:
    """Whether ``owner``'s fused weight (and bias) still backs ``linears``: ``model.to(dtype)``, a
    move to another device or a merged adapter gives a linear a tensor of its own, and the fused one
    is then stale (another dtype, device, or old values)."""
    weight, bias = getattr(owner, attr, (None, None))
    if weight is None:
        return False
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        if m.weight.dtype != weight.dtype or m.weight.data_ptr() != weight[at:at + n].data_ptr():
            return False
        if bias is not None and (m.bias is None or m.bias.dtype != bias.dtype or m.bias.data_ptr() != bias[at:at + n].data_ptr()):
            return False
        at += n
    return True


def _rms_norm(self, hidden_states):
    import torch.nn.functional as F

    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def _mlp(self, x, residual=None):
    import torch.nn.functional as F

    weight, bias = getattr(self, GATE_UP)
    gate, up = F.linear(x, weight, bias).split((self.gate_proj.out_features, self.up_proj.out_features), dim=-1)
    return _project(self.down_proj, self.act_fn(gate) * up, residual)


def _project(linear, x, residual):
    """``residual + linear(x)``, the sum in the matrix multiply's epilogue (``addmm``: one kernel, no
    separate add). Under inference mode the sum is written into ``residual`` itself: a decoder layer's
    input is a temporary that only the layer reads (the engine asks for no hidden states)."""
    import torch

    if residual is None:
        return linear(x)
    if linear.bias is not None:  # rare (Llama's attention_bias, mlp_bias): the plain sum
        return residual + linear(x)
    shape = residual.shape
    flat, x2 = residual.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1])
    if torch.is_inference_mode_enabled() and residual.is_contiguous():
        return flat.addmm_(x2, linear.weight.t()).view(shape)
    return torch.addmm(flat, x2, linear.weight.t()).view(shape)


def _layer(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
           position_embeddings=None, **kwargs):
    """transformers' decoder layer (pre-norm attention, then pre-norm MLP, each added to its input)
    with each residual sum folded into the block's output projection."""
    h = _attention(self.self_attn, self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                   cache, residual=hidden_states)[0]
    return _mlp(self.mlp, self.post_attention_layernorm(h), residual=h)


def _signed_sin(sin):
    """``sin`` with its first half negated: ``rotate_half(x) * sin == swap_halves(x) * signed``."""
    import torch

    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _attention(self, hidden_states, position_embeddings, attention_mask=None, cache=None, residual=None, **kwargs):
    import torch
    import torch.nn.functional as F

    from hfhpc.recipes.generate import slot_attention

    b, t, _ = hidden_states.shape
    d = self.head_dim
    heads, kv = self.config.num_attention_heads, self.config.num_key_value_heads
    weight, bias = getattr(self, QKV)
    qkv = F.linear(hidden_states, weight, bias).view(b, t, heads + 2 * kv, d)
    q, k, v = qkv.split((heads, kv, kv), dim=2)
    if hasattr(self, "q_norm"):  # Qwen3: an RMSNorm over each head before the rotation
        qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
    else:
        qk = qkv[:, :, : heads + kv]
    cos, sin = position_embeddings
    swapped = qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    rotated = torch.addcmul(qk * cos[:, :, None], swapped, _signed_for(sin)[:, :, None])
    q, k, v = (x.transpose(1, 2) for x in (rotated[:, :, :heads], rotated[:, :, heads:], v))  # [b, heads, t, d]
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, _ = slot_attention(self, q, k, v, attention_mask, scaling=self.scaling, sliding_window=window)
    return _project(self.o_proj, out.reshape(b, t, -1), residual), None


_SIN: list[Any] = [None, None]  # the last sine seen and its signed form: every layer of a forward shares it


def _signed_for(sin):
    if _SIN[0] is not sin:
        _SIN[0], _SIN[1] = sin, _signed_sin(sin)
    return _SIN[1]


def install(layers: list[Any]) -> bool:
    """Fused forwards on every layer (weights concatenated on the first call, and again whenever the
    linears' own weights no longer lie in them); False, and nothing changed, when a layer is not one
    ``supported`` knows."""
    if not layers or not all(supported(layer) for layer in layers):
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, attr, linears in ((attn, QKV, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                     (mlp, GATE_UP, [mlp.gate_proj, mlp.up_proj])):
            if not _still_fused(owner, attr, linears):
                _fuse(owner, attr, linears)
        for module, forward in _forwards(layer):
            module.forward = types.MethodType(forward, module)
            setattr(module, _PATCHED, True)
    return True


def uninstall(layers: list[Any]) -> None:
    """transformers' forwards back on every layer ``install`` patched."""
    for layer in layers:
        for module, _ in _forwards(layer):
            if getattr(module, _PATCHED, False):
                del module.forward
                delattr(module, _PATCHED)
    _SIN[0] = _SIN[1] = None


def _forwards(layer: Any) -> list[tuple[Any, Any]]:
    attn = layer.self_attn
    out = [(layer, _layer), (attn, _attention), (layer.mlp, _mlp), (layer.input_layernorm, _rms_norm),
           (layer.post_attention_layernorm, _rms_norm)]
    out += [(getattr(attn, n), _rms_norm) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    return out
