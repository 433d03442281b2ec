"""Offline text generation on one GPU: hfhpc's ``infer`` recipe (its defaults, and the pipeline path
in batches of 8 and 64) beside transformers' continuous batching (``generate_batch``), in one call.

Workload: the 1.1B Mistral-shaped model of ``bench_sft.py`` (random weights, bf16) and the first
``--rows`` chat prompts of its data (each conversation cut after its user turn, the chat template
applied), ``--new`` new tokens each, greedy. ``min_new_tokens`` equal to ``max_new_tokens`` makes every
row the same length on every path (a random model may say EOS early); new tokens are counted from
the outputs all the same.

    python benchmarks/bench_infer.py --dir /tmp/bench --out results/

hfhpc's paths run as a user runs them (``hfhpc run SPEC``, staged store, sealed); their time is the
recipe's own (``summary.json``: from the loaded model to the last row written, prompt encoding and
graph capture included), time to first output row likewise. ``generate_batch`` runs in this process on
the same prompt ids, warm-up included. The bandwidth bound is the new tokens over the time to read,
at 4.8 TB/s, what decoding must read when all rows decode as one batch: every weight once per step
plus every row's KV cache up to its current length (prefill not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import DATA_ID, MODEL_ID, build_data, build_model  # noqa: E402
from common import machine, stage, versions  # noqa: E402

SPEC = """\
name: {name}
recipe: infer
model: {model}
dataset: {{id: {data}, split: train_sft, max_samples: {rows}}}
infer: {{task: text-generation, max_new_tokens: {new}, min_new_tokens: {new}, do_sample: false{extra}}}
launch: {{strategy: single, mixed_precision: {precision}}}
resources: {{nodes: 1, gpus_per_node: {gpus}, time: "0-00:30:00"}}
output_dir: {out}
"""
# name → (extra infer: keys, environment): the recipe's defaults, the defaults on each decode attention
# (hfhpc.recipes.generate.ATTENTION_ENV), then the pipeline path the engine replaced.
HFHPC = {
    "hfhpc-defaults": ("", {}),
    "hfhpc-defaults-matmul": ("", {"HFHPC_DECODE_ATTENTION": "matmul"}),
    "hfhpc-defaults-sdpa": ("", {"HFHPC_DECODE_ATTENTION": "sdpa"}),
    "hfhpc-pipeline-bs64": (", engine: pipeline, batch_size: 64", {}),
    "hfhpc-pipeline-bs8": (", engine: pipeline, batch_size: 8", {}),
}


def build(root: Path, shape: str) -> None:
    from hfhpc.store.importer import import_folder

    src = root / "src"
    model_dir = src / "model" / shape
    if not (model_dir / "config.json").exists():
        build_model(shape, model_dir)
    if not (src / "data" / "README.md").exists():
        build_data(src / "data", 4000, 2048)
    import_folder(root / "store", "model", MODEL_ID.format(shape=shape), model_dir)
    import_folder(root / "store", "dataset", DATA_ID, src / "data")


def run_hfhpc(root: Path, name: str, shape: str, rows: int, new: int, extra: str, gpus: int,
              environ: dict[str, str] | None = None) -> dict:
    folder = root / "jobs" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.yaml"
    run_dir = folder / "run"
    spec.write_text(SPEC.format(name=name, model=MODEL_ID.format(shape=shape), data=DATA_ID, rows=rows, new=new,
                                extra=extra, out=str(run_dir), gpus=gpus, precision="bf16" if gpus else '"no"'))
    env = dict(os.environ, HFHPC_STORE=str(root / "store"))
    stage(root / "store", spec, env)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hfhpc.cli.main", "run", str(spec)], env=dict(env, **(environ or {})))
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"name": name, "error": f"hfhpc run exited {proc.returncode}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    # The word-level tokenizer decodes each new token to one word.
    tokens = sum(len(p["prediction"].split()) for p in preds)
    return {
        "name": name, "rows": len(preds), "new_tokens": tokens, "seconds": summary["seconds"],
        "new_tokens_per_s": round(tokens / summary["seconds"], 1),
        "time_to_first_row_s": summary.get("first_row_s"), "wall_s": round(wall, 1),
        "engine": summary.get("engine"), "engine_stats": summary.get("engine_stats"),
        "engine_new_tokens": summary.get("new_tokens"),
        "predictions": [p["prediction"] for p in preds],
    }


def prompt_ids(root: Path, shape: str, rows: int) -> tuple[list[list[int]], object]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from hfhpc.recipes.generate import encode
    from hfhpc.recipes.infer import inputs_of

    tok = AutoTokenizer.from_pretrained(root / "src" / "model" / shape)
    ds = load_dataset("parquet", data_files=str(root / "src" / "data" / "data" / "*.parquet"), split="train")
    conversations = inputs_of(ds.select(range(rows))["messages"], chat=True)
    return [encode(tok, c) for c in conversations], tok


def run_generate_batch(root: Path, shape: str, ids: list[list[int]], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(root / "src" / "model" / shape, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        out = model.generate_batch(inputs=ids, generation_config=config)
    except Exception as e:  # noqa: BLE001 - a row of the results says why this path did not run
        return {"name": "transformers-generate_batch", "error": f"{type(e).__name__}: {e}"[:500]}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    del model
    torch.cuda.empty_cache()
    return {"name": "transformers-generate_batch", "rows": len(out), "new_tokens": tokens, "seconds": round(seconds, 3),
            "new_tokens_per_s": round(tokens / seconds, 1),
            "time_to_first_row_s": round(seconds, 3),  # all rows come back together
            "attn_implementation": "sdpa"}


# The engine's settings one at a time, in this process on the same prompt ids (name → Engine arguments).
# The first pays each kernel's first use in the process; "defaults-again" is the same engine warm.
LEVERS = {
    "defaults": {},
    "attention-matmul": {"attention": "matmul"},
    "attention-sdpa": {"attention": "sdpa"},
    "defaults-again": {},
    "unfused": {"fused": False},  # transformers' own layer forwards
    "capture-before-prefill": {"overlap_capture": False},
    "no-cuda-graphs": {"graphs": False},
    "prefill-8k-tokens": {"prefill_tokens": 8192},
    "prefill-64k-tokens": {"prefill_tokens": 65536},
    "check-every-16-steps": {"check_every": 16},
    "128-slots": {"slots": 128},
}


def run_levers(root: Path, shape: str, ids: list[list[int]], new: int, bound: dict, names: list[str],
               profile: Path | None = None) -> list[dict]:
    """The engine alone (no recipe around it), once per lever: new tokens/s and where the time went."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from hfhpc.recipes import generate as g

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(root / "src" / "model" / shape, dtype=dtype).to(device).eval()
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=model.generation_config.eos_token_id)
    sampling = g.sampling_of(config, 0)
    max_len = g.max_len_for(model, sampling, map(len, ids))
    out = []
    for name in names:
        lever = dict(LEVERS[name])
        check_every = lever.pop("check_every", None)
        slots = lever.pop("slots", None) or g.plan_slots(model, max_len, len(ids))
        t0 = time.perf_counter()
        engine = g.Engine(model, sampling, slots=slots, max_len=max_len, **lever)
        tokens = sum(len(f.tokens) for f in engine.run(enumerate(ids), check_every=check_every))
        seconds = time.perf_counter() - t0
        row = {"name": name, "slots": slots, "new_tokens": tokens, "seconds": round(seconds, 3),
               "new_tokens_per_s": round(tokens / seconds, 1),
               "bandwidth_bound_fraction": round(tokens / seconds / bound["bound_new_tokens_per_s"], 4),
               **{k: round(v, 3) if isinstance(v, float) else v for k, v in engine.stats.items()}}
        print(row, flush=True)
        out.append(row)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    if profile is not None:
        profile_step(model, sampling, ids, max_len, profile)
    del model
    return out


