#!/usr/bin/env bash
# Everything that needs the GPU, in one run (device tool): install PyCUDA from .whl/, run the GPU
# tests, then benchmarks. Logs go to $OUT (the device tool brings them back); commit what matters
# to docs/gpu.md and docs/benchmarks.md.
#   usage: tools/gpu_check.sh [tests|bench|all] [extra pytest args...]
set -uo pipefail
what=${1:-all}; shift || true
source "$(dirname "$0")/gpu_env.sh"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1;
  python3 -c 'import pycuda, numpy; print("pycuda", pycuda.VERSION_TEXT, "numpy", numpy.__version__)'; } 2>&1 | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  OUT=$OUT "$(dirname "$0")/gpu_bench_all.sh"
fi
