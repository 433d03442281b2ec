"""DPO throughput on one GPU: hfhpc's ``dpo`` recipe, as a user runs it, beside TRL's DPOTrainer with its defaults.

The model is bench_sft's Mistral shape (random weights saved as bf16 safetensors, the word-level
tokenizer and template); the data are preference pairs in UltraFeedback's schema (``chosen`` and
``rejected`` message lists sharing the user turn), each of prompt + chosen and prompt + rejected
drawn from bench_sft's lognormal length distribution (median ``min(1100, seq / 2)`` tokens, within
[64, seq]), the prompt 30 % of the shorter one.

    python benchmarks/bench_dpo.py build --shape 1b --dir /tmp/bench-dpo
    python benchmarks/bench_dpo.py trl   --shape 1b --dir /tmp/bench-dpo --out OUT    # TRL's defaults
    python benchmarks/bench_dpo.py hfhpc --shape 1b --dir /tmp/bench-dpo --out OUT    # hfhpc run of a spec

``trl``: ``DPOTrainer`` given the model's folder and the raw pairs, everything else TRL's default
(its own templating and tokenization, fp32 weights with bf16 autocast, activation checkpointing,
sdpa attention, padded [chosen; rejected] batches, a second copy of the model as the reference).
``hfhpc``: the pairs served with ``hfhpc serve``, staged, and trained with ``hfhpc run`` of a ``dpo``
spec (its defaults: packed rows, compiled layers). Both log TRL's ``num_tokens`` (the batch's
attention-mask sum: chosen + rejected tokens, no padding) every step; tokens per second are the
median over steps after the first ``WARM`` of Δtokens / Δtime. Time to first step runs from the
start of the process (``trl``) or of ``hfhpc run`` to the end of the first optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import SHAPES, VOCAB, _phases, build_model  # noqa: E402
from common import machine, run_job, spec_overrides, stage, versions  # noqa: E402

MODEL_ID = "bench/mistral-{shape}"
DATA_ID = "bench/prefs-lognormal"
SPLIT = "train_prefs"
WARM = 4  # steps left out of the median (compiling, allocator warm-up)
TEMPLATE_TOKENS = 4  # t1 t3 … t2 around the user turn; t4 … t2 around the answer (bench_sft.TEMPLATE)


def pair_lengths(pairs: int, seq: int, seed: int = 0) -> np.ndarray:
    """(prompt, chosen, rejected) token counts of the words in each pair (the template adds its own)."""
    rng = np.random.default_rng(seed)
    total = np.clip(rng.lognormal(np.log(min(1100, seq // 2)), 0.6, (pairs, 2)).astype(int), 64, seq) - TEMPLATE_TOKENS
    prompt = np.maximum(1, (0.3 * total.min(axis=1)).astype(int))
    return np.stack([prompt, total[:, 0] - prompt, total[:, 1] - prompt], axis=1)


def build_data(dest: Path, pairs: int, seq: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 1)
    words = lambda n: " ".join(f"t{x}" for x in rng.integers(5, VOCAB, n))  # noqa: E731
    rows = []
    for p, c, r in pair_lengths(pairs, seq, seed):
        user = {"role": "user", "content": words(p)}
        rows.append({"chosen": [user, {"role": "assistant", "content": words(c)}],
                     "rejected": [user, {"role": "assistant", "content": words(r)}]})
    out = dest / "data" / f"{SPLIT}-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    (dest / "README.md").write_text(
        f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: {SPLIT}\n    path: data/{SPLIT}-*\n---\n"
        "Synthetic preference pairs for throughput benchmarks.\n")


def build(args) -> None:
    from hfhpc.store.importer import import_folder

    root = Path(args.dir)
    upstream, src = root / "store", root / "src"
    t0 = time.time()
    model_dir = src / "model" / args.shape
    if not (model_dir / "config.json").exists():
        build_model(args.shape, model_dir)
    data_dir = src / f"prefs-{args.seq}"
    if not (data_dir / "README.md").exists():
        build_data(data_dir, args.pairs, args.seq)
    import_folder(upstream, "model", MODEL_ID.format(shape=args.shape), model_dir)
    import_folder(upstream, "dataset", DATA_ID, data_dir)
    print(f"built {args.shape} model and {args.pairs} pairs into {upstream} in {time.time() - t0:.0f} s", flush=True)


# -- TRL's DPOTrainer with its defaults ------------------------------------------------------------


def run_trl(args) -> dict:
    """One process: TRL's DPOTrainer on the model folder and the raw pairs, its defaults otherwise."""
    from hfhpc.recipes.common import STARTED  # this process's start, interpreter and imports included

    import datasets
    import torch
    import yaml
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    root = Path(args.dir)
    model_dir = root / "src" / "model" / args.shape
    pairs = datasets.load_dataset("parquet", data_files=str(root / "src" / f"prefs-{args.seq}" / "data" / "*.parquet"),
                                  split="train")
    tok = AutoTokenizer.from_pretrained(model_dir)
    gpu = torch.cuda.is_available()
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs and "loss" in logs:
                if gpu:
                    torch.cuda.synchronize()
                steps.append({"t": time.perf_counter(), "unix_time": time.time(), "num_tokens": logs["num_tokens"],
                              "loss": logs["loss"]})

    config = DPOConfig(output_dir=str(root / "trl-out"), per_device_train_batch_size=args.bs, max_length=args.seq,
                       max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                       use_cpu=not gpu, **{k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in args.train)})
    trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=pairs, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
    return summarize(args, "trl", steps, STARTED, peak_mem_gib=round(peak, 2),
                     attention=trainer.model.config._attn_implementation,
                     activation_checkpointing=bool(config.gradient_checkpointing), dtype=str(trainer.model.dtype))


