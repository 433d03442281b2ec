"""Loglikelihood benchmarks on a GPU: ``recipe: harness`` as a user runs it (``hfhpc run``, sealed,
offline) beside lm-evaluation-harness's own ``lm_eval --model hf`` with its defaults, on the same
model and the same staged data, in the same call.

The workload is hellaswag-shaped: the real task (``hellaswag`` from the harness's registry, its
``process_docs`` and four endings per document) over a synthetic ``Rowan/hellaswag`` of ``--docs``
documents whose contexts and endings have the real dataset's lengths in words, on the 1.1B Mistral
shape of ``bench_sft.py`` (random weights: the accuracy is chance, the time is not).

    python benchmarks/bench_harness.py --dir /tmp/hb --shape 1b --docs 2000 --out RESULTS_DIR

On the GPU machine, lm_eval and what its CLI imports travel as wheels: lm_eval, sacrebleu, portalocker,
colorama, lxml, tabulate, chardet, more-itertools and pytablewriter with its dependencies (DataProperty,
mbstrdecoder, pathvalidate, tabledata, tcolorpy, typepy); without pytablewriter the CLI fails after
saving its results, when it prints its table (benchmarks/results/harness_1b_h200.log).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import MODEL_ID, VOCAB, build_model  # noqa: E402
from common import machine, versions  # noqa: E402

HELLASWAG_ID = "Rowan/hellaswag"


def build_hellaswag(dest: Path, docs: int, seed: int = 0) -> None:
    """Rowan/hellaswag's schema; contexts of ~40 words and endings of ~20 (the real validation split's
    means), each word one token of the bench tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)

    def words(mean: int) -> str:
        return " ".join(f"t{rng.randrange(5, VOCAB)}" for _ in range(max(4, int(rng.gauss(mean, mean / 4)))))

    rows = [{"ind": i, "activity_label": "t3", "ctx_a": words(30), "ctx_b": words(10), "ctx": "",
             "endings": [words(20) for _ in range(4)], "source_id": str(i), "split": "val",
             "split_type": "indomain", "label": str(rng.randrange(4))} for i in range(docs)]
    for split, part in (("train", rows[:16]), ("validation", rows)):
        out = dest / "data" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part), out)
    (dest / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: validation\n    path: data/validation-*\n---\nSynthetic hellaswag-shaped documents.\n")


SPEC = """\
name: harness-bench
recipe: harness
model: {model}
harness: {{tasks: [hellaswag]}}
resources: {{nodes: 1, gpus_per_node: {gpus}, time: '1:00:00'}}
output_dir: {out}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--shape", default="1b")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true", help="try the benchmark itself on a CPU (tiny shape)")
    args = p.parse_args(argv)
    from hfhpc.store.importer import import_folder
    from hfhpc.store.server import StoreServer

    root, model_id = args.dir, MODEL_ID.format(shape=args.shape)
    upstream, store = root / "upstream", root / "store"
    model_dir, data_dir = root / "src" / "model", root / "src" / "hellaswag"
    if not (model_dir / "config.json").exists():
        build_model(args.shape, model_dir)
    if not (data_dir / "README.md").exists():
        build_hellaswag(data_dir, args.docs)
    import_folder(upstream, "model", model_id, model_dir)
    import_folder(upstream, "dataset", HELLASWAG_ID, data_dir)
    spec = root / "harness-bench.yaml"
    spec.write_text(SPEC.format(model=model_id, gpus=0 if args.cpu else 1, out=root / "run"))
    env = {**os.environ, "HFHPC_STORE": str(store), "HFHPC_STATE_DIR": str(root / "state"), "HF_HUB_DISABLE_XET": "1"}
    rows = []
    with StoreServer(upstream) as hub:
        subprocess.run([sys.executable, "-m", "hfhpc", "stage", str(spec)], env={**env, "HF_ENDPOINT": hub.url}, check=True)
    # hfhpc: `hfhpc run` from the command to eval.json, everything included.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hfhpc", "run", "--fresh", str(spec)] if "--fresh" in _help(env) else
                   [sys.executable, "-m", "hfhpc", "run", str(spec)], env=env, check=True)
    hfhpc_s = time.perf_counter() - t0
    print(f"hfhpc run: {hfhpc_s:.1f} s from the command to eval.json", flush=True)
    table = json.loads((root / "run" / "eval.json").read_text())
    rows.append({"recipe": "hfhpc", "defaults": True, "wall_s": round(hfhpc_s, 1), "acc": table["hellaswag"]["acc"]["value"]})
    # The harness's own CLI with its defaults (batch size 1, dtype from the config), offline from the
    # same store so that both read the same data.
    offline = {**env, "HF_HOME": str(store), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    snapshot = next((store / "hub" / f"models--{model_id.replace('/', '--')}" / "snapshots").iterdir())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={snapshot}",
                    "--tasks", "hellaswag", "--device", "cpu" if args.cpu else "cuda:0",
                    "--output_path", str(root / "lm_eval-out")], env=offline, check=True)
    lm_eval_s = time.perf_counter() - t0
    rows.append({"recipe": "lm_eval", "defaults": True, "wall_s": round(lm_eval_s, 1)})
    requests = args.docs * 4
    for r in rows:
        r.update(gpu=machine(), shape=args.shape, docs=args.docs, loglikelihood_requests=requests,
                 requests_per_s=round(requests / r["wall_s"], 1))
    rows[0]["speedup_vs_lm_eval"] = round(lm_eval_s / hfhpc_s, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"harness_{args.shape}_{'cpu' if args.cpu else 'gpu'}.json"
    path.write_text(json.dumps({"benchmark": "harness_hellaswag", "machine": machine(), "versions": versions("torch", "transformers", "datasets", "lm_eval"),
                                "note": "hellaswag-shaped loglikelihood requests; wall time from the command to the results",
                                "runs": rows}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


def _help(env: dict) -> str:
    return subprocess.run([sys.executable, "-m", "hfhpc", "run", "--help"], env=env, capture_output=True, text=True).stdout


if __name__ == "__main__":
    sys.exit(main())
