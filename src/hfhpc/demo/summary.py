"""What ``make demo`` prints at the end: where each run put its model, numbers and files.

``python -m hfhpc.demo.summary RUNS_DIR [--times FILE]`` reads the run folders that the demo specs
write (``demo-sft``, ``demo-dpo``, ``demo-classify``, ``demo-infer``, ``demo-evaluate``) and prints one short block.
``--times`` names a file of ``<stage>\\t<seconds>`` lines (what ``scripts/demo.sh`` records), printed
as one line of timings. Only the standard library is imported: this runs after every recipe, and a
user waits for it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

SFT, DPO, CLASSIFY, INFER, EVALUATE = "demo-sft", "demo-dpo", "demo-classify", "demo-infer", "demo-evaluate"


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def results(runs: Path) -> list[tuple[str, str, str]]:
    """``(run, what, value)`` for each result of the demo runs found under ``runs``."""
    rows: list[tuple[str, str, str]] = []
    sft = runs / SFT
    if (sft / "model").is_dir():
        rows.append(("SFT", "model", _show(sft / "model")))
        train = ""
        losses = [r["loss"] for r in _jsonl(sft / "metrics.jsonl") if "loss" in r] if (sft / "metrics.jsonl").is_file() else []
        if losses:
            train = f"train loss {losses[0]:.2f} -> {losses[-1]:.2f} in {_json(sft / 'summary.json').get('steps')} steps"
        if (sft / "eval.json").is_file():
            ev = _json(sft / "eval.json")
            scores = [f"{label} {ev[key]:.2f}" for key, label in
                      (("eval_loss", "loss"), ("eval_mean_token_accuracy", "token accuracy")) if key in ev]
            rows.append(("", "eval", ", ".join(scores) + (f" ({train})" if train else "")))
        elif train:
            rows.append(("", "train", train))
    if (sft / "report.html").is_file():
        rows.append(("SFT" if not rows else "", "report", _show(sft / "report.html")))

    rows += _dpo(runs / DPO)

    classify = runs / CLASSIFY
    if (classify / "model").is_dir():
        rows.append(("classify", "model", _show(classify / "model")))
        if (classify / "eval.json").is_file():
            ev = _json(classify / "eval.json")
            rows.append(("", "eval", f"accuracy {ev['accuracy']:.3f} on {ev['rows']} held-out reviews "
                                     f"({_show(classify / 'eval.json')})"))

    infer = runs / INFER
    if (infer / "predictions.jsonl").is_file():
        n = len(_jsonl(infer / "predictions.jsonl"))
        rows.append(("infer", "predictions", f"{_show(infer / 'predictions.jsonl')} "
                                             f"({n} rows in input order; an untrained model's, so noise)"))

    evaluate = runs / EVALUATE
    if (evaluate / "eval.json").is_file():
        ev = _json(evaluate / "eval.json")
        rows.append(("evaluate", "eval", f"accuracy {ev['accuracy']:.3f} on {ev['rows']} reviews, about chance: "
                                         f"MiniLM's head is untrained ({_show(evaluate / 'eval.json')})"))
        if (evaluate / "predictions.jsonl").is_file():
            rows.append(("", "predictions", _show(evaluate / "predictions.jsonl")))
    return rows


def _dpo(run: Path) -> list[tuple[str, str, str]]:
    """The DPO run: its model, and whether the held-out reward accuracy rose above chance (0.5: a model
    that cannot tell chosen from rejected is right half the time; before training every reward is 0)."""
    rows: list[tuple[str, str, str]] = []
    if not (run / "model").is_dir():
        return rows
    rows.append(("DPO", "model", _show(run / "model")))
    if (run / "eval.json").is_file():
        ev = _json(run / "eval.json")
        accuracy = ev.get("reward_accuracy")
        if accuracy is not None:
            verdict = "above chance (0.5)" if accuracy > 0.5 else "NOT above chance (0.5)"
            margin = ev.get("eval_rewards/margins")
            rows.append(("", "eval", f"reward accuracy {accuracy:.3f} on {ev.get('pairs')} held-out pairs, {verdict}"
                                     + (f"; margin {margin:.2f}" if margin is not None else "")
                                     + f" ({_show(run / 'eval.json')})"))
    if (run / "report.html").is_file():
        rows.append(("", "report", _show(run / "report.html")))
    return rows


def timings(path: Path) -> list[tuple[str, float]]:
    """The ``<stage>\\t<seconds>`` lines of ``path``; a stage recorded several times is summed."""
    total: dict[str, float] = {}
    for line in path.read_text().splitlines():
        stage, _, seconds = line.partition("\t")
        if stage and seconds:
            total[stage] = total.get(stage, 0.0) + float(seconds)
    return list(total.items())


def render(runs: Path, times: Path | None = None) -> str:
    rows = results(runs)
    lines = []
    if rows:
        run_width = max(len(run) for run, _, _ in rows)
        what_width = max(len(what) for _, what, _ in rows)
        for run, what, value in rows:
            lines.append(f"  {run:<{run_width}}  {what:<{what_width}}  {value}")
    else:
        lines.append(f"  no results under {_show(runs)}")
    if times is not None and times.is_file():
        stages = timings(times)
        if stages:
            lines.append("")
            lines.append(f"  time: {_duration(sum(s for _, s in stages))} in all; "
                         + ", ".join(f"{name} {_duration(s)}" for name, s in stages))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hfhpc.demo.summary",
                                     description="Print where the demo runs put their results.")
    parser.add_argument("runs", type=Path, help="the folder holding the demo run folders")
    parser.add_argument("--times", type=Path, default=None, help="file of '<stage>\\t<seconds>' lines")
    args = parser.parse_args(argv)
    print(render(args.runs, args.times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
