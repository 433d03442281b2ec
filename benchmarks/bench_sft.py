"""SFT throughput on GPUs: hfhpc's ``sft`` recipe, as a user runs it, beside the page's recipe.

The page's recipe is ``seed_sft_baseline.py`` (TRL's SFTTrainer with its default packing, random-init
weights, pre-tokenized synthetic documents). Here the same shapes go through the whole hfhpc path:
a Mistral-shaped model (random weights, saved as bf16 safetensors) and ultrachat-schema chat data
whose documents have the seed's length distribution are built into a local upstream, served with
``hfhpc serve``, staged, and trained with ``hfhpc run`` (node agent, accelerate, FSDP).

    python benchmarks/bench_sft.py build --shape 1b --dir /tmp/bench
    python benchmarks/bench_sft.py run --shape 1b --gpus 1 --dir /tmp/bench --out results/

Tokens are the documents' real tokens (the padding-free batches hold no padding), per second per
GPU, from the median step time after warm-up. MFU counts 6N + 12·L·H·s FLOPs per token (the seed's
formula: dense matmuls forward and backward plus attention over the full sequence s, not halved
for causality) against 989 TFLOP/s, H100 SXM dense bf16. Time to first step runs from the start of
``hfhpc run`` to the end of the first optimizer step, everything included (loading, sharding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_job, spec_overrides, stage, versions  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    # For trying the benchmark itself on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
VOCAB = 32000
PEAK_FLOPS = 989e12
MODEL_ID = "bench/mistral-{shape}"
DATA_ID = "bench/chat-lognormal"
# A chat template over a word-level vocabulary: user turns start with t3, assistant turns with t4.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ ' t3 ' if m['role'] == 'user' else ' t4 ' }}"
            "{{ m['content'] }} {{ eos_token }}{% endfor %}")


def build_model(shape: str, dest: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    cfg = MistralConfig(vocab_size=VOCAB, max_position_embeddings=32768, sliding_window=4096,
                        tie_word_embeddings=False, dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)  # random init where it is fast
    model.save_pretrained(dest, max_shard_size="5GB")
    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t1", eos_token="t2", pad_token="t0")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(dest)
    del model


def build_data(dest: Path, docs: int, seq: int, seed: int = 0) -> None:
    """ultrachat-schema rows whose token counts follow the seed's lognormal(1100, 0.6) in [64, seq]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(min(1100, seq // 2)), 0.6, docs).astype(int), 64, seq) - 6  # the template's tokens
    rows = []
    for i, n in enumerate(lens):
        ids = rng.integers(5, VOCAB, n)
        cut = max(1, int(n * 0.3))
        words = [f"t{x}" for x in ids]
        rows.append({"prompt": "", "prompt_id": f"{i:08d}", "messages": [
            {"role": "user", "content": " ".join(words[:cut])},
            {"role": "assistant", "content": " ".join(words[cut:])},
        ]})
    out = dest / "data" / "train_sft-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    (dest / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n    path: data/train_sft-*\n---\n"
        "Synthetic chat documents for throughput benchmarks.\n")


def build(args) -> None:
    from hfhpc.store.importer import import_folder

    root = Path(args.dir)
    # The store is its own upstream: `hfhpc serve` of it stands in for the Hub, and staging
    # finds every file already there (no second copy of a 7B model).
    upstream = root / "store"
    src = root / "src"
    t0 = time.time()
    model_dir = src / "model" / args.shape
    if not (model_dir / "config.json").exists():
        build_model(args.shape, model_dir)
    data_dir = src / "data"
    if not (data_dir / "README.md").exists():
        build_data(data_dir, args.docs, args.seq)
    import_folder(upstream, "model", MODEL_ID.format(shape=args.shape), model_dir)
    import_folder(upstream, "dataset", DATA_ID, data_dir)
    print(f"built {args.shape} model and data into {upstream} in {time.time() - t0:.0f} s", flush=True)


