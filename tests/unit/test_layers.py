"""Per-layer activation checkpointing and compilation (the sft recipe's FSDP2 path), on CPU.

The layers are checked against the untouched model: same parameter names, and the same gradients
for packed rows of changing length (compiled once, dynamic), checkpointed or not.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MistralForCausalLM(cfg)


def test_keep_spreads_the_uncheckpointed_layers_and_names_are_unchanged(tiny_mistral):
    from hfhpc.recipes.layers import decoder_layers, prepare_layers

    model = copy.deepcopy(tiny_mistral)
    done = prepare_layers(model, checkpoint=True, keep=2)
    assert done == {"layers": 4, "checkpointed": 2, "compiled": 0}
    assert [layer.hfhpc_recompute for layer in decoder_layers(model)] == [False, True, False, True]
    assert type(model.model.layers[0]).__name__ == "MistralDecoderLayer"  # FSDP's wrap policy matches by name
    assert list(model.state_dict()) == list(tiny_mistral.state_dict())
    assert prepare_layers(copy.deepcopy(tiny_mistral), checkpoint=False, keep=0)["checkpointed"] == 0


def test_checkpointed_and_compiled_layers_give_the_models_gradients(tiny_mistral):
    from hfhpc.recipes.layers import prepare_layers

    model = copy.deepcopy(tiny_mistral)
    prepare_layers(model, checkpoint=True, keep=1, compile=True)
    for length in (29, 41):  # a packed row's length changes every batch
        ids = torch.randint(0, 300, (1, length))
        position_ids = torch.cat([torch.arange(11), torch.arange(length - 11)]).unsqueeze(0)  # two documents
        grads = []
        for m in (tiny_mistral, model):
            m.zero_grad()
            m(input_ids=ids, position_ids=position_ids, labels=ids).loss.backward()
            grads.append([p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # evaluation between training steps
        model(input_ids=ids)


def test_compiled_layers_take_the_modules_floats_as_constants_not_cpu_tensors(tiny_mistral):
    """A norm's epsilon or attention's scaling passed as a graph input is a 0-dim CPU tensor: on a GPU
    the compiled layer then holds a CPU kernel, built by the host's C++ compiler before the first step."""
    from hfhpc.recipes.layers import prepare_layers

    inputs = []

    def recording(gm, example_inputs):
        inputs.extend(n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    torch._dynamo.reset()  # not the layer compiled by the test before
    model = copy.deepcopy(tiny_mistral)
    prepare_layers(model, checkpoint=True, compile=True, backend=recording)
    ids = torch.randint(0, 300, (1, 23))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # as in training
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    assert tensors and any(t.dim() == 2 for t in tensors)  # the weights are inputs
    assert not [t for t in tensors if t.dim() == 0], "0-dim (float attribute) inputs in the compiled layer"
