#!/usr/bin/env bash
# Generation on the GPU machine, one call: the engine's GPU tests, then benchmarks/bench_infer.py
# (hfhpc infer defaults first; the slower paths only if it ran). Usage: bash benchmarks/gpu_infer.sh OUT [SRC]
# where SRC holds src/, benchmarks/ and tests/ (default: this checkout). Wheels for packages missing
# there go in .whl/. BENCH_ARGS replaces bench_infer.py's default arguments here, "--levers --profile"
# (the engine alone under each lever, then a kernel profile of prefill and decode).
set -uo pipefail
OUT=${1:?output folder}; SRC=${2:-$PWD}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -e /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$SRC/src:$SRC/benchmarks:$SRC PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
(cd "$SRC" && timeout 240 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_gpu_generate.py) 2>&1 | tee "$OUT/gpu_tests.log"
B=/tmp/bench
python3 "$SRC/benchmarks/bench_infer.py" --dir $B --out "$OUT/infer_1b_h200.json" --stop-below 5000 ${BENCH_ARGS:---levers --profile} 2>&1 | tee "$OUT/bench.log"
