// tools/gemm_check.cu: the prefill GEMM mainloop (dtf::gemm_tile, templates/dtf/gemm.cuh) on its own.
// Checks each tile, dtype mix and ragged shape against a CPU sum of the same rounded operands (outputs
// poisoned with NaN first), then, unless --check, times the Llama-3.2-1B shapes at M = 512 and 2048.
// The path is the one the build compiles: wgmma on sm_90a, mma.sync on sm_80+, SIMT below.
//   nvcc -O3 -std=c++17 -Itemplates -gencode arch=compute_90a,code=sm_90a -DDTF_GEMM_WGMMA=1 \
//        tools/gemm_check.cu -o /tmp/gemm_check                          (Hopper: wgmma, cluster split)
//   nvcc -O3 -std=c++17 -Itemplates -arch=sm_80 tools/gemm_check.cu -o /tmp/gemm_check   (mma.sync)
//   /tmp/gemm_check [--check]        (tests/test_gpu.py runs it with --check)
#define DTF_FP8 1
#define DTF_ARITH_F16 1
#define DTF_ARITH_BF16 1
#define DTF_PDL 0
#define DTF_GEMV_LOADS 8
#define DTF_GEMV_ROTATE_BATCHES 0
#define DTF_L2_PREFETCH_KIB 0
#include "dtf/dtypes.cuh"
#include "dtf/rows.cuh"
#include "dtf/gemm.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <cmath>
#include <cstring>
extern __shared__ __align__(16) unsigned char dtf_smem[];

template <typename CT, typename TX, typename TW, typename TO, int BM, int BN>
__global__ void __launch_bounds__(256) k_gemm(const TX* x, const TW* w, TO* c, int M, int N, int K) {
  int m_tiles = (M + BM - 1) / BM, m0 = blockIdx.x % m_tiles * BM, n0 = blockIdx.x / m_tiles * BN;
  auto w_row = [=](int j) -> const TW* { return n0 + j < N ? w + (size_t)(n0 + j) * K : nullptr; };
  const float* t = dtf::gemm_tile<CT, TX, TW, BM, BN>(x + (size_t)m0 * K, K, min(BM, M - m0), w_row, K, dtf_smem);
  constexpr int LDC = dtf::gemm_ldc<BN>();
  for (int e = threadIdx.x; e < BM * BN; e += 256) {
    int i = e / BN, j = e % BN;
    if (m0 + i < M && n0 + j < N) c[(size_t)(m0 + i) * N + n0 + j] = dtf::from_f32<TO>(t[i * LDC + j]);
  }
}

#if DTF_GEMM_WGMMA
template <typename CT, typename TX, typename TW, typename TO, int BM, int BN, int S>
__global__ void __launch_bounds__(256) __cluster_dims__(S, 1, 1) k_gemm_split(const TX* x, const TW* w, TO* c, int M, int N, int K) {
  int tile = blockIdx.x / S;
  int m_tiles = (M + BM - 1) / BM, m0 = tile % m_tiles * BM, n0 = tile / m_tiles * BN;
  const int rank = (int)cooperative_groups::this_cluster().block_rank();
  int k1, k0 = dtf::gemm_split_k(K, rank, S, k1);
  auto w_row = [=](int j) -> const TW* { return n0 + j < N ? w + (size_t)(n0 + j) * K + k0 : nullptr; };
  float* t = dtf::gemm_tile<CT, TX, TW, BM, BN>(x + (size_t)m0 * K + k0, K, min(BM, M - m0), w_row, max(k1 - k0, 0), dtf_smem);
  dtf::gemm_cluster_reduce<BM, BN, S>(t, rank);
  constexpr int LDC = dtf::gemm_ldc<BN>();
  for (int e = rank * (BM / S) * BN + threadIdx.x; e < (rank + 1) * (BM / S) * BN; e += 256) {
    int i = e / BN, j = e % BN;
    if (m0 + i < M && n0 + j < N) c[(size_t)(m0 + i) * N + n0 + j] = dtf::from_f32<TO>(t[i * LDC + j]);
  }
  dtf::gemm_cluster_done();
}
#define KSPLIT(S) k_gemm_split<CT, TX, TW, float, BM, BN, S>
#define KSPLITH(S) k_gemm_split<CT, TX, TW, __half, BM, BN, S>
#else
#define KSPLIT(S) k_gemm<CT, TX, TW, float, BM, BN>
#define KSPLITH(S) k_gemm<CT, TX, TW, __half, BM, BN>
#endif

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)

