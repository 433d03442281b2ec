"""The generation engine on a GPU (run on the GPU machine: `pytest -m gpu tests/gpu`): decode steps
replayed as CUDA graphs, over several attention-length buckets, give the tokens transformers'
``generate`` gives each prompt alone.

float32 (TF32 off), so that a different but correct order of additions cannot flip a greedy choice:
what is compared is the engine's bookkeeping (slots, positions, masks, refills, graph replays).
FlashAttention's variable-length kernel (the ``varlen`` decode attention, the default on a GPU) runs
in bf16 and fp16 only: it is compared with its plain-PyTorch reference on the same inputs, and the
engine on it with ``generate`` in bf16, where rounding may flip a nearly tied choice.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine"),
]

# Across the 256-position bucket edge, and past the prefill token budget used below.
LENGTHS = (1, 7, 300, 40, 255, 129, 3, 520, 64, 2, 250, 90, 17)


@pytest.fixture(scope="module")
def model():
    from transformers import MistralConfig, MistralForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                           sliding_window=None, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    return MistralForCausalLM(config).cuda().eval()


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in LENGTHS]


def _config(**kw):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=2, pad_token_id=0, **kw)


def _run(model, prompts, config, slots: int, seed: int = 0, attention: str | None = None,
         fused: bool = True) -> list[list[int]]:
    from hfhpc.recipes import generate as g

    s = g.sampling_of(config, seed)
    engine = g.Engine(model, s, slots=slots, max_len=g.max_len_for(model, s, map(len, prompts)), prefill_tokens=1024,
                      attention=attention, fused=fused)
    if engine.attention == "varlen":  # every slot reads its own length: one graph for all steps
        assert engine.graphs and engine.buckets == [engine.max_len]
    else:
        assert engine.graphs and len(engine.buckets) >= 3
    finished = list(engine.run(enumerate(prompts)))
    assert engine._graphs, "the decode step was not captured"
    assert engine.stats["fused"] is fused  # the fused forwards ran (none failed and gave way)
    assert [f.row for f in finished] == list(range(len(prompts)))
    return [f.tokens for f in finished]


def _generate(model, prompts, config) -> list[list[int]]:
    want = []
    for p in prompts:
        ids = model.generate(torch.tensor([p], device="cuda"), attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"),
                             generation_config=config)
        want.append(ids[0, len(p):].tolist())
    return want


@pytest.mark.parametrize("slots, attention", [(4, None), (13, None), (4, "sdpa"), (13, "sdpa")])
def test_graph_replayed_greedy_tokens_equal_generate_on_each_prompt_alone(model, slots: int, attention) -> None:
    from hfhpc.recipes import generate as g

    assert g.decode_attention(model, attention) == (attention or "matmul")  # float32: no FlashAttention
    prompts = _prompts(1)
    config = _config(max_new_tokens=24, do_sample=False)
    assert _run(model, prompts, config, slots, attention=attention) == _generate(model, prompts, config)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window", [None, 40, 4096])  # 4096: Mistral's default, longer than every sequence here
def test_flash_varlen_matches_its_reference_for_decode_and_packed_prefill(dtype: str, window) -> None:
    from hfhpc.recipes.generate import _varlen_reference, flash_varlen

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv, d, max_len = 8, 2, 64, 300
    used = torch.tensor([1, 7, 300, 129, 64], dtype=torch.int32, device="cuda")
    slots = len(used)
    # Decode: one query per slot against the cache as [slots * max_len, kv, d], each slot its own length.
    q = torch.randn(slots, heads, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(slots * max_len, kv, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(slots * max_len, kv, d, device="cuda", dtype=dt, generator=g)
    cu_q = torch.arange(slots + 1, dtype=torch.int32, device="cuda")
    args = (q, k, v, cu_q, cu_q * max_len)
    got = flash_varlen(*args, 1, max_len, d ** -0.5, causal=False, window=window, used=used)
    want = _varlen_reference(*[a.float() for a in args[:3]], *args[3:], d ** -0.5, causal=False, window=window, used=used)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    # Packed prefill: prompts end to end, causal within each.
    lens = [1, 7, 300, 129, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=dt, generator=g) for h in (heads, kv, kv))
    got = flash_varlen(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, causal=True, window=window)
    want = _varlen_reference(q.float(), k.float(), v.float(), cu, cu, d ** -0.5, causal=True, window=window, used=None)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    # The same, the inputs as the engine hands them over: views of one projection output, rows strided.
    qkv = torch.cat((q, k, v), dim=1)
    q2, k2, v2 = qkv.split((heads, kv, kv), dim=1)
    assert not q2.is_contiguous()
    got = flash_varlen(q2, k2, v2, cu, cu, max(lens), max(lens), d ** -0.5, causal=True, window=window)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_the_default_gpu_engine_decodes_on_flash_varlen_in_bf16(model) -> None:
    """bf16: FlashAttention runs; greedy choices may differ from ``generate`` where nearly tied, and
    then the rest of that row differs too. A wrong layout or length would change nearly every row."""
    import copy

    from hfhpc.recipes import generate as g

    half = copy.deepcopy(model).to(torch.bfloat16)
    assert g.decode_attention(half) == "varlen"
    prompts = _prompts(3)
    config = _config(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    got = _run(half, prompts, config, slots=5)
    assert [len(t) for t in got] == [24] * len(prompts)
    want = _generate(half, prompts, config)
    assert sum(a == b for a, b in zip(got, want)) >= len(prompts) // 2, (got, want)
    assert sum(a[0] == b[0] for a, b in zip(got, want)) >= len(prompts) - 2


def test_the_fused_forwards_decode_as_transformers_own_in_bf16(model) -> None:
    """bf16, varlen: the engine's fused layer forwards against transformers' own on the same engine.
    The fused RMSNorm rounds once where transformers rounds twice, so a nearly tied greedy choice may
    flip; a wrong rotation or projection split would change nearly every row."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    prompts = _prompts(4)
    config = _config(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    fused, plain = _run(half, prompts, config, slots=5), _run(half, prompts, config, slots=5, fused=False)
    assert sum(a == b for a, b in zip(fused, plain)) >= len(prompts) // 2, (fused, plain)
    assert sum(a[0] == b[0] for a, b in zip(fused, plain)) >= len(prompts) - 2


def test_sampled_tokens_on_the_gpu_depend_on_the_seed_not_on_the_slots(model) -> None:
    prompts = _prompts(2)
    config = _config(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    one = _run(model, prompts, config, slots=3, seed=5)
    assert _run(model, prompts, config, slots=13, seed=5) == one
    assert _run(model, prompts, config, slots=13, seed=6) != one