# -- hfhpc run of a dpo spec -----------------------------------------------------------------------

SPEC = """\
name: {name}
recipe: dpo
model: {model}
dataset: {{id: {data}, split: {split}}}
output_dir: {out}
train:
  max_length: {seq}
  per_device_batch_size: {bs}
  max_steps: {steps}
  logging_steps: 1
  save_steps: 100000
{train_extra}launch: {{strategy: single, mixed_precision: bf16, activation_checkpointing: {ckpt}{launch_extra}}}
resources: {{nodes: 1, gpus_per_node: {gpus}, cpus_per_gpu: 6, time: '1:00:00'}}
"""


def run_hfhpc(args) -> dict:
    root = Path(args.dir)
    name = f"bench-dpo-{args.shape}-{args.tag}"
    folder = root / "jobs" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.yaml"
    spec.write_text(SPEC.format(
        name=name, model=MODEL_ID.format(shape=args.shape), data=DATA_ID, split=SPLIT, out=str(folder / "run"),
        seq=args.seq, bs=args.bs, steps=args.steps, ckpt="true" if args.ckpt else "false", gpus=args.gpus,
        **spec_overrides(args.train, args.launch)))
    env = dict(os.environ, HFHPC_STORE=str(root / "store"))
    stage(root / "store", spec, env)
    run_dir = folder / "run"
    t0, _ = run_job(spec, root, run_dir, env, compile_cache=args.compile_cache, stop_after=args.stop_after)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [{"t": r["elapsed_s"], "unix_time": r["unix_time"], "num_tokens": r["num_tokens"], "loss": r["loss"]}
             for r in rows if "loss" in r and "num_tokens" in r]
    if args.stop_after:
        steps = steps[:args.stop_after]  # the steps asked for; the job may log one more before it is stopped
    return summarize(args, "hfhpc", steps, t0, peak_mem_gib=max((r.get("peak_mem_gib", 0) for r in rows), default=0),
                     activation_checkpointing=args.ckpt, launch=args.launch, compile_cache=args.compile_cache,
                     **_phases(run_dir))


def summarize(args, recipe: str, steps: list[dict], t0: float, **extra) -> dict:
    if len(steps) < WARM + 2:
        raise SystemExit(f"{recipe}: {len(steps)} steps logged, need at least {WARM + 2}")
    times = np.array([s["t"] for s in steps[WARM:]])
    tokens = np.array([s["num_tokens"] for s in steps[WARM:]])
    rates = np.diff(tokens) / np.diff(times)
    return dict(
        recipe=recipe, shape=args.shape, tag=args.tag, gpu=machine(), world=1, bs=args.bs, seq=args.seq,
        train=args.train, tokens_per_s_per_gpu=round(float(np.median(rates)), 1),
        tokens_counted="chosen + rejected tokens per step (attention-mask sum, no padding)",
        real_tokens_per_step=round(float(np.median(np.diff(tokens))), 1),
        step_s_median=round(float(np.median(np.diff(times))), 4),
        time_to_first_step_s=round(steps[0]["unix_time"] - t0, 1),
        first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"], steps=len(steps),
        versions=versions("torch", "transformers", "trl", "accelerate", "datasets"), **extra,
    )


def collect(folders: list[Path], name: str, note: str = "") -> Path:
    """One results file from a device run's raw outputs, each hfhpc row with its speed-up over TRL's."""
    from common import write_result

    runs = [json.loads(p.read_text()) for f in folders for p in sorted(Path(f).glob("dpo_*.json"))]
    base = [r for r in runs if r["recipe"] == "trl"]
    for r in runs:
        if base and r["recipe"] == "hfhpc":
            r["speedup_vs_trl"] = round(r["tokens_per_s_per_gpu"] / base[0]["tokens_per_s_per_gpu"], 2)
    return write_result(name, {"machine": ", ".join(sorted({r["gpu"] for r in runs})), "note": note, "runs": runs})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=SHAPES, default="1b")
    b.add_argument("--dir", default="/tmp/bench-dpo")
    b.add_argument("--pairs", type=int, default=1000)
    b.add_argument("--seq", type=int, default=1024)
    for cmd in ("trl", "hfhpc"):
        r = sub.add_parser(cmd)
        r.add_argument("--shape", choices=SHAPES, default="1b")
        r.add_argument("--dir", default="/tmp/bench-dpo")
        r.add_argument("--bs", type=int, default=8, help="pairs per step (rows: twice as many)")
        r.add_argument("--seq", type=int, default=1024, help="max_length (the data built for it)")
        r.add_argument("--steps", type=int, default=20)
        r.add_argument("--tag", default="default")
        r.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                       help="one more train: setting (trl: a DPOConfig field, its value read as YAML)")
        r.add_argument("--out", default=".")
        if cmd == "hfhpc":
            r.add_argument("--gpus", type=int, default=1)
            r.add_argument("--ckpt", action="store_true", help="activation checkpointing")
            r.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE", help="one more launch: setting")
            r.add_argument("--stop-after", type=int, default=0, help="end the job after this many logged steps")
            r.add_argument("--compile-cache", choices=("cold", "store"), default="cold")
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
    result = run_trl(args) if args.cmd == "trl" else run_hfhpc(args)
    print("RESULT", json.dumps(result), flush=True)
    out = Path(args.out) / f"dpo_{args.cmd}_{args.shape}_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
