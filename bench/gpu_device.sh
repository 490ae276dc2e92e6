#!/usr/bin/env bash
# One-shot GPU run for a lent device machine (see bench/gpu.py). The machine has torch, transformers and
# safetensors but no diffusers and no network: the wheels travel in .device/wheels (carry it), made here with
#   pip download --no-deps -d .device/wheels diffusers==0.42.1 importlib_metadata
# Usage there: bash bench/gpu_device.sh   (writes into $OUT when set, else bench/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl 2>&1 | tail -3
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "$out/gpu.json" --budget-s "${BENCH_BUDGET_S:-420}" "$@" 2>&1 | tee "$out/gpu-log.txt"