SPEC = """\
name: {name}
recipe: sft
model: {model}
dataset: {{id: {data}, split: train_sft}}
output_dir: {out}
train:
  max_length: {seq}
  per_device_batch_size: {bs}
  max_steps: {steps}
  learning_rate: 2.5e-5
  logging_steps: 1
  save_steps: 100000
  assistant_only_loss: false
  attention: {attention}
  dataloader_num_workers: 2
{train_extra}launch: {{strategy: {strategy}, mixed_precision: bf16, activation_checkpointing: {ckpt}{launch_extra}}}
resources: {{nodes: 1, gpus_per_node: {gpus}, cpus_per_gpu: 6, time: '1:00:00'}}
"""


def run(args) -> dict:
    root = Path(args.dir)
    name = f"bench-{args.shape}-g{args.gpus}-{args.tag}"
    folder = root / "jobs" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.yaml"
    spec.write_text(SPEC.format(
        name=name, model=MODEL_ID.format(shape=args.shape), data=DATA_ID, out=str(folder / "run"), seq=args.seq,
        bs=args.bs, steps=args.steps, attention=args.attention, strategy="fsdp" if args.gpus > 1 else "single",
        ckpt="true" if args.ckpt else "false", gpus=args.gpus,
        **spec_overrides(args.train, args.launch)))
    env = dict(os.environ, HFHPC_STORE=str(root / "store"))
    stage(root / "store", spec, env)
    run_dir = folder / "run"
    env.update(x.split("=", 1) for x in args.env)
    t0, wall = run_job(spec, root, run_dir, env, compile_cache=args.compile_cache, stop_after=args.stop_after)
    for profiled in (run_dir / "logs").glob("profile-rank*.txt"):  # HFHPC_PROFILE_STEPS in --env
        shutil.copy(profiled, Path(args.out) / f"hfhpc_{args.shape}_w{args.gpus}_{args.tag}_{profiled.name}")
    return summarize(args, run_dir, t0, wall)


def summarize(args, run_dir: Path, t0: float, wall: float) -> dict:
    from transformers import MistralConfig

    from hfhpc.plan import ModelShape

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r and "num_tokens" in r]
    if args.stop_after:
        steps = steps[:args.stop_after]  # the steps asked for; the job may log one more before it is stopped
    times = [r["elapsed_s"] for r in steps]
    tokens = [r["num_tokens"] for r in steps]
    warm = 4
    dt = np.diff(times[warm:])
    dtok = np.diff(tokens[warm:])
    step_s = float(np.median(dt))
    world = max(1, args.gpus)
    tok_step = float(np.median(dtok)) / world
    tps = tok_step / step_s
    cfg = MistralConfig(vocab_size=VOCAB, tie_word_embeddings=False, **SHAPES[args.shape])
    shape = ModelShape.from_config(cfg.to_dict())  # the planner's own count: 6N + 12·L·h·seq per token
    n_params = shape.params
    flops_tok = shape.flops_per_token(args.seq)
    first = steps[0]
    losses = [r["loss"] for r in steps]
    return dict(
        recipe="hfhpc", shape=args.shape, tag=args.tag, gpu=machine(), world=world, bs=args.bs, seq=args.seq,
        attention=args.attention, activation_checkpointing=args.ckpt, train=args.train, params_b=round(n_params / 1e9, 3),
        tokens_per_s_per_gpu=round(tps, 1), real_tokens_per_step_per_gpu=round(tok_step, 1),
        mfu=round(tps * flops_tok / PEAK_FLOPS, 4), mfu_formula="(6N + 12*L*H*seq) * tokens/s / 989e12",
        step_s_median=round(step_s, 4), peak_mem_gib=max(r.get("peak_mem_gib", 0) for r in steps),
        time_to_first_step_s=round(first["unix_time"] - t0, 1), wall_s=None if wall is None else round(wall, 1),
        launch=args.launch, env=args.env, compile_cache=args.compile_cache, **_phases(run_dir),
        first_loss=losses[0], last_loss=losses[-1], steps=len(steps),
        versions=versions("torch", "transformers", "trl", "accelerate", "datasets"),
    )


