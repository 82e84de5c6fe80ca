#!/usr/bin/env bash
# One GPU check, under 5 minutes on one GPU: the encode feed with a do-nothing model, the encoders users
# run most (fp32 / bf16, with and without --compile), and predict on a generated slide; each with the
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
# resnet50-trunc and uni (ViT-L/16) at fp32/bf16, eager and compiled; virchow2 (ViT-H/14) and h-optimus-0
# (ViT-g/14) at bf16 only (their random weights alone take tens of seconds to write and load).
runs="resnet50-trunc:fp32: resnet50-trunc:fp32:--compile resnet50-trunc:bf16: resnet50-trunc:bf16:--compile
      uni:fp32: uni:bf16: uni:bf16:--compile virchow2:bf16: virchow2:bf16:--compile h-optimus-0:bf16: h-optimus-0:bf16:--compile"
for run in $runs; do
  IFS=: read -r enc prec comp <<<"$run"
  if [ "$SECONDS" -gt "${BUDGET_S:-230}" ]; then echo "== encode $enc $prec ${comp:-eager}: skipped (the 5-minute budget)"; continue; fi
  echo "== encode $enc $prec ${comp:-eager}"
  STEP_TIMEOUT=60 sample "$PY" benchmarks/bench_encode.py --encoder "$enc" --device cuda --precision "$prec" $comp \
    --tiles 2048 --batch-size 128 --repeats 1
done
echo "== predict on a generated slide (file -> prediction vs tile + encode + classify predict)"
STEP_TIMEOUT=150 sample "$PY" benchmarks/bench_predict.py --size 20000 --repeat 1
rm -f "$UTIL"
