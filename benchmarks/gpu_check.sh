#!/usr/bin/env bash
# Every method on CUDA (autocast, large batches: the engine's CUDA path) and on the CPU, on sample_data/brick and
# mpdd/metal_plate; prints each method's CUDA-vs-CPU speed-up and every failure. Sized for one H200 in 10 minutes:
# the CUDA runs go first, the CPU runs fill the rest of the budget (GPU_CHECK_BUDGET_S, default 540 s).
#
#   bash benchmarks/gpu_check.sh [extra args for benchmarks/gpu_check.py, e.g. --methods patchcore,stfpm]
#
# mpdd/metal_plate is looked for in $ADLAB_DATA, ../shared/data, then benchmarks/out/data (git-ignored; to take it
# to a machine without the shared folder: mkdir -p benchmarks/out/data && cp -r ../shared/data/mpdd
# benchmarks/out/data/, then carry benchmarks/out/data). Python: $PYTHON, else .venv/bin/python, else python3; it
# needs the project installed (pip install -e .). Fails loudly (exit 2) when CUDA is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import engine.runner" 2>/dev/null; then
  echo "gpu_check: cannot import the engine with $PY; install the project first (pip install -e .)" >&2
  "$PY" -c "import engine.runner" || true
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: FAILED: CUDA is not available (torch.cuda.is_available() is False); nothing was run." >&2
  command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || echo "gpu_check: no nvidia-smi on PATH" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py --budget-s "${GPU_CHECK_BUDGET_S:-540}" "$@"
