#pragma once
// dtf/gemm.cuh: the block-tile mainloop of the batched-prefill GEMM, C = X · Wᵀ (X: [M, K] activations,
// W: [N, K] as a Linear weight). One block of GEMM_THREADS computes one BM x BN tile of C and leaves it
// in shared memory as f32 for the caller's epilogue. As the reference models it, every operand is
// rounded once to the compute dtype CT (cvt<CT>, RNE) and exact products are summed in f32: f16/bf16
// on tensor cores (f32 accumulators) fed by a swizzled multi-stage cp.async pipeline, with Hopper's
// warpgroup MMA (wgmma, sm_90a, DTF_GEMM_WGMMA) or else mma.sync m16n8k16 from ldmatrix (sm_80+);
// f32 compute and older GPUs on a SIMT path (fmaf into registers).
// Included after dtypes.cuh and rows.cuh (Widen, ExactIn, round_to); the target's kernels.cu defines
// DTF_FP8, DTF_ARITH_F16, DTF_ARITH_BF16, DTF_GEMM_WGMMA and the tuning macros before them
// (templates/kernels.cu.j2).
#ifndef DTF_GEMM_WGMMA
#define DTF_GEMM_WGMMA 0
#endif
#if DTF_GEMM_WGMMA
#include <cooperative_groups.h>
#include "wgmma.cuh"
#endif

// Stages of the tensor-core path's cp.async pipeline, 32 k each: (BM + BN) * 64 bytes a stage, so 4 stages
// of 128 x 128 take 64 KiB (the f32 C tile, 68 KiB, reuses them) and two blocks fit an SM.
#ifndef DTF_GEMM_STAGES
#define DTF_GEMM_STAGES 4
#endif

