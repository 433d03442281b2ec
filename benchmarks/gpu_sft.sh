#!/usr/bin/env bash
# SFT throughput on the GPU machine: the page's recipe (seed_sft_baseline.py) and hfhpc's sft
# recipe in the same call, on the same card. Usage: bash benchmarks/gpu_sft.sh OUT SHAPE GPUS [VARIANT...]
# where VARIANT is a name from the table below. Wheels for packages missing there go in .whl/.
set -uo pipefail
OUT=${1:?output folder}; SHAPE=${2:-1b}; GPUS=${3:-1}; shift 3 || true
VARIANTS=("$@")
STEPS=${STEPS:-20}  # optimizer steps per run; the median step time skips the first 4
# Lanes: several calls can share one machine, each given its GPUs in CUDA_VISIBLE_DEVICES (and no
# VARIANT on the first, which only installs, prints versions and builds the model and data).
source "$(dirname "$0")/gpu_env.sh"
B=/tmp/bench
python3 benchmarks/bench_sft.py build --shape "$SHAPE" --dir $B || exit 1
seed() {  # the page's recipe
  if [ "$GPUS" -gt 1 ]; then
    timeout 500 accelerate launch --num_processes "$GPUS" --use_fsdp --fsdp_sharding_strategy FULL_SHARD \
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap MistralDecoderLayer \
      --fsdp_state_dict_type SHARDED_STATE_DICT --fsdp_use_orig_params true --mixed_precision bf16 \
      benchmarks/seed_sft_baseline.py --shape "$SHAPE" --steps "$STEPS" --out "$OUT" "$@"
  else
    timeout 400 python3 benchmarks/seed_sft_baseline.py --shape "$SHAPE" --steps "$STEPS" --out "$OUT" "$@"
  fi
}
STOP=${STOP_AFTER:+--stop-after $STOP_AFTER}  # end hfhpc's jobs after this many steps (no final save)
hfhpc() { timeout 500 python3 benchmarks/bench_sft.py run --shape "$SHAPE" --gpus "$GPUS" --steps "$STEPS" --dir $B --out "$OUT" $STOP "$@"; }
for v in "${VARIANTS[@]}"; do
  echo "=== $v $(date +%T)"
  case $v in
    seed)          seed ;;
    seed-nockpt)   seed --no-ckpt ;;
    seed-lora)     seed --lora 16 ;;                          # TRL + peft defaults, rank 16 on all linear layers
    hfhpc)         hfhpc --tag nockpt ;;                      # the recipe's defaults (a short job: stays eager)
    hfhpc-long)    hfhpc --tag nockpt-long --steps 5000 --stop-after 24 ;;  # defaults, a long job: compiles after step 2
    hfhpc-long-warm) hfhpc --tag nockpt-long-warm --steps 5000 --stop-after 24 --compile-cache store ;;  # a new node, the store's kernels
    hfhpc-compiled) hfhpc --tag compiled-nockpt --train torch_compile=true ;;  # compiled before the first step, cold
    hfhpc-compiled-warm) hfhpc --tag compiled-nockpt-warm --train torch_compile=true --compile-cache store \
                     --env HFHPC_PROFILE_STEPS=14-16 ;;  # and where a step's time goes (logs/profile-rank0.txt)
    hfhpc-lora)    hfhpc --tag lora16-ckpt --ckpt --train "lora={r: 16, lora_alpha: 32}" --train torch_compile=true ;;
    hfhpc-lora-keep*) hfhpc --tag "lora16-ckpt-keep${v#hfhpc-lora-keep}" --ckpt --train "lora={r: 16, lora_alpha: 32}" \
                     --train torch_compile=true --launch "keep_activations=${v#hfhpc-lora-keep}" ;;
    hfhpc-lora-eager) hfhpc --tag lora16-ckpt-eager --ckpt --train "lora={r: 16, lora_alpha: 32}" --train torch_compile=false ;;
    hfhpc-ckpt)    hfhpc --tag ckpt --ckpt ;;                 # defaults + activation checkpointing
    hfhpc-sdpa)    hfhpc --tag sdpa-nockpt --attention sdpa ;;
    hfhpc-nocompile) hfhpc --tag nocompile-nockpt --train torch_compile=false ;;
    hfhpc-ckpt-nocompile) hfhpc --tag nocompile-ckpt --ckpt --train torch_compile=false ;;
    hfhpc-fsdp1)   hfhpc --tag fsdp1-ckpt --ckpt --launch fsdp_version=1 ;;
    hfhpc-warm)    hfhpc --tag ckpt-warm --ckpt --compile-cache store ;;  # a new node; the kernels an earlier job kept in the store
    hfhpc-bs16)    hfhpc --tag ckpt-bs16 --ckpt --bs 16 ;;
    hfhpc-keep*)   hfhpc --tag "ckpt-keep${v#hfhpc-keep}" --ckpt --launch "keep_activations=${v#hfhpc-keep}" ;;  # hfhpc-keep6 …
    *) echo "unknown variant $v" ;;
  esac
done
echo "=== done $(date +%T)"
