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


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two ranks, started here (not by torchrun) so that a hang ends with both killed."""
    out = tmp_path_factory.mktemp("fsdp2")
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