namespace dtf {
constexpr int GEMM_THREADS = 256;    // the block size every caller launches with: 8 warps
constexpr int GEMM_BK = 32, GEMM_STAGES = DTF_GEMM_STAGES;   // BK 64: the register-staged paths spill at 128
constexpr int GEMM_SIMT_BK = 16;     // SIMT path: k per stage, two f32 stages (128 x 64: 24 KiB)
// The wgmma path's stages, 64 k each (one 128-byte swizzle row): (BM + BN) * 128 bytes a stage, as many
// as fit an sm_90 block's 227 KiB, at most 4 (measured on the H100 against 3; deeper is unmeasured):
// 128 x 256 takes 192 KiB (one block an SM), 128 x 64 96 KiB (two).
constexpr int GEMM_WG_BK = 64, GEMM_WG_ALIGN = 1024;   // the 128-byte swizzle's atom: the stages' alignment
constexpr int GEMM_WG_SMEM = 232448, GEMM_WG_MAX_STAGES = 4;
template <int BM, int BN> __host__ __device__ constexpr int gemm_wg_stages() {
  return (GEMM_WG_SMEM - GEMM_WG_ALIGN) / ((BM + BN) * GEMM_WG_BK * 2) < GEMM_WG_MAX_STAGES
             ? (GEMM_WG_SMEM - GEMM_WG_ALIGN) / ((BM + BN) * GEMM_WG_BK * 2) : GEMM_WG_MAX_STAGES;
}

template <typename A, typename B> struct Same { static constexpr bool value = false; };
template <typename A> struct Same<A, A> { static constexpr bool value = true; };
template <int BYTES> struct Bits;   // the unsigned integer of a dtype's size, for its raw loads
template <> struct Bits<1> { using type = unsigned char; };
template <> struct Bits<2> { using type = unsigned short; };
template <> struct Bits<4> { using type = unsigned; };

// Leading dimension (floats) of the f32 C tile: rows 8 floats (32 banks / 4) apart, so the mma
// fragments' 8-row float2 stores and the SIMT threads' float4 stores take the minimum wavefronts.
template <int BN> __host__ __device__ constexpr int gemm_ldc() { return BN + 8; }

// Dynamic shared memory bytes of a tile: the larger of the mainloop's stages (the path the device
// compiles: wgmma, mma.sync or SIMT) and the f32 C tile, which reuses them once the mainloop is done;
// the wgmma path aligns both to GEMM_WG_ALIGN inside the allocation.
template <typename CT, typename TX, typename TW, int BM, int BN>
__host__ __device__ constexpr int gemm_smem_bytes() {
  constexpr bool tc16 = !Same<CT, float>::value;
  int tc = tc16 ? GEMM_STAGES * (BM + BN) * GEMM_BK * 2 : 0;
  int simt = 2 * (BM + BN) * GEMM_SIMT_BK * 4;
  int c = BM * gemm_ldc<BN>() * 4;
  if (DTF_GEMM_WGMMA && tc16) {
    int wg = gemm_wg_stages<BM, BN>() * (BM + BN) * GEMM_WG_BK * 2;
    return (wg > c ? wg : c) + GEMM_WG_ALIGN;
  }
  int m = tc > simt ? tc : simt;
  return m > c ? m : c;
}

// ---- PTX (sm_80+): cp.async, ldmatrix, mma -------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
// 16 bytes global -> shared, around L1; with bytes = 0 nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 name matrix i's rows, r[i] is row lane/4, columns 2(lane%4), +1.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// d += a (16x16, row-major) * b (16x8, column-major): exact products, f32 accumulation.
template <typename CT> __device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- shared-memory layouts ---------------------------------------------------------------------
// Tensor-core stage of one operand: ROWS rows of BK CT values (k contiguous, as ldmatrix reads them),
// the row's 16-byte chunks XOR-swizzled by row: ldmatrix's 8 rows of one chunk then sit in 8
// different bank groups (unswizzled, rows 128 / (2 BK) apart would collide).
template <int BK> __host__ __device__ constexpr int tc_off(int row, int k) {
  constexpr int CH = BK / 8;   // chunks per row: 4 or 8
  return row * BK + ((((k >> 3) ^ (row / (8 / CH))) & (CH - 1)) << 3) + (k & 7);
}
// SIMT stage: k-major f32, [BK][ROWS], so a thread's 4 consecutive rows of one k are one float4.

// ---- one operand's k-chunks, global -> shared --------------------------------------------------
// A thread's share of an operand's BK-wide k-chunk: 16-byte segments (VEC values of T along k) of its
// rows, fixed for the whole loop. Rows are named by rows(r): nullptr for a row beyond the matrix,
// which is zero and never read; k >= K is zero too. Either by cp.async (issue: T is already CT) or
// through registers (fetch, then put: widened exactly by Widen, rounded to CT). vec: 16-byte loads
// (K * sizeof(T) a multiple of 16 and every row 16-byte aligned), else gathered scalar loads.
// Segments go row-major on the tensor-core path (coalesced loads) and column-major on the SIMT one
// (a warp stores 32 rows of one k: no bank conflicts in the k-major layout).
template <typename T, typename CT, int ROWS, int BK, bool SIMT>
struct Operand {
  static constexpr int VEC = 16 / sizeof(T), KSEGS = BK / VEC, SEGS = ROWS * KSEGS;
  static constexpr int ITER = (SEGS + GEMM_THREADS - 1) / GEMM_THREADS;
  static constexpr int STAGE_BYTES = ROWS * BK * (SIMT ? 4 : 2);
  static_assert(KSEGS >= 1 && GEMM_THREADS % KSEGS == 0 && GEMM_THREADS % ROWS == 0, "segment mapping");
  const T* row[ITER];   // segment i's row; for a zero row a valid address that is never read
  int lim[ITER];        // k < lim[i] is in the matrix: K, or 0 for a zero row
  uint4 raw[ITER];
  unsigned char* base;  // stage 0; stage s at base + s * STAGE_BYTES
  bool vec;

  // Segment i of this thread: its row, its first k in the chunk, whether it exists (ITER rounds up).
  __device__ __forceinline__ static int row_of(int i) {
    return SIMT ? threadIdx.x % ROWS : threadIdx.x / KSEGS + i * (GEMM_THREADS / KSEGS);
  }
  __device__ __forceinline__ static int k_of(int i) {
    return (SIMT ? threadIdx.x / ROWS + i * (GEMM_THREADS / ROWS) : threadIdx.x % KSEGS) * VEC;
  }
  __device__ __forceinline__ static bool has(int i) {
    return SEGS % GEMM_THREADS == 0 || (SIMT ? k_of(i) < BK : row_of(i) < ROWS);
  }

