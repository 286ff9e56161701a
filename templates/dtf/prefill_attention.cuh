#pragma once
// dtf/prefill_attention.cuh: causal attention of a chunk of prompt tokens (batched prefill), flash-
// attention style. Query row t (position pos0 + t) attends to cache rows 0 .. pos0 + t, grouped-query
// heads; scores, softmax and the weighted sum of V in f32, the output rounded once to TO. Included by
// kernels.cu after dtypes.cuh (templates/prefill_attention.cu.j2 calls it).
//
// One block of PREFILL_ATTN_THREADS threads per (head, tile of PREFILL_ATTN_BQ query rows); keys are
// visited in tiles with an online softmax (running max m and sum l, rescaled as the max grows), so the
// context length is bounded only by the cache. Two paths, chosen per instantiation and head_dim:
// * tensor cores (sm_80+, q and cache both f16 or both bf16, head_dim 64 or 128, 16-byte aligned
//   pointers): mma.sync m16n8k16 with f32 accumulation. q and k are exact in the 16-bit type, so
//   S = Q K^T is an f32 sum of exact products; P (f32) is split into hi = P rounded to the 16-bit type
//   and lo = P - hi rounded, and O += hi V + lo V keeps P to 16 (bf16) or 22 (f16) bits.
// * SIMT, everything else (f32 operands, mixed dtypes, other head dims, older GPUs): f32 fmaf dots.
namespace dtf {
constexpr int PREFILL_ATTN_BQ = 64;        // query rows per block
constexpr int PREFILL_ATTN_THREADS = 128;  // block size every caller launches with

// SIMT geometry: head dims up to DMAX = 64, 128 or 256; a warp takes R = 8, 8, 4 query rows at a time
// (DMAX / 32 output dims per lane each: at most 32 accumulators), rows staged in f32 with a stride of DMAX + 4.
__host__ __device__ constexpr int prefill_simt_dmax(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }
__host__ __device__ constexpr int prefill_simt_rows(int dmax) { return dmax <= 128 ? 8 : 4; }

// Dynamic shared memory of one block, elem_bytes = sizeof(TKV): the most either path may take. SIMT:
// 4 * ((4R + 32) * (DMAX + 4) + 128 R) bytes (21504 / 37888 / 51968 for DMAX 64 / 128 / 256); tensor
// cores (elem_bytes 2, head_dim 64 or 128): 4 tiles of 64 rows, 256 * head_dim * elem_bytes (32 / 64
// KiB). All fit sm_75's 64 KiB; above 48 KiB the caller raises cudaFuncAttributeMaxDynamicSharedMemorySize.
__host__ __device__ constexpr int prefill_attn_smem_bytes(int head_dim, int elem_bytes) {
  const int dmax = prefill_simt_dmax(head_dim), r = prefill_simt_rows(dmax);
  const int simt = 4 * ((4 * r + 32) * (dmax + 4) + 128 * r);
  const int mma = elem_bytes == 2 && (head_dim == 64 || head_dim == 128) ? 256 * head_dim * elem_bytes : 0;
  return simt > mma ? simt : mma;
}

#if __CUDA_ARCH__ >= 800
// ---- tensor-core path ---------------------------------------------------------------------------
// The 16-bit operand type of an mma: `ok` only where q and the cache share f16 or bf16.
template <typename TQ, typename TKV> struct PrefillMma { static constexpr bool ok = false; };
template <> struct PrefillMma<__half, __half> {
  static constexpr bool ok = true;
  // d += a * b: m16n8k16, row-major A, column-major B, f32 accumulate
  __device__ __forceinline__ static void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct PrefillMma<__nv_bfloat16, __nv_bfloat16> {
  static constexpr bool ok = true;
  __device__ __forceinline__ static void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 16 bytes global -> shared, asynchronously; zeros instead where !ok (src is then not read).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}
__device__ __forceinline__ void ldsm_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// (x, y) rounded to a pair of T (x in the low half); hx, hy get the rounded values back in f32.
template <typename T> __device__ __forceinline__ unsigned pack_pair(float x, float y, float& hx, float& hy) {
  T a = from_f32<T>(x), b = from_f32<T>(y);
  hx = to_f32(a), hy = to_f32(b);
  return (unsigned)*reinterpret_cast<const unsigned short*>(&a) | (unsigned)*reinterpret_cast<const unsigned short*>(&b) << 16;
}

// Each warp owns 16 query rows of the tile; the block walks 64-key tiles of K and V, double-buffered
// in shared memory with cp.async (the next tile loads while this one is computed). Shared memory is 4
// regions of 64 rows x D: K0, K1, V0, V1, rows of D / 8 16-byte chunks, chunk c of row r stored at
// c ^ (r & 7) so that ldmatrix's 8 rows of one chunk column hit 8 distinct bank groups. The Q tile
// goes through K1 before the loop (its fragments then live in registers).
template <int D, typename TQ, typename TO>
__device__ __noinline__ void prefill_mma(const TQ* __restrict__ q, const TQ* __restrict__ k_cache,
                                         const TQ* __restrict__ v_cache, TO* __restrict__ out, int pos0, int tokens,
                                         int q_dim, int kv_dim, int h, int kvh, int tile, unsigned char* smem) {
  typedef PrefillMma<TQ, TQ> M;
  constexpr int C = D / 8, BQ = PREFILL_ATTN_BQ;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c2 = (lane % 4) * 2;
  const int row0 = tile * BQ, n_kv = pos0 + min(row0 + BQ, tokens), n_kt = (n_kv + 63) / 64;
  const int pos_w = pos0 + row0 + warp * 16;   // position of the warp's first row
  const bool live = row0 + warp * 16 < tokens;  // else the warp's rows are past the chunk: no work
  const unsigned base = (unsigned)__cvta_generic_to_shared(smem);
  auto at = [&](int region, int row, int c) { return base + ((region * 64 + row) * D + (c ^ (row & 7)) * 8) * 2; };
  // rows first .. first + 63 of src (row stride `stride`) into a region, this thread's chunk c_t of rows
  // r_t + i * RSTEP (their row & 7 is r_t's); rows >= limit read as zeros, so that no NaN from memory
  // past the context meets a zero weight
  constexpr int RSTEP = PREFILL_ATTN_THREADS / C;
  static_assert(RSTEP % 8 == 0, "a thread's rows share their swizzle");
  const int c_t = threadIdx.x % C, r_t = threadIdx.x / C;
  auto stage = [&](int region, const TQ* src, int stride, int first, int limit) {
    const TQ* p = src + ((size_t)first + r_t) * stride + c_t * 8;
    const unsigned dst = at(region, r_t, c_t);
#pragma unroll
    for (int i = 0; i < 64 / RSTEP; ++i) {
      const bool ok = first + r_t + i * RSTEP < limit;
      cp_async16(dst + i * RSTEP * D * 2, ok ? p + i * RSTEP * stride : src, ok);
    }
  };
  const TQ* kh = k_cache + (size_t)kvh * D;
  const TQ* vh = v_cache + (size_t)kvh * D;
  stage(1, q + (size_t)h * D, q_dim, row0, tokens);
  stage(0, kh, kv_dim, 0, n_kv);
  stage(2, vh, kv_dim, 0, n_kv);
  cp_async_wait_all();
  __syncthreads();
  unsigned qf[D / 16][4];   // A fragments of the warp's 16 rows, 16 dims each
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], at(1, warp * 16 + (lane / 8 % 2) * 8 + lane % 8, 2 * kk + lane / 16));
  __syncthreads();   // K1 is free for tile 1

