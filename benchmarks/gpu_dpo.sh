#!/usr/bin/env bash
# DPO throughput on the GPU machine: TRL's DPOTrainer with its defaults and hfhpc's dpo recipe in the
# same call, on the same card. Usage: bash benchmarks/gpu_dpo.sh OUT [SHAPE] [VARIANT...] where VARIANT
# is a name from the table below (default: trl hfhpc). Wheels for packages missing there go in .whl/.
set -uo pipefail
OUT=${1:?output folder}; SHAPE=${2:-1b}; shift 2 || shift $#
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(trl hfhpc)
STEPS=${STEPS:-20}  # optimizer steps per run; the median skips the first 4
SEQ=${SEQ:-1024}    # max_length (DPOConfig's default)
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ ! -e /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    touch /tmp/site/.installed
  fi
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
else
  export PYTHONPATH=$PWD/src:$PWD/benchmarks
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python3 - <<'PY'
import inspect, torch, transformers, trl
from torch.nn.attention import varlen
print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__,
      torch.cuda.get_device_name(), "x", torch.cuda.device_count())
print("varlen_attn", inspect.signature(varlen.varlen_attn))
PY
B=/tmp/bench-dpo
python3 benchmarks/bench_dpo.py build --shape "$SHAPE" --dir $B --seq "$SEQ" || exit 1
trl_() { timeout 400 python3 benchmarks/bench_dpo.py trl --shape "$SHAPE" --dir $B --seq "$SEQ" --steps "$STEPS" --out "$OUT" "$@"; }
STOP=${STOP_AFTER:+--stop-after $STOP_AFTER}  # end hfhpc's jobs after this many steps (no final save)
hfhpc() { timeout 500 python3 benchmarks/bench_dpo.py hfhpc --shape "$SHAPE" --dir $B --seq "$SEQ" --steps "$STEPS" --out "$OUT" $STOP "$@"; }
for v in "${VARIANTS[@]}"; do
  echo "=== $v $(date +%T)"
  case $v in
    trl)             trl_ --tag defaults ;;                                  # DPOTrainer's defaults (activation checkpointing on)
    trl-nockpt)      trl_ --tag nockpt --train gradient_checkpointing=false ;;
    hfhpc)           hfhpc --tag nockpt --train torch_compile=true ;;        # compiled from the first step, as the defaults do for a long job
    hfhpc-ckpt)      hfhpc --tag ckpt --ckpt --train torch_compile=true ;;                              # as TRL's defaults: activation checkpointing
    hfhpc-padded)    hfhpc --tag padded-nockpt --train padding_free=false --train torch_compile=true ;; # compiled layers, padded batches
    hfhpc-nocompile) hfhpc --tag nocompile-nockpt --train torch_compile=false ;;  # packed, not compiled
    hfhpc-warm)      hfhpc --tag nockpt-warm --compile-cache store --train torch_compile=true ;;        # a new node; the kernels an earlier job kept
    *) echo "unknown variant $v" ;;
  esac
done
echo "=== done $(date +%T)"
