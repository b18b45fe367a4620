#!/usr/bin/env bash
# The prepared device check of issue [1/5]: `pytest -m cuda`, then the GPU benchmark, in one go.
# On a GPU machine with torch installed (no pip needed; pytest for the tests; torchvision optional), from the root:
#     OUT=/some/folder bash benchmarks/gpu_check.sh
# Writes cuda_tests.log, gpu.json and gpu.log into $OUT (default benchmarks/results); commit gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/cuda_tests.log"
timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$out/cuda_tests.log"
timeout 240 python3 -m benchmarks.bench_gpu --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
timeout 60 python3 -m benchmarks.bench_srlayers --device cuda --out "$out/srlayers_cuda.json" 2>&1 | tee -a "$out/gpu.log"
