"""The infer, evaluate and classify recipes end to end: the demo specs staged from the loopback Hub
into a store, then `hfhpc run` on CPU ranks, sealed and offline, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from hfhpc.demo.build import MINILM_ID, SENTIMENT_LABELS
from hfhpc.spec import load_spec
from tests.conftest import REPO_ROOT, hfhpc

EXAMPLES = REPO_ROOT / "examples"
MY_EXAMPLES = [EXAMPLES / f"{name}.yaml" for name in ("infer", "evaluate", "classify")]
DEMOS = [EXAMPLES / "demo" / f"{name}.yaml" for name in ("infer", "evaluate", "classify")]
INFER_ROWS = 24  # examples/demo/infer.yaml: max_samples


def _write_spec(folder: Path, data: dict[str, Any], lock_from: Path | None = None) -> Path:
    """Write ``data`` as ``<name>.yaml`` running into ``runs/<name>``; reuse another spec's lockfile."""
    spec = folder / f"{data['name']}.yaml"
    spec.write_text(yaml.safe_dump({**data, "output_dir": f"runs/{data['name']}"}, sort_keys=False))
    if lock_from is not None:
        spec.with_suffix(".lock").write_text(lock_from.with_suffix(".lock").read_text())
    return spec


def _variant(spec: Path, name: str, **changes: Any) -> Path:
    """A copy of ``spec`` under another name, with top-level keys replaced (same assets, same lock)."""
    data = yaml.safe_load(spec.read_text())
    return _write_spec(spec.parent, {**data, **changes, "name": name}, lock_from=spec)


def _run(spec: Path, store: Path) -> subprocess.CompletedProcess:
    return hfhpc("--store", str(store), "run", str(spec), timeout=600)


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


def _interrupt(spec: Path, store: Path, ready) -> subprocess.CompletedProcess:
    """Start ``hfhpc run SPEC``, send it SIGTERM once ``ready()`` is true (as SLURM does before the time
    limit), and wait for it to stop."""
    # Output to files, not pipes: nobody reads a pipe while waiting, and a full one would block the run.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(store), "run", str(spec)],
                                stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    assert running, f"the run ended (or hung) before it could be interrupted\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_dir(spec: Path) -> Path:
    return spec.parent / "runs" / spec.stem


