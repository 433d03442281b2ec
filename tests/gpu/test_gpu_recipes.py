"""GPU paths of the recipes and the launcher (run on the GPU machine: `pytest -m gpu tests/gpu`).

One GPU: bf16 SFT through `hfhpc run`. Two GPUs: DDP, FSDP2 (the default) and FSDP1; four GPUs: FSDP2.
FSDP runs (full shard, the layer class to wrap read from the model, through the generated accelerate
config) save a sharded checkpoint that `hfhpc export` merges into the final model, and resume from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine"),
]

MODEL_ID = "hfhpc-demo/tiny-chat-mistral"
DATA_ID = "hfhpc-demo/ultrachat-tiny"


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfhpc", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store holding the tiny chat model and data, staged through a loopback server like a user would."""
    from hfhpc.demo.build import build_chat_dataset, build_tiny_chat_model
    from hfhpc.store.importer import import_folder
    from hfhpc.store.server import StoreServer

    root = tmp_path_factory.mktemp("gpu")
    upstream = root / "upstream"
    import_folder(upstream, "model", MODEL_ID, build_tiny_chat_model(root / "src-model"))
    import_folder(upstream, "dataset", DATA_ID, build_chat_dataset(root / "src-data"))
    store = root / "store"
    spec = root / "base.yaml"
    spec.write_text(f"name: base\nrecipe: sft\nmodel: {MODEL_ID}\ndataset: {{id: {DATA_ID}, split: train_sft, eval_split: test_sft}}\n")
    with StoreServer(upstream) as server:
        out = subprocess.run([sys.executable, "-m", "hfhpc", "--store", str(store), "stage", str(spec)],
                             capture_output=True, text=True, env=dict(os.environ, HF_ENDPOINT=server.url), timeout=600)
    assert out.returncode == 0, out.stderr
    return root, store


def _run(staged, name: str, launch: str, resources: str, steps: int = 30, save: int = 1000,
         train: str = "") -> tuple[Path, subprocess.CompletedProcess]:
    root, store = staged
    spec = root / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\nrecipe: sft\nmodel: {MODEL_ID}\n"
        f"dataset: {{id: {DATA_ID}, split: train_sft, eval_split: test_sft}}\n"
        f"train: {{max_length: 256, max_steps: {steps}, learning_rate: 3.0e-3, per_device_batch_size: 8, logging_steps: 5, save_steps: {save}{train}}}\n"
        f"launch: {launch}\nresources: {resources}\n"
    )
    spec.with_suffix(".lock").write_text((root / "base.lock").read_text())
    out = _cli("--store", str(store), "run", str(spec))
    return root / "runs" / name, out