  template <typename Rows>
  __device__ __forceinline__ Operand(Rows rows, int K, unsigned char* base_, const void* any) : base(base_) {
    bool ok = (K * (int)sizeof(T)) % 16 == 0;
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const T* p = has(i) ? rows(row_of(i)) : nullptr;
      lim[i] = p ? K : 0;
      row[i] = p ? p : static_cast<const T*>(any);
      ok = ok && reinterpret_cast<size_t>(p) % 16 == 0;
    }
    vec = __syncthreads_and(ok);
  }

  // cp.async of chunk k0 into stage st (tensor-core layout, T == CT, SEGS a multiple of the block).
  __device__ __forceinline__ void issue(int k0, int st) const {
    static_assert(!SIMT && sizeof(T) == 2 && SEGS % GEMM_THREADS == 0, "cp.async: CT rows, whole block");
    unsigned dst = smem_addr(base + st * STAGE_BYTES);
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const int k = k0 + k_of(i);
      const bool in = k < lim[i];
      cp_async16(dst + 2 * tc_off<BK>(row_of(i), k_of(i)), row[i] + (in ? (unsigned)k : 0u), in ? 16 : 0);
    }
  }

  // Chunk k0 into registers (zeros beyond the matrix).
  __device__ __forceinline__ void fetch(int k0) {
    using U = typename Bits<sizeof(T)>::type;
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const T* p = row[i];
      const int k = k0 + k_of(i);
      if (vec) {
        raw[i] = k < lim[i] ? __ldg(reinterpret_cast<const uint4*>(p + (unsigned)k)) : make_uint4(0, 0, 0, 0);
      } else {   // ragged K or unaligned rows: VEC scalar loads packed as the vector would hold them
        unsigned w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (k + e < lim[i])
            w[e * sizeof(T) / 4] |= (unsigned)__ldg(reinterpret_cast<const U*>(p) + k + e) << (8 * (e * sizeof(T) % 4));
        raw[i] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // The registers, rounded to CT, into stage st.
  __device__ __forceinline__ void put(int st) const {
    unsigned char* dst = base + st * STAGE_BYTES;
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      if (!has(i)) continue;
      const int r = row_of(i), k = k_of(i);
      float f[VEC];
      Widen<T>::run(raw[i], f);
      if constexpr (SIMT) {
        float* d = reinterpret_cast<float*>(dst);
#pragma unroll
        for (int e = 0; e < VEC; ++e) d[(k + e) * ROWS + r] = ExactIn<T, CT>::value ? f[e] : round_to<CT>(f[e]);
      } else {   // 4 values (8 bytes) at a time: a swizzled chunk holds 8
#pragma unroll
        for (int g = 0; g < VEC; g += 4) {
          alignas(8) CT h[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) h[e] = from_f32<CT>(f[g + e]);
          *reinterpret_cast<uint2*>(dst + 2 * tc_off<BK>(r, k + g)) = *reinterpret_cast<const uint2*>(h);
        }
      }
    }
  }
};

// ---- the k loop -------------------------------------------------------------------------------
// ceil(K / BK) chunks through S shared-memory stages. cp.async operands (AX, AW) are issued S - 1 - LAG
// chunks ahead; register-staged ones one chunk ahead, converted into the next stage after this
// chunk's math (the stage it writes was last read S chunks ago, before this chunk's barrier).
// EARLY fetches them from global memory before the math, so their latency hides behind it; without
// it (the ragged and unaligned fallback) the loads wait, but hold no registers across the math.
// LAG: math(st) may still be reading its stage when it returns, for at most LAG more chunks (the
// wgmma path keeps one batch in flight), so a stage is refilled LAG chunks later; drain() waits for
// the last. Ends with every copy landed and every warp done with the stages (the C tile may reuse them).
// PROXY (the wgmma path): each thread fences its stores to the stages before the barrier that
// publishes them, as the tensor cores read them through the async proxy.
template <int S, int BK, bool AX, bool AW, bool EARLY, bool PROXY, int LAG, typename LX, typename LW, typename Math,
          typename Drain>
