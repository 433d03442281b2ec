"""Attention over packed documents: no token attends across a document boundary."""

from __future__ import annotations

import pytest
import torch

from hfhpc.recipes import attention


def _model(impl: str, window: int | None = None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, attn_implementation=impl)
    return MistralForCausalLM(cfg).eval()


def _packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


@pytest.mark.parametrize("window", [None, 5])
def test_packed_row_equals_each_document_alone(window):
    attention.register()
    lengths = [7, 1, 12, 4]
    ids, pos, cu = _packed(lengths)
    with torch.no_grad():
        packed = _model(attention.NAME, window)(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=12, max_length_k=12).logits[0]
        alone = [_model("eager", window)(input_ids=ids[:, a:b]).logits[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_boundaries_come_from_position_ids_when_the_collator_gives_none():
    attention.register()
    ids, pos, cu = _packed([5, 9, 3])
    assert attention.boundaries(pos).tolist() == cu.tolist()
    with torch.no_grad():
        from_pos = _model(attention.NAME)(input_ids=ids, position_ids=pos).logits
        from_cu = _model(attention.NAME)(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, max_length_q=9).logits
        # transformers builds a block-diagonal mask from packed position ids when no cache is used
        sdpa = _model("sdpa")(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(from_pos, from_cu)
    torch.testing.assert_close(from_pos, sdpa, rtol=1e-5, atol=1e-5)


def test_unpacked_rows_are_plain_causal_attention():
    attention.register()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_model(attention.NAME)(input_ids=ids).logits, _model("eager")(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