def _loads(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(ids).logits).all()


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_on_one_gpu_in_bf16(staged):
    run_dir, out = _run(staged, "one-gpu", "{strategy: single, mixed_precision: bf16}", "{gpus_per_node: 1}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 30 steps of a tiny model cannot earn a compile back: the recipe stays eager and says why.
    assert "compile: staying eager: ~" in out.stdout and "steps left" in out.stdout, out.stdout[-3000:]
    losses = _losses(run_dir)
    assert losses[-1] < 0.7 * losses[0], losses
    _loads(run_dir)


def test_sft_on_one_gpu_compiles_its_layers_and_the_next_node_loads_them(staged):
    run_dir, out = _run(staged, "one-gpu-compiled", "{strategy: single, mixed_precision: bf16}", "{gpus_per_node: 1}",
                        train=", torch_compile: true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "compiled" in out.stdout and "graphs compiled" in out.stdout, out.stdout[-3000:]
    losses = _losses(run_dir)
    assert losses[-1] < 0.7 * losses[0], losses
    root, store = staged
    again = root / "one-gpu-compiled-again.yaml"
    again.write_text((root / "one-gpu-compiled.yaml").read_text().replace("name: one-gpu-compiled", "name: one-gpu-compiled-again")
                     .replace("max_steps: 30", "max_steps: 2"))
    again.with_suffix(".lock").write_text((root / "base.lock").read_text())
    out = _cli("--store", str(store), "run", str(again), env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(root / "one-gpu-node")))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "compile cache: all" in out.stdout and "nothing compiled" in out.stdout, out.stdout[-4000:]


def test_sft_lora_on_one_gpu_checkpoints_and_compiles_its_layers(staged):
    run_dir, out = _run(staged, "one-gpu-lora", "{strategy: single, mixed_precision: bf16, keep_activations: 1}",
                        "{gpus_per_node: 1}", train=", torch_compile: true, lora: {r: 8, lora_alpha: 16}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"decoder layers: (\d+), (\d+) checkpointed, \1 compiled", out.stdout), out.stdout[-3000:]
    losses = _losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert (run_dir / "model" / "adapter_config.json").is_file()


@pytest.mark.parametrize("gpus", [1, 2])
def test_sft_lora_under_fsdp2_trains_checkpoints_sharded_and_resumes(staged, gpus: int):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    # A frozen bf16 base beside fp32 adapters in each FSDP2 unit (only trainable parameters must share
    # a dtype), the recipe's own checkpointed + compiled layers inside.
    name = f"fsdp2-lora-{gpus}"
    run_dir, out = _run(staged, name, "{strategy: fsdp, mixed_precision: bf16, fsdp_version: 2}", f"{{gpus_per_node: {gpus}}}",
                        save=30, train=", torch_compile: true, lora: {r: 8, lora_alpha: 16}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    config = (run_dir / "logs" / "accelerate-node0.yaml").read_text()
    assert "distributed_type: FSDP" in config and "fsdp_version: 2" in config
    assert re.search(r"decoder layers: (\d+), (\d+) checkpointed, \1 compiled", out.stdout), out.stdout[-3000:]
    losses = _losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert (run_dir / "model" / "adapter_config.json").is_file()
    assert (run_dir / "checkpoint-30").is_dir()
    root, store = staged
    spec = root / f"{name}.yaml"
    more = root / f"{name}-more.yaml"
    more.write_text(spec.read_text().replace(f"name: {name}", f"name: {name}-more").replace("max_steps: 30", "max_steps: 40"))
    more.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    more_dir = root / "runs" / f"{name}-more"
    shutil.copytree(run_dir / "checkpoint-30", more_dir / "checkpoint-30")
    again = _cli("--store", str(store), "run", str(more))
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming from" in again.stdout + again.stderr
    assert json.loads((more_dir / "summary.json").read_text())["steps"] == 40
    export = _cli("export", str(more_dir), "-o", str(more_dir / "merged"))
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    merged = more_dir / "merged"
    assert (merged / "adapter_config.json").is_file() or (merged / "config.json").is_file(), sorted(p.name for p in merged.iterdir())


@pytest.mark.parametrize("strategy,gpus", [
    ("fsdp", 1), ("ddp", 2), ("fsdp", 2), ("fsdp1", 2),
    pytest.param("fsdp", 4, marks=pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")),
])
def test_sft_on_several_gpus(staged, strategy: str, gpus: int):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    # FSDP checkpoints at the last step too: its sharded weights merge into the final model.
    launch = {"ddp": "{strategy: ddp, mixed_precision: bf16}", "fsdp": "{strategy: fsdp, mixed_precision: bf16}",
              "fsdp1": "{strategy: fsdp, mixed_precision: bf16, fsdp_version: 1}"}[strategy]
    name = f"{strategy}-{gpus}"
    run_dir, out = _run(staged, name, launch, f"{{gpus_per_node: {gpus}}}", save=30 if "fsdp" in strategy else 1000,
                        train=", torch_compile: true" if strategy == "fsdp" else "")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == gpus
    if "fsdp" in strategy:
        config = (run_dir / "logs" / "accelerate-node0.yaml").read_text()
        assert "distributed_type: FSDP" in config and "MistralDecoderLayer" in config
        assert f"fsdp_version: {1 if strategy == 'fsdp1' else 2}" in config
        assert (run_dir / "checkpoint-30" / "pytorch_model_fsdp_0").is_dir()  # sharded, not one file
        export = _cli("export", str(run_dir), "-o", str(run_dir / "merged"))
        assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
        final = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, final(ids).logits, rtol=1e-4, atol=1e-4)
    losses = _losses(run_dir)
    assert losses[-1] < 0.7 * losses[0], losses
    _loads(run_dir)
    if "fsdp" in strategy:
        # A job asking for more steps, given the sharded checkpoint, resumes from it (the finished run
        # itself is left alone: a changed spec is refused there).
        root, store = staged
        spec = root / f"{name}.yaml"
        more = root / f"{name}-more.yaml"
        more.write_text(spec.read_text().replace(f"name: {name}", f"name: {name}-more").replace("max_steps: 30", "max_steps: 40"))
        more.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
        done = _cli("--store", str(store), "run", str(spec))
        assert done.returncode == 0 and "already complete" in done.stdout, done.stdout + done.stderr
        more_dir = root / "runs" / f"{name}-more"
        shutil.copytree(run_dir / "checkpoint-30", more_dir / "checkpoint-30")
        again = _cli("--store", str(store), "run", str(more))
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        assert "resuming from" in again.stdout + again.stderr and "checkpoint-30" in again.stdout + again.stderr
        assert json.loads((more_dir / "summary.json").read_text())["steps"] == 40
    if strategy == "fsdp":
        # A new job of the same model on a "node" whose local compile cache is empty: the compiled
        # layers come from the store, nothing is compiled before the first step.
        root, store = staged
        fresh = root / f"{name}-fresh.yaml"
        fresh.write_text((root / f"{name}.yaml").read_text().replace(f"name: {name}", f"name: {name}-fresh")
                         .replace("max_steps: 30", "max_steps: 2"))
        fresh.with_suffix(".lock").write_text((root / "base.lock").read_text())
        out = _cli("--store", str(store), "run", str(fresh), env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(root / f"{name}-node")))
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "compile cache: all" in out.stdout and "nothing compiled" in out.stdout, out.stdout[-4000:]