static uint32_t rng = 12345;
static float frand() { rng = rng * 1664525u + 1013904223u; return ((rng >> 8) / 16777216.0f) * 2.0f - 1.0f; }
template <typename T> T host_from(float f);
template <> __half host_from<__half>(float f) { return __float2half_rn(f); }
template <> __nv_bfloat16 host_from<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <> float host_from<float>(float f) { return f; }
template <> __nv_fp8_e4m3 host_from<__nv_fp8_e4m3>(float f) { return __nv_fp8_e4m3(f); }
template <typename T> float host_to(T v) { return (float)v; }
template <> float host_to<__half>(__half v) { return __half2float(v); }
template <> float host_to<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

static int failures = 0;
template <typename CT, typename TX, typename TW, int BM, int BN, int S = 1>
void check(const char* name, int M, int N, int K) {
  std::vector<TX> hx((size_t)M * K); std::vector<TW> hw((size_t)N * K);
  std::vector<float> fx(hx.size()), fw(hw.size());
  for (size_t i = 0; i < hx.size(); ++i) { hx[i] = host_from<TX>(frand()); fx[i] = host_to<float>(host_from<CT>(host_to(hx[i]))); }
  for (size_t i = 0; i < hw.size(); ++i) { hw[i] = host_from<TW>(frand()); fw[i] = host_to<float>(host_from<CT>(host_to(hw[i]))); }
  TX* dx; TW* dw; float* dc;
  CK(cudaMalloc(&dx, hx.size() * sizeof(TX))); CK(cudaMalloc(&dw, hw.size() * sizeof(TW))); CK(cudaMalloc(&dc, (size_t)M * N * 4));
  CK(cudaMemcpy(dx, hx.data(), hx.size() * sizeof(TX), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dw, hw.data(), hw.size() * sizeof(TW), cudaMemcpyHostToDevice));
  CK(cudaMemset(dc, 0xff, (size_t)M * N * 4));   // poison: NaN
  auto kern = S > 1 ? KSPLIT(S) : k_gemm<CT, TX, TW, float, BM, BN>;
  int smem = dtf::gemm_smem_bytes<CT, TX, TW, BM, BN>();
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int grid = ((M + BM - 1) / BM) * ((N + BN - 1) / BN) * S;
  kern<<<grid, 256, smem>>>(dx, dw, dc, M, N, K);
  CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
  std::vector<float> hc((size_t)M * N);
  CK(cudaMemcpy(hc.data(), dc, hc.size() * 4, cudaMemcpyDeviceToHost));
  double worst = 0; int bad = 0; int bi = -1, bj = -1; double bref = 0, bgot = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k) { double p = (double)fx[(size_t)i * K + k] * fw[(size_t)j * K + k]; ref += p; mag += fabs(p); }
      double got = hc[(size_t)i * N + j], err = fabs(got - ref) / (mag * 1e-6 + 1e-30);
      if (!(err <= 4.0 * sqrt((double)K))) { if (!bad) { bi = i; bj = j; bref = ref; bgot = got; } ++bad; }
      if (err > worst) worst = err;
    }
  printf("%-40s S=%d M=%5d N=%5d K=%5d  %s  (worst error %.2f, in units of 1e-6 x sum|products|; %d bad)\n", name, S, M, N,
         K, bad ? "FAIL" : "ok", worst, bad);
  if (bad) { printf("   first bad (%d,%d): ref %.6f got %.6f\n", bi, bj, bref, bgot); ++failures; }
  cudaFree(dx); cudaFree(dw); cudaFree(dc);
}

template <typename CT, typename TX, typename TW, int BM, int BN, int S = 1>
void timeit(const char* name, int M, int N, int K) {
  TX* dx; TW* dw; __half* dc;
  CK(cudaMalloc(&dx, (size_t)M * K * sizeof(TX))); CK(cudaMalloc(&dw, (size_t)N * K * sizeof(TW))); CK(cudaMalloc(&dc, (size_t)M * N * 2));
  CK(cudaMemset(dx, 0x11, (size_t)M * K * sizeof(TX))); CK(cudaMemset(dw, 0x11, (size_t)N * K * sizeof(TW)));
  auto kern = S > 1 ? KSPLITH(S) : k_gemm<CT, TX, TW, __half, BM, BN>;
  int smem = dtf::gemm_smem_bytes<CT, TX, TW, BM, BN>();
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int grid = ((M + BM - 1) / BM) * ((N + BN - 1) / BN) * S;
  for (int r = 0; r < 3; ++r) kern<<<grid, 256, smem>>>(dx, dw, dc, M, N, K);
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const int reps = 50;
  cudaEventRecord(a);
  for (int r = 0; r < reps; ++r) kern<<<grid, 256, smem>>>(dx, dw, dc, M, N, K);
  cudaEventRecord(b); CK(cudaEventSynchronize(b));
  float ms; cudaEventElapsedTime(&ms, a, b);
  double us = ms * 1000 / reps;
  int occ = 0; cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, 256, smem);
  printf("TIME %-28s S=%d %-3s", name, S, ""); printf(" M=%5d N=%5d K=%5d  %7.1f us  %6.1f TFLOP/s  (grid %d, smem %d, %d blocks/SM)\n", M, N, K, us,
         2.0 * M * N * K / us * 1e-6, grid, smem, occ);
  cudaFree(dx); cudaFree(dw); cudaFree(dc);
}