@pytest.fixture(scope="module")
def staged(hub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three demo specs (plus an evaluate-a-file spec) staged into one store: {name: spec, "store": …}."""
    folder = tmp_path_factory.mktemp("recipes")
    store = folder / "store"
    specs = {}
    for demo in DEMOS:
        specs[demo.stem] = _write_spec(folder, yaml.safe_load(demo.read_text()))
    specs["score-file"] = _write_spec(folder, {
        "name": "score-file", "recipe": "evaluate", "predictions": "hand-made.jsonl", "metrics": ["accuracy"],
        "resources": {"gpus_per_node": 0, "cpus_per_gpu": 1},
    })
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    for spec in specs.values():
        out = hfhpc("--store", str(store), "stage", "--quiet", str(spec), env=env)
        assert out.returncode == 0, out.stderr
    return {**specs, "store": store}


@pytest.fixture(scope="module")
def one_rank_predictions(staged: dict[str, Path]) -> list[dict[str, Any]]:
    # One thread, as each of the two ranks below has: the same arithmetic gives the same tokens.
    spec = _variant(staged["infer"], "infer-1rank", resources={"gpus_per_node": 0, "cpus_per_gpu": 1})
    _ok(_run(spec, staged["store"]))
    return _lines(_run_dir(spec) / "predictions.jsonl")


# -- the example specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MY_EXAMPLES + DEMOS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_specs_parse(path: Path) -> None:
    spec = load_spec(path)
    assert spec.recipe == path.stem
    if path.parent.name == "demo":
        # The demos run on the bundled repos, on CPU ranks.
        assert spec.model.id.startswith("hfhpc-demo/") or spec.model.id == MINILM_ID
        assert spec.dataset.id.startswith("hfhpc-demo/")
        assert spec.resources.gpus_per_node == 0


# -- infer ---------------------------------------------------------------------------------------------

def test_infer_writes_one_prediction_per_row_in_order(staged: dict[str, Path], one_rank_predictions) -> None:
    rows = one_rank_predictions
    assert [r["index"] for r in rows] == list(range(INFER_ROWS))
    # Conversations cut after the last user turn, generated text only (not the prompt again).
    assert all(r["input"][-1]["role"] == "user" for r in rows)
    assert all(isinstance(r["prediction"], str) for r in rows)
    run_dir = _run_dir(staged["infer"].with_name("infer-1rank.yaml"))
    assert not list(run_dir.glob("predictions.rank*.jsonl"))  # joined, then removed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows"] == INFER_ROWS and summary["predicted_rows"] == INFER_ROWS
    assert summary["rows_per_s"] > 0 and summary["world_size"] == 1


def test_two_ranks_give_the_same_rows_in_the_same_order(staged: dict[str, Path], one_rank_predictions) -> None:
    # 24 rows, 12 a rank: greedy tokens do not depend on which rows share a decode step.
    spec = _variant(staged["infer"], "infer-2ranks", resources={"gpus_per_node": 0, "procs_per_node": 2, "cpus_per_gpu": 1})
    _ok(_run(spec, staged["store"]))
    assert _lines(_run_dir(spec) / "predictions.jsonl") == one_rank_predictions
    assert json.loads((_run_dir(spec) / "summary.json").read_text())["world_size"] == 2


def test_infer_resumes_after_the_last_complete_line(staged: dict[str, Path], one_rank_predictions) -> None:
    spec = _variant(staged["infer"], "infer-resume", resources={"gpus_per_node": 0, "cpus_per_gpu": 1})
    run_dir = _run_dir(spec)
    run_dir.mkdir(parents=True)
    # What a killed rank leaves: 5 complete lines (marked, to tell kept from redone) and half a line.
    kept = [{**r, "prediction": "from the first run"} for r in one_rank_predictions[:5]]
    partial = "".join(json.dumps(r) + "\n" for r in kept) + json.dumps(one_rank_predictions[5])[:20]
    (run_dir / "predictions.rank0.jsonl").write_text(partial)
    _ok(_run(spec, staged["store"]))
    rows = _lines(run_dir / "predictions.jsonl")
    assert rows == kept + one_rank_predictions[5:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_rows"] == 5 and summary["predicted_rows"] == INFER_ROWS - 5

    # Run again: everything is there already, nothing is redone.
    out = _run(spec, staged["store"])
    _ok(out)
    assert "already holds all" in out.stdout
    assert _lines(run_dir / "predictions.jsonl") == rows


def test_the_engine_writes_what_the_pipeline_writes_and_logs_progress(staged: dict[str, Path], one_rank_predictions) -> None:
    # Greedy: the pipeline (batches of 8, left padding) and the engine give the same text for every row.
    spec = _variant(staged["infer"], "infer-pipeline", infer={**yaml.safe_load(staged["infer"].read_text())["infer"],
                                                              "engine": "pipeline"},
                    resources={"gpus_per_node": 0, "cpus_per_gpu": 1})
    _ok(_run(spec, staged["store"]))
    assert _lines(_run_dir(spec) / "predictions.jsonl") == one_rank_predictions
    assert json.loads((_run_dir(spec) / "summary.json").read_text())["engine"] == "pipeline"
    piped = _lines(_run_dir(spec) / "metrics.jsonl")[-1]  # rows counted; the pipeline's tokens are not
    assert piped["step"] == INFER_ROWS and piped["tokens_per_s"] is None and piped["rows_per_s"] > 0

    run_dir = _run_dir(staged["infer"].with_name("infer-1rank.yaml"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "generate" and summary["new_tokens"] > 0 and summary["first_row_s"] > 0
    # What `hfhpc status` reads: rows done of rows as step/max_steps, new tokens/s, seconds per row.
    last = _lines(run_dir / "metrics.jsonl")[-1]
    assert last["step"] == last["max_steps"] == INFER_ROWS and last["eta_s"] == 0
    assert last["new_tokens"] == summary["new_tokens"] and last["tokens_per_s"] > 0 and last["step_s"] > 0


def test_sampled_predictions_depend_on_the_seed_not_on_the_ranks(staged: dict[str, Path]) -> None:
    infer = {**yaml.safe_load(staged["infer"].read_text())["infer"], "do_sample": True, "temperature": 1.0}
    one = _variant(staged["infer"], "infer-sample-1", infer=infer, resources={"gpus_per_node": 0, "cpus_per_gpu": 1})
    two = _variant(staged["infer"], "infer-sample-2", infer=infer,
                   resources={"gpus_per_node": 0, "procs_per_node": 2, "cpus_per_gpu": 1})
    other = _variant(staged["infer"], "infer-sample-seed", infer={**infer, "seed": 1234},
                     resources={"gpus_per_node": 0, "cpus_per_gpu": 1})
    for spec in (one, two, other):
        _ok(_run(spec, staged["store"]))
    rows = _lines(_run_dir(one) / "predictions.jsonl")
    assert _lines(_run_dir(two) / "predictions.jsonl") == rows
    assert [r["prediction"] for r in _lines(_run_dir(other) / "predictions.jsonl")] != [r["prediction"] for r in rows]


def test_a_rank_file_keeps_only_its_exact_complete_prefix(tmp_path: Path) -> None:
    from hfhpc.recipes.infer import keep_complete_prefix

    part = tmp_path / "predictions.rank1.jsonl"
    lines = [json.dumps({"index": i, "prediction": "x"}) + "\n" for i in range(10, 20)]
    part.write_text("".join(lines[:4]) + lines[4][:7])  # killed while writing the fifth line
    assert keep_complete_prefix(part, 10, 12) == 4
    assert part.read_text() == "".join(lines[:4])
    # Written by a run with fewer ranks: it runs past this shard's 6 rows, so only 6 are kept.
    part.write_text("".join(lines))
    assert keep_complete_prefix(part, 10, 6) == 6 and part.read_text() == "".join(lines[:6])
    # Written by a run with more ranks: it starts elsewhere, nothing is this shard's.
    assert keep_complete_prefix(part, 0, 6) == 0 and part.read_text() == ""
    assert keep_complete_prefix(tmp_path / "missing.jsonl", 0, 6) == 0


# One long generation at a time (a pipeline batch of one; an engine of one row at once): the run
# lasts long enough to be interrupted mid-way.
ONE_AT_A_TIME = {"pipeline": {"engine": "pipeline", "batch_size": 1}, "engine": {"max_concurrent": 1}}


@pytest.mark.parametrize("path", ONE_AT_A_TIME)
def test_sigterm_stops_infer_with_exit_3_and_a_rerun_completes(staged: dict[str, Path], path: str) -> None:
    rows = 48
    spec = _variant(
        staged["infer"], f"infer-sigterm-{path}",
        dataset={**yaml.safe_load(staged["infer"].read_text())["dataset"], "max_samples": rows},
        infer={"task": "text-generation", "max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False,
               **ONE_AT_A_TIME[path]},
        resources={"gpus_per_node": 0, "cpus_per_gpu": 1},
    )
    part = _run_dir(spec) / "predictions.rank0.jsonl"
    out = _interrupt(spec, staged["store"], lambda: part.exists() and part.read_text().count("\n") >= 2)
    assert out.returncode == 3, out.stdout + out.stderr  # 3: stopped cleanly, run again to resume
    assert "run the same command again to resume" in out.stdout
    before = _lines(part)
    assert 2 <= len(before) < rows
    assert not (_run_dir(spec) / "predictions.jsonl").exists()

    _ok(_run(spec, staged["store"]))
    after = _lines(_run_dir(spec) / "predictions.jsonl")
    assert [r["index"] for r in after] == list(range(rows))  # no row twice, none missing
    assert after[: len(before)] == before


# -- evaluate ------------------------------------------------------------------------------------------

def test_evaluate_scores_a_predictions_file(staged: dict[str, Path]) -> None:
    spec = staged["score-file"]
    pairs = [("positive", "positive"), ("negative", "negative"), ("positive", "negative"), ("negative", "negative"),
             ("positive", "positive"), ("negative", "positive"), ("positive", "positive"), ("negative", "negative")]
    (spec.parent / "hand-made.jsonl").write_text(
        "".join(json.dumps({"index": i, "input": "…", "prediction": p, "reference": r}) + "\n" for i, (p, r) in enumerate(pairs))
    )
    _ok(_run(spec, staged["store"]))
    result = json.loads((_run_dir(spec) / "eval.json").read_text())
    assert result == {"accuracy": 0.75, "rows": 8}
    summary = json.loads((_run_dir(spec) / "summary.json").read_text())
    assert summary["metrics"] == {"accuracy": 0.75} and summary["predictions"].endswith("hand-made.jsonl")


def test_evaluate_runs_a_model_over_a_split_on_two_ranks(staged: dict[str, Path]) -> None:
    spec = staged["evaluate"]
    _ok(_run(spec, staged["store"]))
    result = json.loads((_run_dir(spec) / "eval.json").read_text())
    assert result["rows"] == 64 and 0.0 <= result["accuracy"] <= 1.0
    rows = _lines(_run_dir(spec) / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(64))  # both ranks' shards, gathered in order
    assert {r["reference"] for r in rows} == set(SENTIMENT_LABELS)
    # The untrained head's LABEL_0/LABEL_1 count as the dataset's class ids 0/1.
    hits = sum(SENTIMENT_LABELS[int(r["prediction"].removeprefix("LABEL_"))] == r["reference"] for r in rows)
    assert result["accuracy"] == hits / 64


# -- classify ------------------------------------------------------------------------------------------

def test_classify_fine_tunes_minilm_well_above_chance_across_a_stop(staged: dict[str, Path]) -> None:
    spec = staged["classify"]
    run_dir = _run_dir(spec)
    metrics = run_dir / "metrics.jsonl"
    # 2 epochs × 256 rows / 16 = 32 steps: stopped a quarter of the way, with a checkpoint.
    out = _interrupt(spec, staged["store"], lambda: metrics.exists() and '"step": 8,' in metrics.read_text())
    assert out.returncode == 3, out.stdout + out.stderr
    checkpoints = list(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and 8 <= int(checkpoints[0].name.split("-")[1]) < 32
    assert not (run_dir / "model").exists()

    _ok(_run(spec, staged["store"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(checkpoints[0]) and summary["steps"] == 32
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["rows"] == 64
    # Two balanced classes: chance is 0.5. The keyword-labelled reviews are learned to ≥ 0.9 in two epochs.
    assert result["accuracy"] >= 0.85, result

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records and records[-1]["step"] == 32

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert model.config.id2label == dict(enumerate(SENTIMENT_LABELS))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    logits = model(**tokenizer(["The film was wonderful.", "The meal was dreadful."], return_tensors="pt", padding=True)).logits
    assert logits.argmax(-1).tolist() == [1, 0]
