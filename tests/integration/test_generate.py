"""The generation engine (hfhpc.recipes.generate) against transformers' own ``generate`` on the tiny
demo chat model, on the CPU: the same greedy tokens for each prompt alone, whatever the batching."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

# Prompt lengths from 1 token to past the prefill token budget used below, in no order.
LENGTHS = (3, 17, 1, 40, 9, 64, 5, 33, 2, 50, 120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfhpc.demo.build import build_tiny_chat_model

    folder = build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _prompts(model, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def _alone(model, prompts, config, **kw) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             generation_config=config, **kw)
        out.append(ids[0, len(p):].tolist())
    return out


def _engine(model, prompts, config, *, slots: int, seed: int = 0, tokenizer=None, prefill_tokens: int = 96,
            attention: str | None = None):
    from hfhpc.recipes import generate as g

    s = g.sampling_of(config, seed)
    engine = g.Engine(model, s, slots=slots, max_len=g.max_len_for(model, s, map(len, prompts)),
                      prefill_tokens=prefill_tokens, tokenizer=tokenizer, attention=attention)
    assert engine.attention == (attention or "matmul")
    assert engine.fused  # every model here is one the fused forwards serve
    finished = list(engine.run(enumerate(prompts)))
    assert [f.row for f in finished] == list(range(len(prompts)))  # input order, whatever finished first
    assert not any("forward" in vars(m) for m in model.modules())  # transformers' forwards are back
    return [f.tokens for f in finished]


def _config(model, **kw):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=model.generation_config.eos_token_id, pad_token_id=0, **kw)


# None: the CPU's default (matmul). varlen runs its plain-PyTorch reference here: what is compared is
# its cache layout, packed prefill and per-slot lengths; the GPU tests run FlashAttention's kernel.
@pytest.mark.parametrize("slots, attention", [(1, None), (3, None), (16, None), (3, "sdpa"), (16, "sdpa"),
                                              (1, "varlen"), (3, "varlen"), (16, "varlen")])
def test_greedy_tokens_equal_generate_on_each_prompt_alone(tiny, slots: int, attention: str | None) -> None:
    model, _ = tiny
    prompts = _prompts(model)
    config = _config(model, max_new_tokens=12, do_sample=False)
    # 3 slots for 11 prompts: finished rows are replaced by new ones mid-run (continuous batching).
    assert _engine(model, prompts, config, slots=slots, attention=attention) == _alone(model, prompts, config)


@pytest.mark.parametrize("attention", ["matmul", "sdpa", "varlen"])
def test_a_sliding_window_is_kept_by_every_decode_attention(attention: str) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    # A window of 24 positions, shorter than most prompts: prefill and decode must both drop old keys.
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=24, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    prompts = _prompts(model, seed=5)
    gen = _config(model, max_new_tokens=10, do_sample=False)
    assert _engine(model, prompts, gen, slots=4, attention=attention) == _alone(model, prompts, gen)


# Each family the engine serves, with what sets it apart: Qwen2's query/key/value biases, Qwen3's
# per-head query/key norms and a sliding-window layer, Llama's biases when attention_bias is set,
# Mistral's window (from its config).
FAMILIES = {
    "llama": dict(attention_bias=True),
    "mistral": dict(sliding_window=24),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16, layer_types=["full_attention", "sliding_attention"], sliding_window=16,
                  use_sliding_window=True, max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_fused_forwards_give_generates_tokens_on_each_family(family: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  eos_token_id=2, bos_token_id=1, initializer_range=0.3, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norm weights away from their zeros and ones, so that they count
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.5)
    prompts = _prompts(model, seed=7)
    gen = _config(model, max_new_tokens=10, do_sample=False)
    want = _alone(model, prompts, gen)
    assert _engine(model, prompts, gen, slots=4) == want
    assert _engine(model, prompts, gen, slots=4, attention="varlen") == want
    assert _alone(model, prompts, gen) == want  # the weights the fusion made views of hold their values


def test_the_fused_weights_follow_the_model_to_another_dtype_and_new_weights(tiny) -> None:
    # A model served once, then cast (model.to) and given a new weight (a merged adapter does that):
    # the next engine fuses the weights the model holds now, not the first run's.
    import copy

    from hfhpc.recipes import generate as g

    model = copy.deepcopy(tiny[0])
    prompts = _prompts(model)
    config = _config(model, max_new_tokens=8, do_sample=False)
    s = g.sampling_of(config, 0)

    def served() -> list[list[int]]:
        engine = g.Engine(model, s, slots=3, max_len=g.max_len_for(model, s, map(len, prompts)), prefill_tokens=96)
        tokens = [f.tokens for f in engine.run(enumerate(prompts))]
        assert engine.stats["fused"] is True
        return tokens

    assert served() == _alone(model, prompts, config)
    model.to(torch.float64)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight.data = q.weight * 3.0 + 0.1  # a tensor of its own, with other values
    assert served() == _alone(model, prompts, config)


def test_fused_forwards_that_fail_give_way_to_transformers_own(tiny, monkeypatch, capsys) -> None:
    from hfhpc.recipes import fused
    from hfhpc.recipes import generate as g

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    model, _ = tiny
    monkeypatch.setattr(fused, "_attention", broken)
    prompts = _prompts(model)
    config = _config(model, max_new_tokens=6, do_sample=False)
    s = g.sampling_of(config, 0)
    engine = g.Engine(model, s, slots=3, max_len=g.max_len_for(model, s, map(len, prompts)), prefill_tokens=96)
    assert [f.tokens for f in engine.run(enumerate(prompts))] == _alone(model, prompts, config)
    assert not engine.fused and engine.stats["fused"] is False
    assert "fused layer forwards failed (no kernel image" in capsys.readouterr().out
    assert not any("forward" in vars(m) for m in model.modules())


def test_flash_decode_keeps_its_fast_path_unless_a_window_hides_keys() -> None:
    from hfhpc.recipes.generate import flash_window

    assert flash_window(None, 1194, causal=False) == (-1, -1)
    assert flash_window(4096, 1194, causal=False) == (-1, -1)  # Mistral's default window, longer than any slot
    assert flash_window(512, 1194, causal=False) == (511, -1)
    assert flash_window(512, 1194, causal=True) == (511, 0)
    assert flash_window(None, 300, causal=True) == (-1, 0)


def test_the_decode_attention_is_chosen_by_argument_then_environment(tiny, monkeypatch) -> None:
    from hfhpc.recipes import generate as g

    model, _ = tiny
    assert g.decode_attention(model) == "matmul"  # auto on the CPU
    monkeypatch.setenv(g.ATTENTION_ENV, "sdpa")
    assert g.decode_attention(model) == "sdpa"
    assert g.decode_attention(model, "varlen") == "varlen"
    monkeypatch.setenv(g.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="auto, varlen, sdpa, matmul"):
        g.decode_attention(model)


def test_eos_ends_a_row_and_min_new_tokens_holds_it_back(tiny) -> None:
    model, _ = tiny
    prompts = _prompts(model, seed=2)
    free = _alone(model, prompts, _config(model, max_new_tokens=10, do_sample=False))
    # Make the 4th greedy token of the first prompt the EOS: that row ends there, EOS included.
    eos = free[0][3]
    config = _config(model, max_new_tokens=10, do_sample=False)
    config.eos_token_id = eos
    got = _engine(model, prompts, config, slots=4)
    assert got[0] == free[0][:4]
    assert got == _alone(model, prompts, config)
    config.min_new_tokens = 6
    held = _engine(model, prompts, config, slots=4)
    assert len(held[0]) > 4 and eos not in held[0][:6]
    assert held == _alone(model, prompts, config)


def test_a_stop_string_ends_a_row_where_generate_stops(tiny) -> None:
    model, tok = tiny
    prompts = _prompts(model, seed=3)
    free = _alone(model, prompts, _config(model, max_new_tokens=16, do_sample=False))
    # Text the second row produces mid-way (whole characters: a byte-level piece cannot be a stop string).
    at, stop = next((i, tok.decode(free[1][i:i + 2])) for i in range(3, 14)
                    if "\ufffd" not in tok.decode(free[1][i:i + 2]) and tok.decode(free[1][i:i + 2]).strip())
    config = _config(model, max_new_tokens=16, do_sample=False, stop_strings=[stop])
    got = _engine(model, prompts, config, slots=5, tokenizer=tok)
    assert got == _alone(model, prompts, config, tokenizer=tok)
    assert len(got[1]) <= at + 2 < len(free[1])


def test_sampling_depends_on_the_seed_not_on_the_batching(tiny) -> None:
    model, _ = tiny
    prompts = _prompts(model, seed=4)
    config = _config(model, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    one = _engine(model, prompts, config, slots=1, seed=7)
    assert _engine(model, prompts, config, slots=6, seed=7) == one
    assert _engine(model, prompts, config, slots=6, seed=8) != one
    greedy = _engine(model, prompts, _config(model, max_new_tokens=12, do_sample=False), slots=6)
    assert one != greedy


def test_settings_the_engine_lacks_are_refused_so_the_pipeline_runs_them() -> None:
    from transformers import GenerationConfig

    from hfhpc.recipes.generate import NotForEngine, sampling_of

    for setting in ({"repetition_penalty": 1.3}, {"num_beams": 4}, {"num_return_sequences": 2, "do_sample": True}, {"no_repeat_ngram_size": 3}):
        with pytest.raises(NotForEngine):
            sampling_of(GenerationConfig(max_new_tokens=8, **setting), 0)
    s = sampling_of(GenerationConfig(max_new_tokens=8, do_sample=False, temperature=0.3, top_k=5), 0)
    assert not s.do_sample and s.top_k is None  # sampling settings mean nothing when greedy


def test_buckets_cover_every_length_and_grow_slowly() -> None:
    from hfhpc.recipes.generate import _bucket, _buckets

    for max_len in (2, 255, 256, 700, 2048, 2049, 33000):
        spans = _buckets(max_len)
        assert spans[-1] == max_len and spans == sorted(set(spans))
        for need in (1, max_len // 2 + 1, max_len):
            span = _bucket(spans, need)
            assert need <= span <= max(256, int(need * 1.5) + 256)


@pytest.mark.parametrize("attention", [None, "varlen"])
def test_a_row_longer_than_its_slot_is_cut_to_fit(tiny, tmp_path: Path, attention: str | None) -> None:
    from hfhpc.recipes import generate as g

    model, _ = tiny
    prompts = _prompts(model)
    config = _config(model, max_new_tokens=12, do_sample=False)
    s = g.sampling_of(config, 0)
    # Room for the longest prompt plus 4 tokens: every row stops at what its slot holds.
    max_len = max(LENGTHS) + 3
    engine = g.Engine(model, s, slots=4, max_len=max_len, attention=attention)
    got = [f.tokens for f in engine.run(enumerate(prompts))]
    want = _alone(model, prompts, config)
    for p, tokens, ref in zip(prompts, got, want):
        n = min(12, max_len - len(p) + 1)
        assert tokens == ref[:n]


def test_prompts_encoded_together_get_the_ids_each_gets_alone(tiny) -> None:
    """``encode_many`` (one tokenizer call per kind of prompt) against ``encode`` row by row, on a mix
    of conversations to answer, conversations to continue and plain strings, in no order."""
    from hfhpc.recipes.generate import encode, encode_many

    _, tokenizer = tiny
    ask = [{"role": "user", "content": "What is 2 + 2?"}]
    prompts = [ask, "Plain text, no template", ask + [{"role": "assistant", "content": "It is"}],
               [{"role": "system", "content": "Be brief."}, *ask], "Another string", ask]
    assert encode_many(tokenizer, prompts) == [encode(tokenizer, p) for p in prompts]
    assert encode_many(tokenizer, prompts, add_special_tokens=True) == [
        encode(tokenizer, p, add_special_tokens=True) for p in prompts]