int main(int argc, char** argv) {
  const bool timings = !(argc > 1 && strcmp(argv[1], "--check") == 0);
  typedef __half H; typedef __nv_bfloat16 B; typedef __nv_fp8_e4m3 E;
  check<H, H, H, 128, 128>("f16 128x128", 256, 256, 512);
  check<H, H, H, 128, 128>("f16 128x128 ragged m/n/k", 200, 200, 200);
  check<H, H, H, 128, 64>("f16 128x64", 130, 192, 1024);
  check<H, H, H, 64, 64>("f16 64x64", 70, 130, 320);
  check<B, B, B, 128, 128>("bf16 128x128", 129, 256, 576);
  check<B, B, B, 128, 64>("bf16 128x64 ragged", 77, 100, 72);
  check<H, H, E, 128, 128>("f16 x fp8 w 128x128", 256, 384, 512);
  check<H, H, E, 128, 64>("f16 x fp8 w 128x64 ragged", 100, 70, 200);
  check<H, float, H, 128, 64>("f32 x -> f16 128x64", 64, 128, 256);
  check<H, H, H, 128, 128>("f16 K=172 (unaligned, reg path)", 50, 130, 172);
  check<H, H, H, 128, 128>("f16 1 row", 1, 256, 2048);
  check<float, H, H, 128, 64>("f32 compute (SIMT)", 64, 64, 256);
#if DTF_GEMM_WGMMA
  check<H, H, H, 128, 256>("f16 128x256 ragged", 200, 300, 520);
  check<B, H, E, 128, 256>("bf16 fp8 w 128x256", 128, 512, 256);
  check<H, H, H, 128, 256, 4>("f16 128x256/4 ragged", 200, 300, 1000);
  check<H, H, H, 128, 128, 2>("f16 128x128/2", 256, 256, 2048);
  check<B, B, E, 128, 64, 8>("bf16 fp8w 128x64/8 (empty splits)", 130, 70, 200);
  if (timings) timeit<H, H, H, 128, 256, 4>("down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 128, 2>("down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 128, 4>("down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 64, 2>("down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 256, 4>("o", 512, 2048, 2048);
  if (timings) timeit<H, H, H, 128, 128, 2>("o", 512, 2048, 2048);
  if (timings) timeit<H, H, H, 128, 256, 2>("qkv", 512, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 128, 2>("qkv", 512, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 256, 2>("gate_up", 512, 16384, 2048);
  if (timings) timeit<H, H, H, 128, 256, 2>("down 2048", 2048, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 256, 1>("down 2048", 2048, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 128, 1>("qkv 2048", 2048, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 256, 1>("f16 128x256 gate_up", 512, 16384, 2048);
  if (timings) timeit<H, H, H, 128, 256>("f16 128x256 qkv", 512, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 256>("f16 128x256 gate_up 2048", 2048, 16384, 2048);
  if (timings) timeit<H, H, E, 128, 256>("fp8w 128x256 gate_up", 512, 16384, 2048);
#endif
  if (timings) timeit<H, H, H, 128, 128>("f16 128x128 qkv", 512, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 64>("f16 128x64 qkv", 512, 3072, 2048);
  if (timings) timeit<H, H, H, 128, 128>("f16 128x128 o", 512, 2048, 2048);
  if (timings) timeit<H, H, H, 128, 64>("f16 128x64 o", 512, 2048, 2048);
  if (timings) timeit<H, H, H, 64, 64>("f16 64x64 o", 512, 2048, 2048);
  if (timings) timeit<H, H, H, 128, 128>("f16 128x128 gate_up", 512, 16384, 2048);
  if (timings) timeit<H, H, H, 128, 64>("f16 128x64 gate_up", 512, 16384, 2048);
  if (timings) timeit<H, H, H, 128, 128>("f16 128x128 down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 64>("f16 128x64 down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 64, 64>("f16 64x64 down", 512, 2048, 8192);
  if (timings) timeit<H, H, H, 128, 128>("f16 128x128 gate_up 2048", 2048, 16384, 2048);
  if (timings) timeit<H, H, E, 128, 128>("fp8w 128x128 gate_up", 512, 16384, 2048);
  if (timings) timeit<H, H, E, 128, 64>("fp8w 128x64 down", 512, 2048, 8192);
  printf("%s\n", failures ? "SOME CHECKS FAILED" : "ALL CHECKS PASSED");
  return failures ? 1 : 0;
}
