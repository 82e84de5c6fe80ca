#!/usr/bin/env bash
# One GPU check, under 5 minutes on one GPU: the encode feed with a do-nothing model, `wsienc encode` of a
# generated store with resnet50-trunc and a ViT-L (uni, random weights) at bf16 against their bare forward, the
# encoders users run most (fp32 / bf16, with and without --compile), and predict on a generated slide; each with the
# device, the library versions and the GPU utilisation sampled by nvidia-smi while it runs.
# Without CUDA it says so in one line and exits 0.
#
#   bash benchmarks/gpu_check.sh            (from the repository root; uses .venv/bin/python when present)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to measure"
  exit 0
fi
"$PY" - <<'PYEOF'
import platform, torch, timm, numpy, zarr
print(f"device {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"torch {torch.__version__}, timm {timm.__version__}, numpy {numpy.__version__}, zarr {zarr.__version__}, "
      f"python {platform.python_version()}, {__import__('os').cpu_count()} CPUs")
PYEOF
UTIL=$(mktemp)
sample() {  # GPU utilisation every 0.5 s while "$@" runs; prints mean / max
  : >"$UTIL"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >"$UTIL" 2>/dev/null &
    SMI=$!
  fi
  timeout "${STEP_TIMEOUT:-120}" "$@"; rc=$?
  [ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null && wait "$SMI" 2>/dev/null
  awk '{s+=$1; if ($1>m) m=$1; n++} END {if (n) printf "  GPU utilisation: mean %.0f%%, max %d%% (%d samples)\n", s/n, m, n; else print "  GPU utilisation: not sampled (no nvidia-smi)"}' "$UTIL"
  [ $rc -eq 0 ] || echo "  (step exited $rc)"
}
echo "== null feed (encode with a do-nothing model; JPEG-decode bound of the same tiles)"
sample "$PY" benchmarks/bench_encode.py --null --device cuda --tiles 16384 --batch-size 256 --repeats 1 --workers 1,2,4
echo "== wsienc encode of a generated store at bf16 (pipeline vs the bare forward on device-resident batches)"
STEP_TIMEOUT=100 sample "$PY" benchmarks/bench_encode.py --encoder resnet50-trunc,uni --precision bf16 --device cuda \
  --tiles 4096 --batch-size 256 --repeats 1
# resnet50-trunc, uni (ViT-L/16), virchow2 (ViT-H/14) and h-optimus-0 (ViT-g/14) at fp32/bf16, eager and compiled:
# one process (bench_encode --gpu-suite: random values built on the GPU, no weight files), eager configurations
# first; those that would start after the budget are listed as skipped.
suite_budget=$(( ${BUDGET_S:-230} - SECONDS )); [ "$suite_budget" -lt 60 ] && suite_budget=60
echo "== encoders: tiles/s of the model forward (bench_encode --gpu-suite, budget ${suite_budget} s)"
STEP_TIMEOUT=$(( suite_budget + 120 )) sample "$PY" benchmarks/bench_encode.py --gpu-suite --device cuda \
  --budget-s "$suite_budget" --config-seconds 6
echo "== predict on a generated slide (file -> prediction vs tile + encode + classify predict)"
STEP_TIMEOUT=150 sample "$PY" benchmarks/bench_predict.py --size 20000 --repeat 1
rm -f "$UTIL"
