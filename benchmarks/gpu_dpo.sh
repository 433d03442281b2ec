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
source "$(dirname "$0")/gpu_env.sh"
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
