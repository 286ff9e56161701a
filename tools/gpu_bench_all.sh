#!/usr/bin/env bash
# The benchmark tables of docs/benchmarks.md: every policy on both synthetic shapes, one GPU run.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
synth ${SHAPES:-smollm2-135m llama-3.2-1b}
LAYOUT=${LAYOUT:-fused}
for s in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
  for pol in ${POLICIES:-f16 f32 f16-storage-f32-compute f16-resident bf16 fp8-e4m3-weights int8-weights}; do
    echo "== $s $pol $LAYOUT"; cg bench --model $M/$s --policy $pol --layout $LAYOUT ${COMPARE:+--compare $COMPARE} 2>&1 | grep -v "packing\|it/s\|__cudagraphs\|warnings.warn\|UserWarning"
  done
done | tee -a "$OUT/bench_all.log"
