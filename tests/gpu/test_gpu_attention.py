"""The fused variable-length attention on the GPU against the per-document reference.

Run on the GPU machine: `pytest -m gpu tests/gpu`. A Mistral-shaped model (GQA, 4 layers) in bf16
on one packed row of documents of mixed lengths; the loss and the logits of the fused kernel
(PyTorch's varlen FlashAttention) must match the reference (scaled_dot_product_attention per
document) within bf16 noise, and so must the gradients.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hfhpc.recipes import attention  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not attention.kernel_available(), reason="needs CUDA and torch.nn.attention.varlen"),
]

# Stated tolerance: the loss within 1e-2 absolute (bf16 over 4 layers), logits within bf16 noise.
LOSS_ATOL = 1e-2


def _forward(use_kernel: bool, model, ids, pos, cu, max_len):
    calls = []
    original_available, original_fused = attention.kernel_available, attention._fused

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return original_fused(*args, **kwargs)

    attention.kernel_available = lambda device="cuda": use_kernel
    attention._fused = counted
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, position_ids=pos, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=max_len, max_length_k=max_len, use_cache=False)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    finally:
        attention.kernel_available, attention._fused = original_available, original_fused
    # The kernel ran in bf16 once per layer, or not at all for the reference.
    assert calls == ([torch.bfloat16] * model.config.num_hidden_layers if use_kernel else []), calls
    return out.loss.detach().float(), out.logits.detach().float(), grads


def test_fused_varlen_kernel_matches_the_per_document_reference():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, sliding_window=4096,
                        attn_implementation=attention.register())
    model = MistralForCausalLM(cfg).cuda()
    lengths = [700, 13, 1, 1200, 130]
    ids = torch.randint(3, 1000, (1, sum(lengths)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    fused = _forward(True, model, ids, pos, cu, max(lengths))
    bounded = _forward(True, model, ids, pos, cu, 2048)  # the recipe passes max_length as the bound
    ref = _forward(False, model, ids, pos, cu, max(lengths))
    assert abs(fused[0] - ref[0]) < LOSS_ATOL, (fused[0], ref[0])
    torch.testing.assert_close(bounded[1], fused[1])
    torch.testing.assert_close(fused[1], ref[1], rtol=0.05, atol=0.05)
    cos = torch.nn.functional.cosine_similarity(fused[2], ref[2], dim=0)
    assert cos > 0.999, cos
