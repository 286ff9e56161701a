#pragma once
// dtf/dtypes.cuh: the device side of the dtype table: exact conversions through f32 (RNE), one-rounding
// elementwise math per compute dtype, the dot-product step, launch ordering and the timeline stamps.
// The target's kernels.cu defines DTF_FP8, DTF_ARITH_F16, DTF_ARITH_BF16, DTF_PDL and the tuning
// macros before including it (templates/kernels.cu.j2).
#include <stdint.h>   // int8_t: nvcc's headers bring it in, NVRTC's (codegen/compile.py hands it one) do not
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if DTF_FP8
#include <cuda_fp8.h>
#endif

// ---- timeline: compiled in only with -DDTF_TRACE (`codegen bench --timeline`) --------------------
#ifdef DTF_TRACE
#define DTF_TRACE_MAX 16384
// For each launch, in launch order (%globaltimer, ns): [0] block 0 starts, [1] block 0 is past
// DTF_WAIT_PRIOR, [2] the launch's last block ends. Kernels of a step complete in launch order (each
// waits for its predecessor), so the last-block counter serves one launch at a time.
__device__ unsigned long long dtf_trace[DTF_TRACE_MAX][3];
__device__ unsigned int dtf_trace_started, dtf_trace_ended, dtf_trace_blocks_done;
namespace dtf {
__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct Trace {
  int i = -1;
  __device__ Trace() {
    if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
      i = atomicAdd(&dtf_trace_started, 1u) % DTF_TRACE_MAX;
      dtf_trace[i][0] = globaltimer();
    }
  }
  __device__ void waited() { if (i >= 0) dtf_trace[i][1] = globaltimer(); }
  __device__ ~Trace() {
    if (threadIdx.x != 0) return;
    unsigned long long t = globaltimer();
    if (atomicAdd(&dtf_trace_blocks_done, 1u) == gridDim.x * gridDim.y * gridDim.z - 1) {
      dtf_trace_blocks_done = 0;
      dtf_trace[atomicAdd(&dtf_trace_ended, 1u) % DTF_TRACE_MAX][2] = t;
    }
  }
};
}  // namespace dtf
#define DTF_TRACE_BEGIN() dtf::Trace dtf_trace_scope
#define DTF_TRACE_WAITED() dtf_trace_scope.waited()
#else
#define DTF_TRACE_BEGIN()
#define DTF_TRACE_WAITED()
#endif

// ---- launch ordering ------------------------------------------------------------------------
#if DTF_PDL
// Programmatic dependent launch (the device spec's programmatic_dependent_launch). Every kernel opens
// with DTF_KERNEL_START(early) and, before DTF_WAIT_PRIOR() (which waits until the previous kernel has
// finished and its writes are visible), reads only weights and what earlier decode steps wrote (the
// runtime starts each step after the previous one has completed). A kernel lets the next one start
// once all its blocks are past that wait, so at most one kernel runs ahead streaming its weights:
// letting every kernel start the next at once kept up to three ahead resident on the H200, and their
// weight streams delayed the running kernel's own loads (SmolLM2 f16 0.434 -> 0.409 ms/token). An op
// the model spec marks `dependents: early` (early = 1) lets it start at once instead: for a kernel
// whose time after its wait is shorter than the head start its successor needs (docs/benchmarks.md).
#define DTF_KERNEL_START(early) DTF_TRACE_BEGIN(); if (early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define DTF_WAIT_PRIOR() asm volatile("griddepcontrol.wait;" ::: "memory"); asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); DTF_TRACE_WAITED()
#else
#define DTF_KERNEL_START(early) DTF_TRACE_BEGIN()
#define DTF_WAIT_PRIOR() DTF_TRACE_WAITED()
#endif

// ---- L2 prefetch (tuning.l2_prefetch_kib) --------------------------------------------------------
// Asks the L2 to fetch this block's share (`part` of `parts`) of the first DTF_L2_PREFETCH_KIB KiB of a
// weight of `kib` KiB, as one bulk request from one thread (sm_90 cp.async.bulk.prefetch): issued by a
// kernel that leaves the memory system idle, so the next GEMV's first weights come from L2. Only for a
// weight at least 8x that size: a smaller one is entirely in flight from the GEMV's own loads before
// its wait, and prefetching it too measured slower (SmolLM2's 3.5 MB gate/up: +1.5% per token; the
// 1B shape's 64 MB: -0.8%). A hint: nothing here is read.
namespace dtf {
__device__ __forceinline__ void l2_prefetch(const void* p, int kib, int part, int parts) {
#if DTF_L2_PREFETCH_KIB > 0
  unsigned share = (unsigned)(DTF_L2_PREFETCH_KIB * 1024LL / parts) & ~15u;
  if (threadIdx.x == 0 && kib >= 8LL * DTF_L2_PREFETCH_KIB && share > 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
                 :: "l"(static_cast<const char*>(p) + (size_t)part * share), "r"(share) : "memory");
#endif
}
}  // namespace dtf

// ---- dtype helpers: every conversion goes through f32 with round-to-nearest-even ----------
namespace dtf {
// -inf without <math.h> (NVRTC has no C library headers).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
#if DTF_FP8
__device__ __forceinline__ float to_f32(__nv_fp8_e4m3 v) { return static_cast<float>(v); }
#endif
__device__ __forceinline__ float to_f32(signed char v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Convert between any two dtypes (exact widening, RNE narrowing).
template <typename To, typename From> __device__ __forceinline__ To cvt(From v) { return from_f32<To>(to_f32(v)); }

// Elementwise arithmetic in a compute dtype: one rounding per operation, as the reference models it.
__device__ __forceinline__ float mul(float a, float b) { return a * b; }
__device__ __forceinline__ float add(float a, float b) { return a + b; }
#if DTF_ARITH_F16
__device__ __forceinline__ __half mul(__half a, __half b) { return __hmul(a, b); }
__device__ __forceinline__ __half add(__half a, __half b) { return __hadd(a, b); }
#endif
#if DTF_ARITH_BF16
__device__ __forceinline__ __nv_bfloat16 mul(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmul(a, b); }
__device__ __forceinline__ __nv_bfloat16 add(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
#endif

// One dot-product step: operands are in the compute dtype, their product is formed exactly (as
// tensor cores and fmaf do) and added to the accumulator with one rounding to the accumulate dtype.
template <typename C, typename A> __device__ __forceinline__ A fma_acc(C a, C b, A acc) {
  return from_f32<A>(fmaf(to_f32(a), to_f32(b), to_f32(acc)));
}

// Warp sum in the accumulate dtype (shuffles move the value unchanged).
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
}  // namespace dtf
