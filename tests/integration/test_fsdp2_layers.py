"""The sft recipe's FSDP2 path on two CPU ranks: per-layer checkpointing inside compiled forwards,
with FSDP2's hooks outside, trains like the plain model and saves checkpoints that merge and resume.

(FSDP through accelerate needs GPUs: tests/gpu runs the whole recipe there. Here torch's own
``fully_shard`` on gloo checks what hfhpc adds: the layers' class swap and compiled forward.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def _worker():
    spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(out: Path, *args: str) -> Path:
    """Two ranks, started here (not by torchrun) so that a hang ends with both killed."""
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert all(p.returncode == 0 for p in ranks), "\n".join(log[-3000:] for log in logs)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return _two_ranks(tmp_path_factory.mktemp("fsdp2"))


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory) -> Path:
    return _two_ranks(tmp_path_factory.mktemp("fsdp2-lora"), "lora")


def test_sharded_compiled_layers_train_like_the_plain_model(trained):
    w = _worker()
    model = w.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = []
    for ids in w.batches():  # every rank saw the same batch: the averaged gradient is this one
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        expected.append(float(loss))
    got = json.loads((trained / "result.json").read_text())["losses"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_the_sharded_checkpoint_merges_into_the_final_weights_and_resumes(trained):
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    merge_fsdp_weights(str(trained / "pytorch_model_fsdp_0"), str(trained / "merged"), safe_serialization=True)
    merged = {}
    for f in (trained / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    full = torch.load(trained / "full.pt")
    assert sorted(merged) == sorted(full) and "model.layers.0.mlp.up_proj.weight" in full  # the model's own names
    for key, value in full.items():
        torch.testing.assert_close(merged[key], value)
    assert json.loads((trained / "result.json").read_text())["resumed_logits_max_diff"] < 1e-6


def test_lora_adapters_beside_a_frozen_bf16_base_shard_train_and_resume(trained_lora):
    # What the sft recipe hands FSDP2 for LoRA: each unit holds bf16 frozen weights and fp32 adapters
    # (FSDP2 needs one dtype among the trainable parameters only); compute in bf16.
    w = _worker()
    model = w.lora_model()
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = []
    for ids in w.batches():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        expected.append(float(loss))
    result = json.loads((trained_lora / "result.json").read_text())
    assert result["dtypes"] == ["False:torch.bfloat16", "True:torch.float32"]
    assert result["losses"] == pytest.approx(expected, rel=3e-2)  # bf16 compute both ways, not bit-equal
    full = torch.load(trained_lora / "full.pt")
    assert sorted(full) == sorted(model.state_dict()) and start
    for key, before in start.items():  # the adapters trained as the plain model's did; the base stayed
        assert not torch.equal(full[key], before), key
        torch.testing.assert_close(full[key], model.state_dict()[key], rtol=0, atol=2e-3)
    assert result["resumed_logits_max_diff"] < 1e-6