__device__ __forceinline__ void gemm_pipeline(LX& lx, LW& lw, int K, Math math, Drain drain) {
  constexpr bool ASYNC = AX || AW;
  constexpr int AHEAD = S - 1 - LAG;
  static_assert(AHEAD >= 1, "stages");
  auto fetch = [&](int k0) {
    if constexpr (!AX) lx.fetch(k0);
    if constexpr (!AW) lw.fetch(k0);
  };
  auto put = [&](int st) {
    if constexpr (!AX) lx.put(st);
    if constexpr (!AW) lw.put(st);
  };
  const int nk = (K + BK - 1) / BK;
#pragma unroll
  for (int c = 0; c < AHEAD; ++c) {
    if (c < nk) {
      if constexpr (AX) lx.issue(c * BK, c);
      if constexpr (AW) lw.issue(c * BK, c);
    }
    if constexpr (ASYNC) cp_async_commit();   // one group per chunk, empty or not: wait counts stay fixed
  }
  fetch(0);
  put(0);
  for (int t = 0, st = 0; t < nk; ++t, st = st == S - 1 ? 0 : st + 1) {
    if constexpr (ASYNC) cp_async_wait<AHEAD - 1>();   // chunk t has landed (this thread's copies)
#if DTF_GEMM_WGMMA
    if constexpr (PROXY) fence_proxy_async();
#endif
    __syncthreads();   // ... everyone's, and chunk t - 1 - LAG's stage is free
    if constexpr (ASYNC) {
      const int ahead = t + AHEAD, sa = (st + AHEAD) % S;   // into chunk t - 1 - LAG's stage
      if (ahead < nk) {
        if constexpr (AX) lx.issue(ahead * BK, sa);
        if constexpr (AW) lw.issue(ahead * BK, sa);
      }
      cp_async_commit();
    }
    const bool more = t + 1 < nk;
    if (EARLY && more) fetch((t + 1) * BK);
    math(st);
    if (!EARLY && more) fetch((t + 1) * BK);
    if (more) put(st == S - 1 ? 0 : st + 1);
  }
  if constexpr (ASYNC) cp_async_wait<0>();
  drain();
  __syncthreads();
}

// ---- tensor-core path (sm_80+, CT = f16 / bf16) ------------------------------------------------
// 8 warps as WARPS_M x WARPS_N, each a WM x WN warp tile of MT x NT m16n8 accumulators:
// 128x128: 64x32 warps (2x4), 128x64: 32x32 (4x2), 64x64: 32x16 (2x4).
template <typename CT, int BM, int BN, int BK>
struct TcWarps {
  static constexpr int WM = BM == 128 && BN == 128 ? 64 : 32, WN = BM * BN / 8 / WM;
  static constexpr int WARPS_M = BM / WM, MT = WM / 16, NT = WN / 8;
  static_assert(NT % 2 == 0, "B fragments are loaded two n-tiles at a time");
  float acc[MT][NT][4];
  int m0, n0, lane;