  // Row g of the warp's 16 in elements 0, 1 of each fragment, row g + 8 in elements 2, 3.
  float o[D / 8][4], m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const float scale = rsqrtf((float)D);
  for (int j = 0; j < n_kt; ++j) {
    const int cur = j & 1, k0 = j * 64;
    if (j + 1 < n_kt) {
      stage(cur ^ 1, kh, kv_dim, k0 + 64, n_kv);
      stage(2 + (cur ^ 1), vh, kv_dim, k0 + 64, n_kv);
    }
    if (live && k0 <= pos_w + 15) {   // else every key of the tile lies past the warp's rows
      float s[8][4];
#pragma unroll
      for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int np = 0; np < 4; ++np) {   // 16 keys: B fragments of two 8-key tiles
          unsigned b[4];
          ldsm_x4(b, at(cur, np * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + lane / 8 % 2));
          M::mma(s[2 * np], qf[kk], b[0], b[1]);
          M::mma(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
      // scale, causal mask (only in tiles reaching past the warp's first row), online softmax
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= scale;
      if (k0 + 63 > pos_w) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (k0 + n * 8 + c2 + e % 2 > pos_w + g + (e / 2) * 8) s[n][e] = neg_inf();
      }
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {   // a row's 64 scores are spread over the 4 lanes of a quad
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        corr[r] = __expf(m[r] - mx[r]);   // key 0 is in every row's first tile: mx is finite
        m[r] = mx[r];
        l[r] *= corr[r];                  // this lane's share of the row sum; the quad's are added at the end
      }
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = __expf(s[n][e] - m[e / 2]);
          l[e / 2] += s[n][e];
        }
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] *= corr[e / 2];
      // O += P V: the S fragments of keys 16kk .. 16kk + 15 are the A fragment of P (hi and lo)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        unsigned hi[4], lo[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float* p = &s[2 * kk + i / 2][(i % 2) * 2];   // a0: row g, a1: row g + 8, a2, a3: keys + 8
          float hx, hy, dx, dy;
          hi[i] = pack_pair<TQ>(p[0], p[1], hx, hy);
          lo[i] = pack_pair<TQ>(p[0] - hx, p[1] - hy, dx, dy);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {   // 16 dims: B fragments of two 8-dim tiles
          unsigned b[4];
          ldsm_x4_trans(b, at(2 + cur, kk * 16 + (lane / 8 % 2) * 8 + lane % 8, 2 * dp + lane / 16));
          M::mma(o[2 * dp], hi, b[0], b[1]);
          M::mma(o[2 * dp], lo, b[0], b[1]);
          M::mma(o[2 * dp + 1], hi, b[2], b[3]);
          M::mma(o[2 * dp + 1], lo, b[2], b[3]);
        }
      }
    }
    cp_async_wait_all();   // tile j + 1 has landed, and every warp is done with tile j's buffers
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int t = row0 + warp * 16 + g + r * 8;
    if (t >= tokens) continue;
    TO* dst = out + (size_t)t * q_dim + (size_t)h * D + c2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      dst[n * 8] = from_f32<TO>(o[n][2 * r] / l[r]);
      dst[n * 8 + 1] = from_f32<TO>(o[n][2 * r + 1] / l[r]);
    }
  }
}
#endif

