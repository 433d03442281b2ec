"""``hfhpc plan`` for ``recipe: infer``: from the staged model and dataset alone (no torch), the GPU
memory (weights, KV cache), the rows generated at once and the time from the measured rate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MODEL_ID
from tests.conftest import hfhpc

SPEC = f"""\
name: answers
recipe: infer
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: test_gen, max_samples: 40}}
infer: {{task: text-generation, max_new_tokens: 64}}
"""


@pytest.fixture(scope="module")
def staged(hub, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("plan-infer")
    spec = folder / "answers.yaml"
    spec.write_text(SPEC)
    out = hfhpc("--store", str(folder / "store"), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    return spec, folder / "store"


def _plan(spec: Path, store: Path, *args: str) -> dict:
    out = hfhpc("--store", str(store), "plan", str(spec), "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_plan_sizes_the_kv_cache_and_the_time_from_the_staged_prompts(staged) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from hfhpc.recipes.generate import encode
    from hfhpc.recipes.infer import inputs_of
    from hfhpc.store.layout import snapshot_dir

    spec, store = staged
    plan = _plan(spec, store, "--gpu", "h100")
    lock = {a["id"]: a for a in json.loads(spec.with_suffix(".lock").read_text())["assets"]}
    snapshot = snapshot_dir(store, "model", MODEL_ID, lock[MODEL_ID]["commit"])
    config = AutoConfig.from_pretrained(snapshot)
    head_dim = config.hidden_size // config.num_attention_heads
    assert plan["kv_bytes_per_token"] == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    assert plan["rows"] == 40 and plan["new_tokens"] == 64
    # The prompts as the recipe encodes them (cut after the last user turn, the chat template with its
    # generation prompt), against the plan's count without torch or transformers.
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    first = _first_rows(store, lock)
    exact = [len(encode(tokenizer, p)) for p in inputs_of(first, chat=True)]
    assert max(exact) - 8 <= plan["prompt_max"] <= max(exact)  # the plan renders no generation prompt
    assert plan["max_len"] == plan["prompt_max"] + 64
    assert plan["slots"] == 40 and plan["fits"]  # every row at once: a tiny model's cache is small
    assert plan["new_tokens_per_s"] is None and any("no time is estimated" in n for n in plan["notes"])  # 0.2M parameters
    # A 1.1B model of the same layout: the rate measured on it, per card.
    big = spec.parent / "bench-1b.json"
    big.write_text(json.dumps({**config.to_dict(), "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                               "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000,
                               "tie_word_embeddings": False}))
    h100 = _plan(spec, store, "--gpu", "h100", "--model-config", str(big))
    assert h100["new_tokens_per_s"] == pytest.approx(18_388 * 1.1e9 / h100["shape"]["params"], rel=1e-9)
    assert h100["measured"] == ["benchmarks/results/infer_1b_h100_fused.json"]
    assert h100["est_s"] == pytest.approx(40 * 64 / h100["new_tokens_per_s"])
    assert h100["kv_bytes_per_token"] == 22528  # the bench model's, benchmarks/results/infer_1b_h100.json
    h200 = _plan(spec, store, "--gpu", "h200", "--model-config", str(big))
    assert h200["new_tokens_per_s"] == pytest.approx(h100["new_tokens_per_s"] * 19_482 / 18_388)  # measured on each
    a100 = _plan(spec, store, "--gpu", "a100-80", "--model-config", str(big))  # not measured: the H100's, by bandwidth
    assert a100["new_tokens_per_s"] == pytest.approx(h100["new_tokens_per_s"] * 2.04 / 3.35)
    for card, source in (("h200", "infer_1b_h200_fused.json, scaled by parameters)"),
                         ("a100-80", "infer_1b_h100_fused.json, scaled by parameters and memory bandwidth from the H100's)")):
        text = hfhpc("--store", str(store), "plan", str(spec), "--gpu", card, "--model-config", str(big))
        assert text.returncode == 0 and source in text.stdout, text.stdout + text.stderr


def _first_rows(store: Path, lock: dict) -> list:
    from hfhpc.store.prepare import staged_sample
    from hfhpc.spec import DatasetRef

    dref = DatasetRef(id=CHAT_DATASET_ID, split="test_gen", max_samples=40)
    _, sample = staged_sample(store, dref, lock[CHAT_DATASET_ID]["commit"])
    return [r["messages"] for r in sample[:40]]


def test_plan_of_infer_imports_no_ml_library(staged) -> None:
    import subprocess
    import sys

    spec, store = staged
    code = ("import sys; from hfhpc.cli.main import main; rc = main(['--store', sys.argv[1], 'plan', sys.argv[2]]); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(store), str(spec)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "40 rows of" in out.stdout and "KV cache" in out.stdout