  __device__ __forceinline__ TcWarps() {
    int warp = threadIdx.x / 32;
    lane = threadIdx.x % 32, m0 = warp % WARPS_M * WM, n0 = warp / WARPS_M * WN;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // One stage: xs, ws are the shared addresses of its X [BM][BK] and W [BN][BK] tiles. The swizzle
  // depends on row / (8 / CH) % CH only, so moving 16 rows down is a constant offset.
  __device__ __forceinline__ void step(unsigned xs, unsigned ws) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned a[MT][4], b[NT][2];
      // A (m16 x k16): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) are a0..a3: lane -> row lane % 16, k + 8 (lane / 16)
      const unsigned xa = xs + 2 * tc_off<BK>(m0 + lane % 16, kk + lane / 16 * 8);
#pragma unroll
      for (int i = 0; i < MT; ++i) ldmatrix_x4(a[i], xa + 2 * i * 16 * BK);
      // B (k16 x n8, column-major = W's rows): two n-tiles per x4, matrices (n 0-7, k 0-7 | 8-15), (n 8-15, ...)
      const unsigned wa = ws + 2 * tc_off<BK>(n0 + lane % 8 + lane / 16 * 8, kk + lane / 8 % 2 * 8);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        unsigned r[4];
        ldmatrix_x4(r, wa + 2 * j * 8 * BK);
        b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<CT>(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }

  // Accumulator e of tile (i, j): row lane / 4 (+ 8 for e >= 2), columns 2 (lane % 4), +1.
  __device__ __forceinline__ void store(float* c) const {
    constexpr int LDC = gemm_ldc<BN>();
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float* p = c + (m0 + i * 16 + lane / 4) * LDC + n0 + j * 8 + lane % 4 * 2;
        *reinterpret_cast<float2*>(p) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(p + 8 * LDC) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }
};

template <typename CT, typename TX, typename TW, int BM, int BN, typename XRow, typename WRow>
__device__ __forceinline__ float* gemm_tc(XRow x_row, WRow w_row, int K, unsigned char* smem, const void* any) {
  constexpr int S = GEMM_STAGES, BK = GEMM_BK;
  using LX = Operand<TX, CT, BM, BK, false>;
  using LW = Operand<TW, CT, BN, BK, false>;
  LX lx(x_row, K, smem, any);
  LW lw(w_row, K, smem + S * LX::STAGE_BYTES, any);
  TcWarps<CT, BM, BN, BK> w;
  const unsigned xs = smem_addr(lx.base), ws = smem_addr(lw.base);
  auto math = [&](int st) { w.step(xs + st * LX::STAGE_BYTES, ws + st * LW::STAGE_BYTES); };
  // cp.async needs 16-byte segments of both operands; an operand in another dtype goes through registers
  if (lx.vec && lw.vec) gemm_pipeline<S, BK, Same<TX, CT>::value, Same<TW, CT>::value, true, false, 0>(lx, lw, K, math, [] {});
  else gemm_pipeline<S, BK, false, false, false, false, 0>(lx, lw, K, math, [] {});
  float* c = reinterpret_cast<float*>(smem);
  w.store(c);
  __syncthreads();
  return c;
}

#if DTF_GEMM_WGMMA
// ---- wgmma path (sm_90a, CT = f16 / bf16) ------------------------------------------------------
// The block's two warpgroups each own 64 x WGN of the tile: rows 64 g.. of all BN columns (BM = 128),
// or all 64 rows of columns WGN g.. (BM = 64). A stage is 64 k of X and W in the 128-byte swizzle
// (tc_off<64>), issued as four k16 wgmmas per warpgroup; a stage's batch runs while the next stage is
// issued, and is waited on before its stage is refilled (the pipeline's LAG of one).
template <typename CT, int BM, int BN>
struct WgWarps {
  static constexpr int WGN = BM == 128 ? BN : BN / 2, R = WGN / 2;
  float acc[R];
  int m0, n0, lane, row;

  __device__ __forceinline__ WgWarps() {
    int g = threadIdx.x / 128;
    m0 = BM == 128 ? 64 * g : 0, n0 = BM == 128 ? 0 : WGN * g;
    lane = threadIdx.x % 32, row = m0 + threadIdx.x % 128 / 32 * 16 + lane / 4;
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  }

  // One stage: xs, ws are the shared addresses of its X [BM][64] and W [BN][64] tiles.
  __device__ __forceinline__ void step(unsigned xs, unsigned ws) {
    const unsigned long long a = wgmma_desc(xs + m0 * GEMM_WG_BK * 2), b = wgmma_desc(ws + n0 * GEMM_WG_BK * 2);
    wgmma_fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < GEMM_WG_BK / 16; ++kk) Wgmma<WGN>::template run<CT>(acc, a + 2 * kk, b + 2 * kk);
    wgmma_commit();
    wgmma_wait<1>();   // the previous stage's batch is done: the pipeline may refill that stage
    wgmma_fence_operands(acc);
  }

  __device__ __forceinline__ void drain() {
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
  }

