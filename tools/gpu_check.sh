#!/usr/bin/env bash
# Everything that needs the GPU, in one run (device tool): install PyCUDA from .whl/, run the GPU
# tests, then benchmarks. Logs go to $OUT (the device tool brings them back); commit what matters
# to docs/gpu.md and docs/PERF.md.
#   usage: tools/gpu_check.sh [tests|bench|all] [extra pytest args...]
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/dtypeforge-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/usr/local/cuda/bin:$PATH DTYPEFORGE_CACHE=/tmp/dtypeforge-cache
cg() { python3 -c 'import sys; from codegen.cli import main; sys.exit(main())' "$@"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1;
  python3 -c 'import pycuda, numpy; print("pycuda", pycuda.VERSION_TEXT, "numpy", numpy.__version__)'; } 2>&1 | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  M=/tmp/models; mkdir -p $M
  for shape in smollm2-135m llama-3.2-1b; do
    [[ -f $M/$shape/config.json ]] || cg synth-model --shape $shape --out $M/$shape >/dev/null
  done
  for pol in f16 f32 f16-storage-f32-compute f16-resident bf16 fp8-e4m3-weights int8-weights; do
    for shape in smollm2-135m llama-3.2-1b; do
      echo "== $shape $pol"; cg bench --model $M/$shape --policy $pol --tokens 128 2>/dev/null
    done
  done 2>&1 | tee "$OUT/bench.log"
fi
