#!/usr/bin/env bash
# The main job on the bundled tiny example, as a user would run it, with no SLURM and no internet:
# a local upstream stands in for the Hub; `hfhpc stage` on the "login node", `hfhpc check` with the
# network sealed, then `hfhpc run` of each recipe: fine-tune a chat model (SFT), fine-tune and score
# a classifier with an Evaluate metric, batch inference; finally the report of the SFT run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-demo}
SPECS=(examples/demo/sft.yaml examples/demo/classify.yaml examples/demo/infer.yaml)
mkdir -p "$DEMO"
step() { printf '\n== %s\n' "$*"; }

step "building the tiny example repos into $DEMO/upstream (a chat model, chat data, reviews, a metric)"
python -m hfhpc.demo.build "$DEMO/upstream" >/dev/null

step "serving them as a Hub-compatible endpoint: hfhpc serve"
hfhpc --store "$DEMO/upstream" serve --port 0 >"$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^serving' "$DEMO/serve.log" && break; sleep 0.1; done
export HF_ENDPOINT=$(sed -n 's/^serving .* at //p' "$DEMO/serve.log")
[ -n "$HF_ENDPOINT" ] || { cat "$DEMO/serve.log"; exit 1; }

export HFHPC_STORE=$PWD/$DEMO/store
for spec in "${SPECS[@]}"; do
  step "hfhpc stage $spec"
  hfhpc stage --quiet "$spec"
done
# What a compute node sees: no endpoint at all.
unset HF_ENDPOINT
kill $SERVER 2>/dev/null || true
for spec in "${SPECS[@]}"; do
  step "hfhpc check $spec   (network sealed)"
  hfhpc check "$spec"
done
for spec in "${SPECS[@]}"; do
  step "hfhpc run $spec"
  hfhpc run "$spec"
done

RUNS=$DEMO/runs
step "results"
python - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
sft = [json.loads(l) for l in (runs / "demo-sft" / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in sft if "loss" in r]
print(f"SFT:      loss {losses[0]:.2f} -> {losses[-1]:.2f} in {sft[-1]['step']} steps; model in {runs / 'demo-sft' / 'model'}")
ev = json.loads((runs / "demo-classify" / "eval.json").read_text())
acc = ev.get("eval_accuracy", ev.get("accuracy"))
print(f"classify: accuracy {acc:.3f} (Evaluate's accuracy metric); model in {runs / 'demo-classify' / 'model'}")
preds = (runs / "demo-infer" / "predictions.jsonl").read_text().splitlines()
print(f"infer:    {len(preds)} predictions in {runs / 'demo-infer' / 'predictions.jsonl'}")
PY
if hfhpc report --help >/dev/null 2>&1; then
  hfhpc report "$RUNS/demo-sft" >/dev/null
  echo "report:   $RUNS/demo-sft/report.html"
fi
echo "store:    $HFHPC_STORE"