def _phases(run_dir: Path) -> dict:
    """Where the time before the first step went, from the job's log lines (rank 0)."""
    import re

    out = {}
    for log in sorted((run_dir / "logs").glob("*.out")):
        text = log.read_text(errors="replace")
        for key, pattern in (("load_s", r"loaded in ([0-9.]+) s"), ("ready_s", r"ready to train ([0-9.]+) s after start"),
                             ("job_ready_s", r"s after start \(([0-9.]+) s after the job's start"),
                             ("compile_cache_entries", r"compile cache: (\d+) entries"),
                             ("first_compiled_step_s", r"compile: first (?:compiled )?step ([0-9.]+) s"),
                             ("compile_decision", r"compile: (compiling the decoder layers|staying eager)"),
                             ("compile_s", r"of which ([0-9.]+) s compiling")):
            m = re.search(pattern, text)
            if m:
                value = m.group(1)
                out[key] = float(value) if key.endswith("_s") else int(value) if value.isdigit() else value
    return out


def collect(folders: list[Path], name: str, note: str = "") -> Path:
    """One results file from a device run's raw outputs: the seed's and hfhpc's, side by side."""
    from common import write_result

    runs = []
    for path in sorted(p for f in folders for p in Path(f).glob("*.json")):
        raw = json.loads(path.read_text())
        if "recipe" not in raw:  # the seed script's own format
            raw = dict(
                recipe="seed", shape=raw["shape"], lora=raw.get("lora") or None,
                tag=f"{raw['packing']}-{raw['attn']}" + ("-ckpt" if raw["ckpt"] else "-nockpt") + (f"-lora{raw['lora']}" if raw.get("lora") else ""),
                gpu=raw["gpu"], world=raw["world"], bs=raw["bs"], seq=raw["seq"], activation_checkpointing=raw["ckpt"],
                params_b=round(raw["params_b"], 3), tokens_per_s_per_gpu=round(raw["tokens_per_s_per_gpu"], 1),
                tokens_counted="batch x seq per step (the seed's count, padding included)",
                mfu=round(raw["mfu_vs_989"], 4), step_s_median=round(raw["step_s_median"], 4),
                peak_mem_gib=round(raw["peak_mem_gib"], 2), init_s=round(raw["init_s"], 1),
                versions={"torch": raw["torch"], "trl": "1.16.0", "transformers": "5.24.0"},
            )
        runs.append(raw)
    seed = [r for r in runs if r["recipe"] == "seed"]
    for r in runs:
        if seed and r["recipe"] == "hfhpc":
            r["speedup_vs_seed"] = round(r["tokens_per_s_per_gpu"] / seed[0]["tokens_per_s_per_gpu"], 2)
    cards = sorted({f"{r['world']}x {r['gpu']}" for r in runs})
    return write_result(name, {"machine": ", ".join(cards), "note": note, "runs": runs})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=SHAPES, default="1b")
    b.add_argument("--dir", default="/tmp/bench")
    b.add_argument("--docs", type=int, default=4000)
    b.add_argument("--seq", type=int, default=2048)
    r = sub.add_parser("run")
    r.add_argument("--shape", choices=SHAPES, default="1b")
    r.add_argument("--dir", default="/tmp/bench")
    r.add_argument("--gpus", type=int, default=1)
    r.add_argument("--bs", type=int, default=8)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--attention", default="auto")
    r.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    r.add_argument("--tag", default="default")
    r.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="one more train: setting")
    r.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE", help="one more launch: setting")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable for the job")
    r.add_argument("--stop-after", type=int, default=0, help="end the job after this many logged steps (no final save)")
    r.add_argument("--compile-cache", choices=("cold", "store"), default="cold",
                   help="cold: compile from nothing; store: start from the kernels an earlier job kept in the store")
    r.add_argument("--out", default=".")
    c = sub.add_parser("collect", help="merge raw results into benchmarks/results/NAME.json")
    c.add_argument("name")
    c.add_argument("folders", nargs="+", type=Path)
    c.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        print(collect(args.folders, args.name, args.note))
        return 0
    if args.cmd == "build":
        build(args)
        return 0
    result = run(args)
    print("RESULT", json.dumps(result), flush=True)
    out = Path(args.out) / f"hfhpc_{args.shape}_w{args.gpus}_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
