#!/usr/bin/env bash
# The benchmark table of docs/PERF.md: every policy on both synthetic shapes, one GPU run.
set -uo pipefail
OUT=${OUT:-/tmp/dtypeforge-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PATH=/usr/local/cuda/bin:$PATH DTYPEFORGE_CACHE=/tmp/dtypeforge-cache
cg() { python3 -c 'import sys; from codegen.cli import main; sys.exit(main())' "$@"; }
M=/tmp/models; mkdir -p $M
for s in smollm2-135m llama-3.2-1b; do [[ -f $M/$s/config.json ]] || cg synth-model --shape $s --out $M/$s >/dev/null; done
LAYOUT=${LAYOUT:-fused}
for s in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
  for pol in ${POLICIES:-f16 f32 f16-storage-f32-compute f16-resident bf16 fp8-e4m3-weights int8-weights}; do
    echo "== $s $pol $LAYOUT"; cg bench --model $M/$s --policy $pol --layout $LAYOUT ${COMPARE:+--compare $COMPARE} 2>&1 | grep -v "packing\|it/s\|__cudagraphs\|warnings.warn\|UserWarning"
  done
done | tee -a "$OUT/bench_all.log"