  __device__ __forceinline__ void store(float* c) const {
    constexpr int LDC = gemm_ldc<BN>();
#pragma unroll
    for (int j = 0; j < WGN / 8; ++j) {
      float* p = c + row * LDC + n0 + j * 8 + lane % 4 * 2;
      *reinterpret_cast<float2*>(p) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(p + 8 * LDC) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
};

template <typename CT, typename TX, typename TW, int BM, int BN, typename XRow, typename WRow>
__device__ __forceinline__ float* gemm_wg(XRow x_row, WRow w_row, int K, unsigned char* smem, const void* any) {
  constexpr int S = gemm_wg_stages<BM, BN>(), BK = GEMM_WG_BK;
  using LX = Operand<TX, CT, BM, BK, false>;
  using LW = Operand<TW, CT, BN, BK, false>;
  static_assert(LX::STAGE_BYTES % GEMM_WG_ALIGN == 0 && LW::STAGE_BYTES % GEMM_WG_ALIGN == 0, "swizzle atoms");
  unsigned char* base = smem + (-(int)smem_addr(smem) & (GEMM_WG_ALIGN - 1));
  LX lx(x_row, K, base, any);
  LW lw(w_row, K, base + S * LX::STAGE_BYTES, any);
  WgWarps<CT, BM, BN> w;
  const unsigned xs = smem_addr(lx.base), ws = smem_addr(lw.base);
  auto math = [&](int st) { w.step(xs + st * LX::STAGE_BYTES, ws + st * LW::STAGE_BYTES); };
  auto drain = [&] { w.drain(); };
  if (lx.vec && lw.vec) gemm_pipeline<S, BK, Same<TX, CT>::value, Same<TW, CT>::value, true, true, 1>(lx, lw, K, math, drain);
  else gemm_pipeline<S, BK, false, false, false, true, 1>(lx, lw, K, math, drain);
  float* c = reinterpret_cast<float*>(base);
  w.store(c);
  __syncthreads();
  return c;
}

// ---- split K over a thread-block cluster (sm_90) ------------------------------------------------
// The S blocks of a cluster (__cluster_dims__(S, 1, 1): consecutive blockIdx.x) compute one output
// tile, block r summing the k chunks [r nk / S, (r + 1) nk / S) into its C tile (gemm_split_k gives the
// range). Then block r owns rows [r BM / S, (r + 1) BM / S): it adds the S blocks' f32 partials of
// those rows in rank order (0 + p0 + p1 + ...: the same sum whichever block finished first), read
// through distributed shared memory, into its own C tile, for its epilogue. The caller ends with
// gemm_cluster_done(), so no block leaves while another still reads its tile.
__device__ __forceinline__ int gemm_split_k(int K, int r, int S, int& k1) {
  const int nk = (K + GEMM_WG_BK - 1) / GEMM_WG_BK;
  k1 = min(K, (r + 1) * nk / S * GEMM_WG_BK);
  return r * nk / S * GEMM_WG_BK;
}
template <int BM, int BN, int S> __device__ __forceinline__ void gemm_cluster_reduce(float* c, int r) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();   // every block's partial is in its C tile
  constexpr int LDC = gemm_ldc<BN>(), ROWS = BM / S;
  const float* part[S];
#pragma unroll
  for (int q = 0; q < S; ++q) part[q] = cluster.map_shared_rank(c, q);
  for (int e = threadIdx.x * 4; e < ROWS * BN; e += GEMM_THREADS * 4) {
    const int at = (r * ROWS + e / BN) * LDC + e % BN;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int q = 0; q < S; ++q) {
      const float4 v = *reinterpret_cast<const float4*>(part[q] + at);
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    *reinterpret_cast<float4*>(c + at) = sum;
  }
  __syncthreads();
}
__device__ __forceinline__ void gemm_cluster_done() { cooperative_groups::this_cluster().sync(); }
#endif

// ---- SIMT path (CT = f32, or f16 / bf16 below sm_80) -------------------------------------------
// 16 x 16 threads, each a TM x TN micro-tile in float4 strips 64 apart: rows (i / 4) 64 + 4 ty + i % 4,
// columns likewise with tx, so a warp's reads of one k are 2 broadcast and 16 consecutive float4.
template <int BM, int BN>
struct SimtThreads {
  static constexpr int TM = BM / 16, TN = BN / 16;
  float acc[TM][TN];
  int ty, tx;

