# Sourced by the gpu_*.sh scripts on the GPU machine: the wheels of .whl/ installed once into
# /tmp/site (packages the GPU machine lacks), PYTHONPATH set to them and this
# checkout, and the versions and card printed. Expects OUT (the output folder).
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
