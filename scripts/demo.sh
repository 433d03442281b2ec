#!/usr/bin/env bash
# The main job on the bundled tiny example, as a user would run it, with no GPU, SLURM or internet:
# a local upstream stands in for the Hub; `hfhpc stage` on the "login node", `hfhpc check` with the
# network sealed, then `hfhpc run` of each recipe: fine-tune a chat model (SFT), preference-tune the
# SFT run's model (DPO, a second spec whose `model: {from_run: …}` names the SFT run: staged and
# checked once that run has finished), fine-tune and score a classifier with an Evaluate metric,
# batch inference, scoring a model on a split; finally the reports of the SFT and DPO runs and where
# everything is.
#
# Everything goes under $DEMO_DIR (default: demo/). The specs are examples/demo/*.yaml, copied to
# $DEMO_DIR/specs/ with output_dir (and from_run) pointing at $DEMO_DIR/runs/, so that lockfiles and
# runs stay there.
# Each command's whole output is in $DEMO_DIR/logs/; the screen shows a few lines of each.
# Runs start afresh every time; the store is kept (staging it again is a no-op).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-demo}
RECIPES=(sft dpo classify infer evaluate)
# Starts from the SFT run's model: staged and checked after that run, just before its own.
CHAINED=dpo
declare -A WHAT=(
  [sft]="fine-tune the tiny chat model on chat data (TRL SFT)"
  [dpo]="preference-tune the SFT run's model on chosen/rejected pairs (TRL DPO; model: {from_run: …/demo-sft})"
  [classify]="fine-tune MiniLM as a sentiment classifier, scored with Evaluate's accuracy"
  [infer]="batch generation with the chat model, one prediction per row"
  [evaluate]="score MiniLM on the test reviews, two CPU ranks"
)

mkdir -p "$DEMO"
rm -rf "$DEMO/runs" "$DEMO/logs" "$DEMO/specs"
mkdir -p "$DEMO/logs" "$DEMO/specs"
LOGS=$DEMO/logs
TIMES=$LOGS/times.tsv
STORE=$(cd "$DEMO" && pwd)/store
export HFHPC_STORE=$STORE
# Output goes to log files: no progress bars in them; lines as they are written.
export HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1

seconds() { awk -v a="$1" -v b="$2" 'BEGIN { s = b - a; printf(s < 10 ? "(%.1f s)" : "(%.0f s)", s) }'; }

# run STAGE LOG PATTERN CMD...: print CMD, run it with its output in LOG, then print its time and the
# lines of LOG that match PATTERN. On failure, print the end of LOG and stop.
run() {
  local stage=$1 log=$2 pattern=$3 t0 t1 rc=0
  shift 3
  printf '   $ %s  ' "$*"
  t0=$EPOCHREALTIME
  "$@" >"$log" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  printf '%s\t%s\n' "$stage" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" >>"$TIMES"
  if [ "$rc" -ne 0 ]; then
    printf 'FAILED (exit %s)\n' "$rc"
    tail -n 25 "$log" | sed 's/^/     | /'
    printf '\ndemo: `%s` failed (exit %s); the end of its output is above, all of it in %s\n' "$*" "$rc" "$log" >&2
    exit "$rc"
  fi
  seconds "$t0" "$t1"
  echo
  if [ -n "$pattern" ]; then
    grep -E "$pattern" "$log" | sed 's/^/     /' || true
  fi
}

echo "hfhpc demo: the bundled tiny example staged, checked and run on this machine, in $DEMO/"
echo "(full output of every command in $LOGS/)"

echo
echo "1. build the example repos: a tiny chat model, chat data, preference pairs, reviews, the accuracy metric, MiniLM"
run build "$LOGS/build.log" '' python -m hfhpc.demo.build "$DEMO/upstream"

echo
echo "2. serve them as a stand-in for the Hub"
printf '   $ hfhpc --store %s serve --port 0 &  ' "$DEMO/upstream"
hfhpc --store "$DEMO/upstream" serve --port 0 >"$LOGS/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q '^serving' "$LOGS/serve.log" && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.05
done
HF_ENDPOINT=$(sed -n 's/^serving .* at //p' "$LOGS/serve.log")
if [ -z "$HF_ENDPOINT" ]; then
  echo
  cat "$LOGS/serve.log" >&2
  echo "demo: hfhpc serve did not start within 30 s; its output is above (and in $LOGS/serve.log)" >&2
  exit 1
fi
export HF_ENDPOINT
echo "(at $HF_ENDPOINT)"

for recipe in "${RECIPES[@]}"; do
  name=$(sed -n 's/^name: *//p' "examples/demo/$recipe.yaml")
  sed -e "s#^output_dir: .*#output_dir: ../runs/$name#" -e "s#from_run: \.\./\.\./demo/runs/#from_run: ../runs/#" \
    "examples/demo/$recipe.yaml" >"$DEMO/specs/$recipe.yaml"
done

echo
echo "3. stage each spec into the store $DEMO/store, pinning commits in a lockfile (the login-node step;"
echo "   the DPO spec's model is the SFT run's output: it is staged in step 5, once that run has finished)"
for recipe in "${RECIPES[@]}"; do
  [ "$recipe" = "$CHAINED" ] && continue
  run stage "$LOGS/stage-$recipe.log" '^(model|dataset|metric) ' hfhpc stage --quiet "$DEMO/specs/$recipe.yaml"
done

# What a compute node sees: no endpoint at all. The stand-in stays up for the DPO spec's stage (the
# login node's side), which names it in its own environment.
ENDPOINT=$HF_ENDPOINT
unset HF_ENDPOINT

echo
echo "4. check each spec with the network sealed: every asset loads offline"
for recipe in "${RECIPES[@]}"; do
  [ "$recipe" = "$CHAINED" ] && continue
  run check "$LOGS/check-$recipe.log" '^ready' hfhpc check "$DEMO/specs/$recipe.yaml"
done

echo
echo "5. run each recipe here, sealed and offline (the DPO spec is staged and checked first: its model is the SFT run's)"
for recipe in "${RECIPES[@]}"; do
  echo "   ${WHAT[$recipe]}:"
  if [ "$recipe" = "$CHAINED" ]; then
    run stage "$LOGS/stage-$recipe.log" '^(model|dataset) ' env HF_ENDPOINT="$ENDPOINT" hfhpc stage --quiet "$DEMO/specs/$recipe.yaml"
    run check "$LOGS/check-$recipe.log" '^ready' hfhpc check "$DEMO/specs/$recipe.yaml"
  fi
  run "$recipe" "$LOGS/run-$recipe.log" '^hfhpc: (done|[0-9]+ labels|text-generation with|text-classification with)' \
    hfhpc run "$DEMO/specs/$recipe.yaml"
done

kill $SERVER 2>/dev/null || true

echo
echo "6. reports of the SFT and DPO runs: plots and a one-page HTML each"
run report "$LOGS/report.log" '' hfhpc report "$DEMO/runs/demo-sft"
run report "$LOGS/report-dpo.log" '' hfhpc report "$DEMO/runs/demo-dpo"

echo
echo "Results"
python -m hfhpc.demo.summary "$DEMO/runs" --times "$TIMES"
echo
echo "Next: open $DEMO/runs/demo-sft/report.html in a browser;"
echo "      \`hfhpc --store $DEMO/store submit --dry-run $DEMO/specs/sft.yaml\` prints the SLURM job it would submit."
