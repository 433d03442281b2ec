"""One rank of tests/integration/test_fsdp2_layers.py (started by torchrun, on CPU with gloo).

A tiny Mistral with the sft recipe's FSDP2 layers (hfhpc.recipes.layers: checkpointed inside a compiled
forward, FSDP2 hooks outside) trains three steps on the same batch on every rank, then saves what a
run saves: the full state dict (the final model) and the sharded one (a checkpoint, torch's DCP as
accelerate writes it). A fresh sharded model loads the checkpoint back (a resumed job).

With ``lora`` as second argument the model is what the recipe trains with LoRA: a frozen bf16 base,
peft's fp32 adapters beside it in each unit, bf16 compute (FSDP2's mixed-precision policy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hfhpc.recipes.layers import decoder_layers, prepare_layers


def tiny_model():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MistralForCausalLM(cfg)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (1, 24 + 4 * i), generator=g) for i in range(3)]


def lora_model():
    """The recipe's LoRA model: the base loaded in bf16, its layers prepared, then peft's adapters
    (kept in fp32 by peft) on every linear layer."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model().to(torch.bfloat16)
    prepare_layers(model, checkpoint=True, keep=1, compile=True)
    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def sharded(mesh, lora: bool = False):
    if lora:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        model, policy = lora_model(), MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        model, policy = tiny_model(), None
        prepare_layers(model, checkpoint=True, keep=1, compile=True)
    kw = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def main(out: Path, lora: bool = False) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = sharded(mesh, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "pytorch_model_fsdp_0"))
    probe = batches()[0]
    with torch.no_grad():
        trained = model(input_ids=probe).logits

    resumed = sharded(mesh, lora)
    state = {"model": get_model_state_dict(resumed)}
    dcp.load(state, checkpoint_id=str(out / "pytorch_model_fsdp_0"))
    set_model_state_dict(resumed, state["model"])
    with torch.no_grad():
        again = resumed(input_ids=probe).logits
    if dist.get_rank() == 0:
        torch.save(full, out / "full.pt")
        (out / "result.json").write_text(json.dumps({
            "losses": losses, "resumed_logits_max_diff": float((trained - again).abs().max()),
            "dtypes": sorted({f"{p.requires_grad}:{p.dtype}" for p in model.parameters()}),
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), lora=sys.argv[2:] == ["lora"])
