#!/usr/bin/env bash
# The main job on the bundled tiny example, as a user on a login node would run it:
# a local upstream (what the Hub would be), `hfhpc stage`, `hfhpc check`, then the lockfile.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-demo}
SPEC=examples/demo/sft.yaml
mkdir -p "$DEMO"

echo "== building the tiny example repos into $DEMO/upstream"
python -m hfhpc.demo.build "$DEMO/upstream" >/dev/null

echo "== serving them as a Hub-compatible endpoint (hfhpc serve)"
hfhpc --store "$DEMO/upstream" serve --port 0 >"$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q '^serving' "$DEMO/serve.log" && break; sleep 0.1; done
export HF_ENDPOINT=$(sed -n 's/^serving .* at //p' "$DEMO/serve.log")
[ -n "$HF_ENDPOINT" ] || { cat "$DEMO/serve.log"; exit 1; }

export HFHPC_STORE=$PWD/$DEMO/store
echo "== hfhpc stage $SPEC   (HF_ENDPOINT=$HF_ENDPOINT)"
hfhpc stage --quiet "$SPEC"
echo "== hfhpc check $SPEC   (network sealed)"
hfhpc check "$SPEC"
echo "== the lockfile: examples/demo/sft.lock"
python - <<'PY'
import json
lock = json.load(open("examples/demo/sft.lock"))
for a in lock["assets"]:
    print(f"  {a['kind']:<7} {a['id']}@{a['revision']} = {a['commit']}  ({len(a['files'])} files)")
PY
echo "store: $HFHPC_STORE"
