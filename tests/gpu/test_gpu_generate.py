"""The generation engine on a GPU (run on the GPU machine: `pytest -m gpu tests/gpu`): decode steps
replayed as CUDA graphs, over several attention-length buckets, give the tokens transformers'
``generate`` gives each prompt alone.

float32 (TF32 off), so that a different but correct order of additions cannot flip a greedy choice:
what is compared is the engine's bookkeeping (slots, positions, masks, refills, graph replays).
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


def _run(model, prompts, config, slots: int, seed: int = 0) -> list[list[int]]:
    from hfhpc.recipes import generate as g

    s = g.sampling_of(config, seed)
    engine = g.Engine(model, s, slots=slots, max_len=g.max_len_for(model, s, map(len, prompts)), prefill_tokens=1024)
    assert engine.graphs and len(engine.buckets) >= 3
    finished = list(engine.run(enumerate(prompts)))
    assert [f.row for f in finished] == list(range(len(prompts)))
    return [f.tokens for f in finished]


@pytest.mark.parametrize("slots", [4, 13])
def test_graph_replayed_greedy_tokens_equal_generate_on_each_prompt_alone(model, slots: int) -> None:
    prompts = _prompts(1)
    config = _config(max_new_tokens=24, do_sample=False)
    want = []
    for p in prompts:
        ids = model.generate(torch.tensor([p], device="cuda"), attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"),
                             generation_config=config)
        want.append(ids[0, len(p):].tolist())
    assert _run(model, prompts, config, slots) == want


def test_sampled_tokens_on_the_gpu_depend_on_the_seed_not_on_the_slots(model) -> None:
    prompts = _prompts(2)
    config = _config(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    one = _run(model, prompts, config, slots=3, seed=5)
    assert _run(model, prompts, config, slots=13, seed=5) == one
    assert _run(model, prompts, config, slots=13, seed=6) != one
