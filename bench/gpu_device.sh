#!/usr/bin/env bash
# One command for a lent GPU machine (one H100 or H200, about 8 minutes): bench/gpu_device.py's sections, one
# results file. The machine has torch, transformers and safetensors but no diffusers and no network: run
# `make device-wheels` here first (it fills .device/wheels, gitignored, from PyPI) and carry .device there.
#   there: bash bench/gpu_device.sh          -> bench/results/gpu-device-<gpu>.json, and a copy in $OUT when set
#   here:  bash bench/gpu_device.sh --tiny   -> every section on CPU with small shapes (tests/test_bench_gpu_device.py)
# PYTHON picks the interpreter (default python3); other arguments go to bench/gpu_device.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.device/wheels/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_device.sh: diffusers is not installed and .device/wheels holds no wheel; run 'make device-wheels'" \
      "where there is a network and carry .device" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}"
fi
PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_device.py "$@"