def profile_step(model, sampling, ids: list[list[int]], max_len: int, path: Path) -> None:
    """Kernel times, eager (graphs off, so that each kernel is seen), for each decode attention: the
    first prefill round with its first decode steps, then 8 decode steps of every slot. The largest
    kernels of each go to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hfhpc.recipes import generate as g

    slots = g.plan_slots(model, max_len, len(ids))
    lines = []
    for attention in ("varlen", "matmul"):
        engine = g.Engine(model, sampling, slots=slots, max_len=max_len, graphs=False, attention=attention)
        first, steps = profile(activities=[ProfilerActivity.CUDA]), profile(activities=[ProfilerActivity.CUDA])
        calls = []

        def stop() -> bool:  # called by the engine's loop, inside its context, before each round
            calls.append(1)
            if len(calls) == 1:
                first.start()
                return False
            torch.cuda.synchronize()
            first.stop()
            with steps:
                for _ in range(8):
                    engine._decode(engine.buckets[-1])
                torch.cuda.synchronize()
            return True

        list(engine.run(enumerate(ids), should_stop=stop))
        for title, prof in ((f"prefill of {slots} rows and the first decode steps", first), ("8 decode steps", steps)):
            lines.append(f"== {attention}: {title} (eager; the step's span {engine.buckets[-1]})")
            lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=140))
        engine = None  # its cache freed before the next one is allocated
        torch.cuda.empty_cache()
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def bandwidth_bound(root: Path, shape: str, lengths: list[int], new: int) -> dict:
    """New tokens/s if decoding only read, at HBM speed, the weights once per step and every row's KV
    cache up to its length, all rows in one batch."""
    from transformers import AutoConfig

    from hfhpc.recipes.generate import SlotCache

    import torch

    from hfhpc.plan.gpus import GPUS, gpu_kind_of

    # The card's own memory bandwidth (its datasheet figure, hfhpc.plan.gpus): the bound's denominator.
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    kind = GPUS.get(gpu_kind_of(card) or "h200", GPUS["h200"])
    hbm_bytes_per_s = kind.hbm_tb_s * 1e12
    config = AutoConfig.from_pretrained(root / "src" / "model" / shape)
    weights = sum(f.stat().st_size for f in (root / "src" / "model" / shape).glob("*.safetensors"))
    kv = SlotCache.bytes_per_token(config, 2)
    read = sum(weights + sum(n + k for n in lengths) * kv for k in range(new))
    tokens = len(lengths) * new
    return {"weights_bytes": weights, "kv_bytes_per_token": kv, "decode_bytes": read,
            "bound_new_tokens_per_s": round(tokens / (read / hbm_bytes_per_s), 1),
            "hbm_bytes_per_s": hbm_bytes_per_s, "hbm_of": kind.name}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/bench")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--bs8-rows", type=int, default=256, help="rows for the slow pipeline path in batches of 8")
    ap.add_argument("--variants", default="hfhpc-defaults,hfhpc-pipeline-bs64,transformers-generate_batch,hfhpc-pipeline-bs8")
    ap.add_argument("--levers", nargs="?", const=",".join(LEVERS), default="",
                    help="first, the engine alone under each of LEVERS (all, or a comma-separated subset)")
    ap.add_argument("--profile", action="store_true", help="after the levers, a kernel profile of the decode step")
    ap.add_argument("--cpu", action="store_true", help="hfhpc's paths on a CPU rank (to try the benchmark itself)")
    ap.add_argument("--stop-below", type=float, default=0.0,
                    help="skip the remaining paths when the defaults' new tokens/s fall below this (or fail)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "infer_1b_h200.json"))
    args = ap.parse_args(argv)
    root = Path(args.dir)
    t0 = time.time()
    build(root, args.shape)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    ids, _ = prompt_ids(root, args.shape, args.rows)
    lengths = [len(x) for x in ids]
    bound = bandwidth_bound(root, args.shape, lengths, args.new)
    gpu = machine()
    if args.levers:
        names = args.levers.split(",")
        unknown = [n for n in names if n not in LEVERS]
        if unknown:
            raise SystemExit(f"unknown lever(s) {unknown}: choose from {', '.join(LEVERS)}")
        profile = Path(args.out).with_name(Path(args.out).stem + "_profile.txt") if args.profile else None
        levers = run_levers(root, args.shape, ids, args.new, bound, names, profile)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name(Path(args.out).stem + "_levers.json").write_text(json.dumps({
            "benchmark": f"infer_{args.shape}_levers", "machine": gpu, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "the engine alone, in the benchmark's process, on the benchmark's prompt ids; seconds from "
                    "building the engine (cache allocation, graph capture) to the last row",
            "bandwidth_bound": bound, "rows": levers}, indent=2) + "\n")
    results = []
    for name in filter(None, args.variants.split(",")):  # --variants "": the levers alone
        print(f"=== {name} {time.strftime('%T')}", flush=True)
        if name == "transformers-generate_batch":
            row = run_generate_batch(root, args.shape, ids, args.new)
            row["recipe"], row["defaults"] = "transformers", False
        else:
            extra, environ = HFHPC[name]
            rows = args.bs8_rows if name == "hfhpc-pipeline-bs8" else args.rows
            row = run_hfhpc(root, name, args.shape, rows, args.new, extra, 0 if args.cpu else 1, environ)
            row["recipe"], row["defaults"] = "hfhpc", name == "hfhpc-defaults"
            row["infer_keys"] = extra.lstrip(", ") or None
            row["environment"] = environ or None
        row["gpu"] = gpu
        if "new_tokens_per_s" in row:
            row["bandwidth_bound_fraction"] = round(row["new_tokens_per_s"] / bound["bound_new_tokens_per_s"], 4)
        print({k: v for k, v in row.items() if k != "predictions"}, flush=True)
        results.append(row)
        write(args, lengths, bound, gpu, results)
        if row.get("defaults") and row.get("new_tokens_per_s", 0.0) < args.stop_below:
            print(f"the defaults ran below {args.stop_below} new tokens/s: the other paths are skipped", flush=True)
            break
    write(args, lengths, bound, gpu, results, final=True)
    for r in results:
        print(f"{r['name']:32s} {r.get('new_tokens_per_s', r.get('error'))!s:>12} tok/s  first row {r.get('time_to_first_row_s')} s"
              f"  bound {r.get('bandwidth_bound_fraction')}")
    return 0


def write(args, lengths: list[int], bound: dict, gpu: str, results: list[dict], final: bool = False) -> None:
    # The paths' greedy outputs, row by row, against the defaults' (same prompts, same model).
    base = next((r.get("predictions") for r in results if r.get("defaults")), None)
    rows = []
    for row in results:
        preds = row.get("predictions")
        row = {k: v for k, v in row.items() if k != "predictions"}
        if base is not None and preds is not None:
            row["same_text_as_defaults"] = sum(a == b for a, b in zip(preds, base))
        rows.append(row)
    out = {
        "benchmark": "infer_1b_h200", "machine": gpu, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": {"model": MODEL_ID.format(shape=args.shape), "rows": args.rows, "new_tokens_per_row": args.new,
                     "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1), "max_prompt_tokens": max(lengths),
                     "greedy": True, "dtype": "bfloat16"},
        "bandwidth_bound": bound,
        "versions": versions("torch", "transformers", "hfhpc"),
        "rows": rows,
    }
    if not final:
        out["partial"] = True
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
