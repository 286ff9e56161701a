#!/usr/bin/env bash
# The prefill table of docs/benchmarks.md in one GPU run: the GEMM mainloop alone (tools/gemm_check.cu)
# and cuBLAS on the same shapes (tools/cublas_shapes.py, torch), then `codegen bench` on both synthetic
# shapes (prefill 512 and 2048, decode at depth 4096, every policy's prefill 512), then, with
# LLAMA_BENCH=path/to/llama-bench and GGUF_1B / GGUF_SMOL (random-weight F16 GGUFs of the same shapes),
# llama.cpp's pp512, pp2048, tg128 and tg128 at depth 4096 on the same GPU. LLAMA_BUILD, a command that
# builds llama-bench and writes those GGUFs, runs in the background meanwhile. Logs go to $OUT.
#   usage: [LLAMA_BUILD=...] [LLAMA_BENCH=... GGUF_1B=... GGUF_SMOL=...] [POLICIES="bf16 ..."] tools/gpu_prefill_bench.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
[[ -n ${LLAMA_BUILD:-} ]] && { nice -n 10 bash -c "$LLAMA_BUILD" > "$OUT/llama_build.log" 2>&1 & build=$!; }
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log --oneline | head -1; } | tee "$OUT/env.txt"
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
arch=$([[ $cc == 90 ]] && echo "-gencode=arch=compute_90a,code=sm_90a -DDTF_GEMM_WGMMA=1" || echo "-arch=sm_$cc")
nvcc -O3 -std=c++17 -Itemplates $arch tools/gemm_check.cu -o /tmp/gemm_check && /tmp/gemm_check | tee "$OUT/gemm_check.txt"
python3 "$(dirname "$0")/cublas_shapes.py" 2>&1 | tee "$OUT/cublas.txt"
synth smollm2-135m llama-3.2-1b
b() { cg bench "$@" 2>&1 | grep -v "packing\|it/s\|compiling\|uploaded"; }
{
  echo "== smollm2-135m f16 prefill 512"; b --model $M/smollm2-135m --policy f16 --prefill 512 --tokens 128
  echo "== llama-3.2-1b f16 prefill 512"; b --model $M/llama-3.2-1b --policy f16 --prefill 512 --tokens 128
  echo "== llama-3.2-1b f16 prefill 2048"; b --model $M/llama-3.2-1b --policy f16 --prefill 2048 --tokens 32
  echo "== llama-3.2-1b f16 depth 4096"; b --model $M/llama-3.2-1b --policy f16 --depth 4096 --tokens 128
  for pol in ${POLICIES:-bf16 fp8-e4m3-weights int8-weights f16-resident f16-storage-f32-compute f32}; do
    for s in smollm2-135m llama-3.2-1b; do echo "== $s $pol prefill 512"; b --model $M/$s --policy $pol --prefill 512 --tokens 16; done
  done
} 2>&1 | tee "$OUT/prefill_bench.log"
[[ -n ${build:-} ]] && wait $build
if [[ -n ${LLAMA_BENCH:-} ]]; then
  { "$LLAMA_BENCH" -m "$GGUF_SMOL" -ngl 99 -fa 1 -p 512 -n 128 -r 10
    "$LLAMA_BENCH" -m "$GGUF_1B" -ngl 99 -fa 1 -p 512,2048 -n 128 -r 10
    "$LLAMA_BENCH" -m "$GGUF_1B" -ngl 99 -fa 1 -p 0 -n 128 -d 4096 -r 5; } 2>&1 | tee "$OUT/llamacpp.log"
fi