  __device__ __forceinline__ SimtThreads() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void step(const float* xs, const float* ws) {   // xs [BK][BM], ws [BK][BN]
#pragma unroll
    for (int k = 0; k < GEMM_SIMT_BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) {
        float4 v = *reinterpret_cast<const float4*>(xs + k * BM + i * 16 + ty * 4);
        a[i] = v.x, a[i + 1] = v.y, a[i + 2] = v.z, a[i + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < TN; j += 4) {
        float4 v = *reinterpret_cast<const float4*>(ws + k * BN + j * 16 + tx * 4);
        b[j] = v.x, b[j + 1] = v.y, b[j + 2] = v.z, b[j + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* c) const {
    constexpr int LDC = gemm_ldc<BN>();
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; j += 4)
        *reinterpret_cast<float4*>(c + (i / 4 * 64 + ty * 4 + i % 4) * LDC + j * 16 + tx * 4) =
            make_float4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
  }
};

template <typename CT, typename TX, typename TW, int BM, int BN, typename XRow, typename WRow>
__device__ __forceinline__ float* gemm_simt(XRow x_row, WRow w_row, int K, unsigned char* smem, const void* any) {
  using LX = Operand<TX, CT, BM, GEMM_SIMT_BK, true>;
  using LW = Operand<TW, CT, BN, GEMM_SIMT_BK, true>;
  LX lx(x_row, K, smem, any);
  LW lw(w_row, K, smem + 2 * LX::STAGE_BYTES, any);
  SimtThreads<BM, BN> th;
  gemm_pipeline<2, GEMM_SIMT_BK, false, false, true, false, 0>(lx, lw, K, [&](int st) {
    th.step(reinterpret_cast<const float*>(lx.base + st * LX::STAGE_BYTES),
            reinterpret_cast<const float*>(lw.base + st * LW::STAGE_BYTES));
  }, [] {});
  float* c = reinterpret_cast<float*>(smem);
  th.store(c);
  __syncthreads();
  return c;
}

// ---- the tile ---------------------------------------------------------------------------------
// ctile[m * gemm_ldc<BN>() + n] = sum_k cvt<CT>(x[m * ldx + k]) * cvt<CT>(w_row(n)[k]) for m < BM, n < BN:
// products exact, summed in f32 (tensor cores: in their f32 accumulators). Rows m >= m_rows are zero
// and not read; w_row(n) is output channel n's K values, or nullptr beyond N (a zero column, not read).
// x points at the tile's first row. smem: gemm_smem_bytes<CT, TX, TW, BM, BN>() bytes of dynamic
// shared memory, 16-byte aligned; the returned f32 C tile is at its start. Every thread of the
// GEMM_THREADS must call it; it ends with __syncthreads(), so all may read the whole tile after.
// 16-byte vector loads (cp.async where TX, TW are CT) need K * sizeof(T) % 16 == 0 and x + m * ldx,
// w_row(n) 16-byte aligned; anything else (K = 172, odd ldx) is read with scalar loads, correctly but slower.
template <typename CT, typename TX, typename TW, int BM, int BN, typename WRow>
__device__ float* gemm_tile(const TX* __restrict__ x, int ldx, int m_rows, WRow w_row, int K, unsigned char* smem) {
  static_assert((BM == 128 && (BN == 256 || BN == 128 || BN == 64)) || (BM == 64 && BN == 64),
                "gemm_tile: BM x BN is 128x256, 128x128, 128x64 or 64x64");
  auto x_row = [=](int m) -> const TX* { return m < m_rows ? x + (size_t)m * ldx : nullptr; };
#if DTF_GEMM_WGMMA && defined(__CUDA_ARCH__)
  if constexpr (!Same<CT, float>::value) return gemm_wg<CT, TX, TW, BM, BN>(x_row, w_row, K, smem, x);
  else
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!Same<CT, float>::value) return gemm_tc<CT, TX, TW, BM, BN>(x_row, w_row, K, smem, x);
  else
#endif
    return gemm_simt<CT, TX, TW, BM, BN>(x_row, w_row, K, smem, x);
}
}  // namespace dtf
