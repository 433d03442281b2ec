"""`make demo` end to end: scripts/demo.sh in a temporary folder (DEMO_DIR), as a new user runs it,
then the files it leaves: the fine-tuned models load, the scores are there, the predictions are one
line per input in input order, the report exists, and the closing summary names all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, SENTIMENT_DATASET_ID, SENTIMENT_LABELS
from hfhpc.store.layout import snapshot_dir
from tests.conftest import REPO_ROOT

DEMO_SH = REPO_ROOT / "scripts" / "demo.sh"
RECIPES = ("sft", "dpo", "classify", "infer", "evaluate")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _locked_commit(lock: Path, repo_id: str) -> str:
    return next(a["commit"] for a in json.loads(lock.read_text())["assets"] if a["id"] == repo_id)


def _split_rows(demo: Path, spec: str, dataset_id: str, split: str) -> list[dict[str, Any]]:
    """The rows of a staged split, read straight from its parquet file in the store."""
    import pyarrow.parquet as pq

    commit = _locked_commit(demo / "specs" / f"{spec}.lock", dataset_id)
    folder = snapshot_dir(demo / "store", "dataset", dataset_id, commit) / "data"
    (path,) = folder.glob(f"{split}-*.parquet")
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the demo once, as `make demo` does (the virtualenv's bin first on PATH)."""
    folder = tmp_path_factory.mktemp("demo") / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFHPC_", "TRANSFORMERS_"))}
    env.update(DEMO_DIR=str(folder), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    out = subprocess.run(["bash", str(DEMO_SH)], env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"
    return folder, out


@pytest.mark.slow
def test_demo_stays_in_its_folder_and_logs_every_step(demo) -> None:
    folder, out = demo
    runs = folder / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"demo-{r}" for r in RECIPES)
    for recipe in RECIPES:
        assert (folder / "specs" / f"{recipe}.lock").is_file()
        for step in ("stage", "check", "run"):
            assert (folder / "logs" / f"{step}-{recipe}.log").is_file()
    assert "ready:" in (folder / "logs" / "check-classify.log").read_text()
    # No progress bars on the screen: the terminal shows a few lines per command.
    assert "\r" not in out.stdout and "it/s]" not in out.stdout
    assert out.stderr == ""


@pytest.mark.slow
def test_the_fine_tuned_models_load(demo) -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    folder, _ = demo
    for run in ("demo-sft", "demo-dpo"):
        model = AutoModelForCausalLM.from_pretrained(folder / "runs" / run / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder / "runs" / run / "model")
        assert model.config.model_type == "mistral" and tokenizer.chat_template, run

    classifier = folder / "runs" / "demo-classify" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    tokenizer = AutoTokenizer.from_pretrained(classifier)
    assert model.config.id2label == dict(enumerate(SENTIMENT_LABELS))
    logits = model(**tokenizer(["The film was wonderful.", "The meal was dreadful."], return_tensors="pt", padding=True)).logits
    assert logits.argmax(-1).tolist() == [1, 0]


@pytest.mark.slow
def test_eval_json_holds_the_metric(demo) -> None:
    folder, _ = demo
    runs = folder / "runs"
    sft = json.loads((runs / "demo-sft" / "eval.json").read_text())
    assert sft["eval_loss"] > 0
    classify = json.loads((runs / "demo-classify" / "eval.json").read_text())
    assert classify["rows"] == 64 and classify["accuracy"] >= 0.85  # chance is 0.5
    dpo = json.loads((runs / "demo-dpo" / "eval.json").read_text())
    assert dpo["pairs"] == 64 and dpo["reward_accuracy"] >= 0.75  # chance is 0.5
    evaluate = json.loads((runs / "demo-evaluate" / "eval.json").read_text())
    assert evaluate["rows"] == 64 and 0.0 <= evaluate["accuracy"] <= 1.0


@pytest.mark.slow
def test_predictions_are_one_line_per_input_in_order(demo) -> None:
    folder, _ = demo
    rows = _split_rows(folder, "infer", CHAT_DATASET_ID, "test_gen")[:24]  # infer.yaml: max_samples 24
    predictions = _lines(folder / "runs" / "demo-infer" / "predictions.jsonl")
    assert [p["index"] for p in predictions] == list(range(len(rows)))
    for p, row in zip(predictions, rows, strict=True):
        # The conversation up to its last user turn, then the generated text.
        assert p["input"][-1]["role"] == "user" and p["input"] == row["messages"][: len(p["input"])]
        assert isinstance(p["prediction"], str)

    reviews = _split_rows(folder, "evaluate", SENTIMENT_DATASET_ID, "test")
    scored = _lines(folder / "runs" / "demo-evaluate" / "predictions.jsonl")
    assert [p["index"] for p in scored] == list(range(len(reviews)))
    assert [p["input"] for p in scored] == [r["text"] for r in reviews]
    assert [p["reference"] for p in scored] == [SENTIMENT_LABELS[r["label"]] for r in reviews]


@pytest.mark.slow
def test_report_and_summary_name_every_result(demo) -> None:
    folder, out = demo
    runs = folder / "runs"
    report = runs / "demo-sft" / "report.html"
    assert report.is_file() and "demo-sft" in report.read_text()
    summary = out.stdout.split("\nResults\n", 1)[1]
    for path in ("demo-sft/model", "demo-sft/report.html", "demo-dpo/model", "demo-dpo/eval.json", "demo-dpo/report.html",
                 "demo-classify/model", "demo-classify/eval.json",
                 "demo-infer/predictions.jsonl", "demo-evaluate/eval.json", "demo-evaluate/predictions.jsonl"):
        assert str(runs / path) in summary, path
    classify = json.loads((runs / "demo-classify" / "eval.json").read_text())
    assert f"accuracy {classify['accuracy']:.3f}" in summary
    dpo = json.loads((runs / "demo-dpo" / "eval.json").read_text())
    assert f"reward accuracy {dpo['reward_accuracy']:.3f} on 64 held-out pairs, above chance (0.5)" in summary
    for stage in ("build", "stage", "check", "sft", "dpo", "classify", "infer", "evaluate", "report"):
        assert f" {stage} " in summary.split("time:", 1)[1], stage