// ---- SIMT path ------------------------------------------------------------------------------------
// Rows first .. first + n - 1 of src (row stride `stride`) into dst (row stride ld) as f32, a warp per
// row; rows >= limit and the dims from head_dim up to a multiple of 4 are zeros.
template <typename T>
__device__ __forceinline__ void prefill_stage_f32(float* dst, int ld, const T* __restrict__ src, int stride, int first,
                                                  int n, int limit, int head_dim) {
  for (int r = threadIdx.x / 32; r < n; r += PREFILL_ATTN_THREADS / 32)
    for (int d = threadIdx.x % 32; d < ((head_dim + 3) & ~3); d += 32)
      dst[r * ld + d] = first + r < limit && d < head_dim ? to_f32(src[(size_t)(first + r) * stride + d]) : 0.0f;
}

// The tile's rows in passes of 4R (R rows per warp, prefill_simt_rows). Per pass the block walks
// 32-key tiles: K staged (f32), lane j scores key j for the warp's R rows, the weights go to the warp's
// slot in shared memory; then V staged in K's place and every lane adds the 32 weighted V rows to its
// dims (lane + 32e).
template <int DMAX, typename TQ, typename TKV, typename TO>
__device__ __noinline__ void prefill_simt(const TQ* __restrict__ q, const TKV* __restrict__ k_cache,
                                          const TKV* __restrict__ v_cache, TO* __restrict__ out, int pos0, int tokens,
                                          int head_dim, int q_dim, int kv_dim, int h, int kvh, int tile, float* smem) {
  constexpr int R = prefill_simt_rows(DMAX), ROWS = 4 * R, LD = DMAX + 4, E = DMAX / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d4 = (head_dim + 3) & ~3;   // dims the dot products run over: zeros past head_dim
  float* qs = smem;                     // [ROWS][LD] the pass's query rows
  float* kv = qs + ROWS * LD;           // [32][LD] the key tile's K, then its V
  float* ps = kv + 32 * LD + warp * 32 * R;   // [32][R] the warp's softmax weights, key-major
  const float scale = rsqrtf((float)head_dim);
  const TKV* kh = k_cache + (size_t)kvh * head_dim;
  const TKV* vh = v_cache + (size_t)kvh * head_dim;
  const int row_end = min(tile * PREFILL_ATTN_BQ + PREFILL_ATTN_BQ, tokens);
  for (int r0 = tile * PREFILL_ATTN_BQ; r0 < row_end; r0 += ROWS) {
    __syncthreads();   // the previous pass is done with qs and kv
    prefill_stage_f32(qs, LD, q + (size_t)h * head_dim, q_dim, r0, ROWS, tokens, head_dim);
    const int n_kv = pos0 + min(r0 + ROWS, tokens), pos_w = pos0 + r0 + warp * R;
    float o[R][E], m[R], l[R];   // l: this lane's keys' share of the row sum
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = neg_inf(), l[r] = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) o[r][e] = 0.0f;
    }
    for (int k0 = 0; k0 < n_kv; k0 += 32) {
      __syncthreads();   // qs staged; the last tile's V read
      prefill_stage_f32(kv, LD, kh, kv_dim, k0, 32, n_kv, head_dim);
      __syncthreads();
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = 0.0f;
      for (int d = 0; d < d4; d += 4) {
        const float4 k4 = *reinterpret_cast<const float4*>(kv + lane * LD + d);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float4 q4 = *reinterpret_cast<const float4*>(qs + (warp * R + r) * LD + d);
          s[r] = fmaf(q4.w, k4.w, fmaf(q4.z, k4.z, fmaf(q4.y, k4.y, fmaf(q4.x, k4.x, s[r]))));
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float sc = k0 + lane <= pos_w + r ? s[r] * scale : neg_inf();
        float mx = fmaxf(m[r], sc);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float corr = __expf(m[r] - mx);   // key 0 is in every row's first tile: mx is finite
        m[r] = mx;
        s[r] = __expf(sc - mx);
        l[r] = l[r] * corr + s[r];
#pragma unroll
        for (int e = 0; e < E; ++e) o[r][e] *= corr;
      }
#pragma unroll
      for (int r = 0; r < R; r += 4)
        *reinterpret_cast<float4*>(ps + lane * R + r) = make_float4(s[r], s[r + 1], s[r + 2], s[r + 3]);
      __syncthreads();   // every warp is done with K
      prefill_stage_f32(kv, LD, vh, kv_dim, k0, 32, n_kv, head_dim);
      __syncthreads();
      const int n = min(32, n_kv - k0);
      for (int j = 0; j < n; ++j) {
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = kv[j * LD + lane + 32 * e];   // past head_dim: unused dims
#pragma unroll
        for (int r = 0; r < R; r += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(ps + j * R + r);
          const float p[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < E; ++e) o[r + i][e] = fmaf(p[i], v[e], o[r + i][e]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float sum = l[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const int t = r0 + warp * R + r;
      if (t >= tokens) continue;
      TO* dst = out + (size_t)t * q_dim + (size_t)h * head_dim + lane;
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (lane + 32 * e < head_dim) dst[32 * e] = from_f32<TO>(o[r][e] / sum);
    }
  }
}

// One block: the query tile and head of blockIdx.x, the tiles with the most keys (the last) first so the
// longest blocks do not start last; the heads of a tile are adjacent, so those sharing a KV head read
// its tiles at about the same time (from L2). smem: prefill_attn_smem_bytes(head_dim, sizeof(TKV)),
// 16-byte aligned. head_dim even, <= 256; n_heads a multiple of n_kv_heads.
// The paths are separate functions (__noinline__): inlined together, the run-time head_dim dispatch
// of the generic build took 255 registers and spilled (sm_90); apart, none spills and the kernel takes
// the largest path's registers.
template <typename TQ, typename TKV, typename TO>
__device__ __forceinline__ void prefill_attention(const TQ* __restrict__ q, const TKV* __restrict__ k_cache,
                                                  const TKV* __restrict__ v_cache, TO* __restrict__ out, int pos0, int tokens,
                                                  int n_heads, int n_kv_heads, int head_dim, unsigned char* smem) {
  const int n_tiles = (tokens + PREFILL_ATTN_BQ - 1) / PREFILL_ATTN_BQ;
  const int h = blockIdx.x % n_heads, tile = n_tiles - 1 - (int)(blockIdx.x / n_heads);
  const int kvh = h / (n_heads / n_kv_heads), q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
#if __CUDA_ARCH__ >= 800
  if constexpr (PrefillMma<TQ, TKV>::ok) {
    if (((reinterpret_cast<size_t>(q) | reinterpret_cast<size_t>(k_cache) | reinterpret_cast<size_t>(v_cache)) & 15) == 0) {
      if (head_dim == 64) return prefill_mma<64>(q, k_cache, v_cache, out, pos0, tokens, q_dim, kv_dim, h, kvh, tile, smem);
      if (head_dim == 128) return prefill_mma<128>(q, k_cache, v_cache, out, pos0, tokens, q_dim, kv_dim, h, kvh, tile, smem);
    }
  }
#endif
  float* fs = reinterpret_cast<float*>(smem);
  if (head_dim <= 64) prefill_simt<64>(q, k_cache, v_cache, out, pos0, tokens, head_dim, q_dim, kv_dim, h, kvh, tile, fs);
  else if (head_dim <= 128) prefill_simt<128>(q, k_cache, v_cache, out, pos0, tokens, head_dim, q_dim, kv_dim, h, kvh, tile, fs);
  else prefill_simt<256>(q, k_cache, v_cache, out, pos0, tokens, head_dim, q_dim, kv_dim, h, kvh, tile, fs);
}
}  // namespace dtf
