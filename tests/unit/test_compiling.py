"""Compile or stay eager (hfhpc.recipes.compiling): a short job does not pay for speed it cannot use,
a long one compiles, kernels in the store lower the bar, the spec's choice wins; the recipe's callback
compiles the layers between two steps; ``hfhpc plan`` says what the recipe will do."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from hfhpc.recipes.compiling import COMPILE_S_COLD, COMPILE_S_STORED, SPEEDUP, break_even_steps, decide


def test_a_short_job_stays_eager_and_a_long_one_compiles():
    step = 0.4  # seconds per eager step
    need = break_even_steps(step, stored=False)
    assert need == pytest.approx(COMPILE_S_COLD / (step * (1 - 1 / SPEEDUP)), abs=1)
    short = decide(None, steps_left=need - 5, eager_step_s=step, stored=False)
    long = decide(None, steps_left=need + 5, eager_step_s=step, stored=False)
    assert not short.compile and short.line().startswith("staying eager: ~")
    assert f"pays after ~{need} steps" in short.reason and f"{need - 5} steps left" in short.reason
    assert long.compile and long.line().startswith("compiling the decoder layers: ")


def test_kernels_in_the_store_make_compiling_pay_sooner():
    assert COMPILE_S_STORED < COMPILE_S_COLD
    step = 0.4
    steps = break_even_steps(step, stored=False) - 1
    assert not decide(None, steps_left=steps, eager_step_s=step, stored=False).compile
    choice = decide(None, steps_left=steps, eager_step_s=step, stored=True)
    assert choice.compile and "kernels from the store" in choice.reason


def test_the_spec_decides_when_it_says_and_cpus_stay_eager():
    assert decide(True, steps_left=1, eager_step_s=10.0, stored=False).compile
    assert not decide(False, steps_left=10**9, eager_step_s=10.0, stored=True).compile
    assert "train.torch_compile is false" in decide(False, steps_left=1, eager_step_s=1, stored=False).reason
    cpu = decide(None, steps_left=10**9, eager_step_s=10.0, stored=True, gpu=False)
    assert not cpu.compile and "no GPU" in cpu.reason


@pytest.mark.parametrize("max_steps,compiles", [(40, False), (10**6, True)])
def test_the_callback_compiles_the_layers_between_steps_only_when_it_pays(max_steps, compiles):
    torch = pytest.importorskip("torch")
    from transformers import MistralConfig, MistralForCausalLM

    from hfhpc.recipes.layers import compile_when_it_pays, decoder_layers, prepare_layers

    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = MistralForCausalLM(cfg)
    model = copy.deepcopy(reference)
    prepare_layers(model, checkpoint=True)
    lines: list[str] = []
    callback = compile_when_it_pays(model, steps_total=max_steps, stored=False, log=lines.append, backend="eager")
    state = SimpleNamespace(max_steps=max_steps, global_step=0)
    ids = torch.randint(0, 300, (1, 17))
    for step in (1, 2, 3):
        callback.on_step_begin(None, state, None)
        model(input_ids=ids, labels=ids).loss.backward()
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert len(lines) == 1 and lines[0].startswith("compile: " + ("compiling" if compiles else "staying eager")), lines
    assert all(getattr(layer, "hfhpc_compiled", False) == compiles for layer in decoder_layers(model))
    # Compiled or not, the model computes what it did.
    model.zero_grad(), reference.zero_grad()
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
