#pragma once
// dtf/attention.cuh: decode attention shared by the attention kernels (split-KV, online softmax, GQA).
// The target's kernels.cu defines DTF_FP8, DTF_ARITH_F16, DTF_ARITH_BF16, DTF_PDL and the tuning
// macros before including it (templates/kernels.cu.j2).

// ---- decode attention, shared by the attention kernels ---------------------------------------
// Single-query attention of one q head over positions 0..pos of one layer's KV cache, grouped-query
// heads. One block (the device's tuning.attn_threads) per q head and DTF_ATTN_SPLIT positions (split-KV, as flash-decoding: a
// long context spreads over many SMs); each warp takes chunks of 8 positions in turn and keeps an
// online softmax; the warps' partial results are merged at the end, and with several splits the last
// block of a head to finish merges the splits' partials (kept in the kernel's workspace). q, k, v and
// softmax weights are rounded to C, exact products summed in A, softmax in f32. Latency, not
// bandwidth, bounds this at batch 1, so the fast path loads a chunk's K and V rows together
// (16-byte vectors, into registers), those of earlier positions before the kernel waits for the
// previous one, and stages q meanwhile: one L2 round trip (q, row pos) on the critical path.
#define DTF_ATTN_SPLIT DTF_ATTN_THREADS   // positions per split: four 8-position chunks per warp
#define DTF_ATTN_MIN_BLOCKS (512 / DTF_ATTN_THREADS)   // launch bounds: at most 128 registers per thread
namespace dtf {
constexpr int ATTN_WARPS = DTF_ATTN_THREADS / 32;

// Shared memory of one block: q in the compute dtype, and each warp's online-softmax partial (running
// max m, sum l, unnormalized output o), merged at the end.
template <typename C> struct AttnSmem {
  static constexpr int NW = ATTN_WARPS;
  C qs[DTF_ATTN_MAX_HEAD_DIM];
  float m_s[NW], l_s[NW];
  float o_s[NW][DTF_ATTN_MAX_HEAD_DIM];
  bool last;

  // out[d] = sum_w o_w[d] e^(m_w - M) / sum_w l_w e^(m_w - M), M the largest m_w, handed to emit(d, out[d]);
  // warps that saw no position (m_w = -inf) are skipped. Block-wide, after the partials are stored and
  // synchronized. With `part`, the block's own partial is stored unnormalized instead: {M, L, O[0..head_dim)}.
  template <typename Emit> __device__ __forceinline__ void merge(int head_dim, float* part, Emit emit) const {
    float M = neg_inf();
    for (int w = 0; w < NW; ++w) M = fmaxf(M, m_s[w]);
    float L = 0.0f;
    for (int w = 0; w < NW; ++w) L += m_s[w] == neg_inf() ? 0.0f : l_s[w] * __expf(m_s[w] - M);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float acc = 0.0f;
      for (int w = 0; w < NW; ++w)
        if (m_s[w] != neg_inf()) acc += o_s[w][d] * __expf(m_s[w] - M);
      if (part) part[2 + d] = acc;
      else emit(d, acc / L);
    }
    if (part && threadIdx.x == 0) { part[0] = M; part[1] = L; }
  }
};

// The splits' partials of one head ({M, L, O} each, written by other blocks of this launch: read
// through L2) merged as the warps' are: out[d] = sum_s O_s[d] e^(M_s - M) / sum_s L_s e^(M_s - M).
template <typename Emit>
__device__ __forceinline__ void attn_merge_splits(const float* parts, int n, int head_dim, Emit emit) {
  int stride = head_dim + 2;
  float M = neg_inf();
  for (int s = 0; s < n; ++s) M = fmaxf(M, __ldcg(parts + s * stride));
  float L = 0.0f;
  for (int s = 0; s < n; ++s) L += __ldcg(parts + s * stride + 1) * __expf(__ldcg(parts + s * stride) - M);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < n; ++s) acc += __ldcg(parts + s * stride + 2 + d) * __expf(__ldcg(parts + s * stride) - M);
    emit(d, acc / L);
  }
}

// One block's share of one head: construct, return if !active(), prefetch(), wait for the previous
// kernel, then run(), which hands the head's output to emit(d, value) on the block that finishes it
// (and returns true there). The block is (split, head) = blockIdx.x / n_heads, blockIdx.x % n_heads.
template <typename C, typename A, typename Q, typename KC, typename VC>
struct AttnHead {
  // LPP lanes score one position, a quarter of the dims each (KN vectors of KVEC); a V row is split
  // over LPR lanes of VVEC dims, RPL rows per warp-wide load, VN loads per lane per chunk.
  static constexpr int NW = ATTN_WARPS, CHUNK = 8, LPP = 32 / CHUNK, KVEC = Widen<KC>::N, VVEC = Widen<VC>::N,
                       KMAX = 8, VMAX = 8;
  const Q* __restrict__ q;
  const KC* __restrict__ k_cache;
  const VC* __restrict__ v_cache;
  AttnSmem<C>& sh;
  int cur, seq, kv_dim, n_heads, head_dim, h, split, n_splits, n_active, lo, hi;
  int quarter, kn, lpr, rpl, kvh, warp, lane, vn, sub, vrow, vcol, first;
  bool fast;
  const KC* kbase;
  const VC* vbase;
  uint4 kr[KMAX], vr[VMAX];

  // pos and the cache rows before it were written by earlier decode steps, complete before this step
  // began (a step is one graph launch; an eager step's first launch does not overlap the last step),
  // so they are read before waiting for the previous kernel; only row pos is written by it.
  __device__ __forceinline__ AttnHead(const Q* q_, const KC* k_, const VC* v_, const int* __restrict__ pos, int n_heads_,
                                      int n_kv_heads, int head_dim_, int max_seq, AttnSmem<C>& sh_)
      : q(q_), k_cache(k_), v_cache(v_), sh(sh_), n_heads(n_heads_), head_dim(head_dim_) {
    cur = pos[0], seq = cur + 1, kv_dim = n_kv_heads * head_dim;
    h = blockIdx.x % n_heads, split = blockIdx.x / n_heads;
    n_splits = (max_seq + DTF_ATTN_SPLIT - 1) / DTF_ATTN_SPLIT, n_active = (seq + DTF_ATTN_SPLIT - 1) / DTF_ATTN_SPLIT;
    lo = split * DTF_ATTN_SPLIT, hi = min(seq, lo + DTF_ATTN_SPLIT);
    quarter = head_dim / LPP, kn = quarter / KVEC, lpr = head_dim / VVEC, rpl = lpr > 0 ? 32 / lpr : 0;
    kvh = h / (n_heads / n_kv_heads), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    fast = head_dim % (LPP * KVEC) == 0 && kn <= KMAX && head_dim % VVEC == 0 && lpr > 0 && lpr <= 32 && 32 % lpr == 0
           && CHUNK % rpl == 0 && CHUNK / rpl <= VMAX
           && (reinterpret_cast<size_t>(k_cache) % 16) == 0 && (reinterpret_cast<size_t>(v_cache) % 16) == 0;
    if (!fast) return;
    vn = CHUNK / rpl, sub = lane % LPP, vrow = lane / lpr, vcol = (lane % lpr) * VVEC;
    kbase = k_cache + (size_t)kvh * head_dim + sub * quarter;
    vbase = v_cache + (size_t)kvh * head_dim + vcol;
    first = lo + warp * CHUNK;
  }

  // Splits past pos have nothing to do; the general path runs every position in split 0's block.
  __device__ __forceinline__ bool active() const { return split < n_active && (fast || split == 0); }

  // K and V rows of the chunk at t0 whose positions lie in [from, to); other registers keep their
  // values (positions >= hi are masked out of the softmax and the V sum)
  __device__ __forceinline__ void load_chunk(int t0, int from, int to) {
    int t = t0 + lane / LPP;
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
      if (i < kn && t >= from && t < to) kr[i] = __ldg(reinterpret_cast<const uint4*>(kbase + (size_t)t * kv_dim) + i);
#pragma unroll
    for (int i = 0; i < VMAX; ++i) {
      int tv = t0 + vrow + i * rpl;
      if (i < vn && tv >= from && tv < to) vr[i] = __ldg(reinterpret_cast<const uint4*>(vbase + (size_t)tv * kv_dim));
    }
  }

  // Before the wait: the earlier steps' rows of the warp's first chunk go in flight.
  __device__ __forceinline__ void prefetch() {
    if (!fast) return;
#pragma unroll
    for (int i = 0; i < KMAX; ++i) kr[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < VMAX; ++i) vr[i] = make_uint4(0, 0, 0, 0);
    if (first < min(cur, hi)) load_chunk(first, 0, min(cur, hi));
  }

  // After the wait. `work` is the kernel's workspace (the splits' partials and per-head counters).
  template <typename Emit> __device__ __forceinline__ bool run(unsigned char* __restrict__ work, Emit emit) {
    if (!fast) {
      generic(emit);
      return true;
    }
    if (first <= cur && cur < first + CHUNK) load_chunk(first, cur, seq);   // row pos, written by the previous kernel
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) sh.qs[d] = cvt<C>(q[(size_t)h * head_dim + d]);
    __syncthreads();
    float scale = rsqrtf((float)head_dim), m = neg_inf(), l = 0.0f;
    A o[VVEC];
#pragma unroll
    for (int e = 0; e < VVEC; ++e) o[e] = from_f32<A>(0.0f);
    for (int t0 = first; t0 < hi; t0 += NW * CHUNK) {
      int t = t0 + lane / LPP;
      A dot = from_f32<A>(0.0f);
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
        if (i >= kn) break;
        float kf[KVEC];
        Widen<KC>::run(kr[i], kf);
#pragma unroll
        for (int e = 0; e < KVEC; ++e) dot = fma_acc(sh.qs[sub * quarter + i * KVEC + e], from_f32<C>(kf[e]), dot);
      }
#pragma unroll
      for (int off = LPP / 2; off > 0; off >>= 1) dot = add(dot, __shfl_xor_sync(0xffffffffu, dot, off));
      float s = t < hi ? to_f32(dot) * scale : neg_inf();
      float cmax = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
      float m_new = fmaxf(m, cmax);
      float corr = __expf(m - m_new);
      float pw = t < hi ? __expf(s - m_new) : 0.0f;
      float psum = sub == 0 ? pw : 0.0f;          // each position's score is held by its LPP lanes
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
      l = l * corr + psum;
      m = m_new;
#pragma unroll
      for (int e = 0; e < VVEC; ++e) o[e] = from_f32<A>(to_f32(o[e]) * corr);
#pragma unroll
      for (int i = 0; i < VMAX; ++i) {
        if (i >= vn) break;
        int r = vrow + i * rpl;                   // this lane's V row of the chunk; its weight is on lane r * LPP
        C pc = from_f32<C>(__shfl_sync(0xffffffffu, pw, r * LPP));
        float vf[VVEC];
        Widen<VC>::run(vr[i], vf);
        if (t0 + r < hi) {
#pragma unroll
          for (int e = 0; e < VVEC; ++e) o[e] = fma_acc(pc, from_f32<C>(vf[e]), o[e]);
        }
      }
      if (t0 + NW * CHUNK < hi) load_chunk(t0 + NW * CHUNK, 0, hi);
    }
    // lanes holding the same dims (lane % lpr) sum their rows' contributions
#pragma unroll
    for (int e = 0; e < VVEC; ++e)
      for (int off = lpr; off < 32; off <<= 1) o[e] = add(o[e], __shfl_xor_sync(0xffffffffu, o[e], off));
    if (lane == 0) { sh.m_s[warp] = m; sh.l_s[warp] = l; }
    if (lane < lpr) {
#pragma unroll
      for (int e = 0; e < VVEC; ++e) sh.o_s[warp][vcol + e] = to_f32(o[e]);
    }
    __syncthreads();
    if (n_active == 1) {
      sh.merge(head_dim, nullptr, emit);
      return true;
    }
    // several splits: store this block's partial; the head's last block to finish merges them all
    float* parts = reinterpret_cast<float*>(work) + (size_t)h * n_splits * (head_dim + 2);
    int* done = reinterpret_cast<int*>(reinterpret_cast<float*>(work) + (size_t)n_heads * n_splits * (head_dim + 2)) + h;
    sh.merge(head_dim, parts + (size_t)split * (head_dim + 2), emit);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      sh.last = atomicAdd(done, 1) == n_active - 1;
      if (sh.last) *done = 0;                         // every split has arrived: ready for the next launch
    }
    __syncthreads();
    if (!sh.last) return false;
    __threadfence();
    attn_merge_splits(parts, n_active, head_dim, emit);
    return true;
  }

  // The general path: any head_dim up to DTF_ATTN_MAX_HEAD_DIM and any KV alignment, every position in
  // one block. Chunks of 8 positions; within a chunk 4 lanes score one position, then the chunk's V
  // rows are accumulated with lanes over head dims.
  template <typename Emit> __device__ __forceinline__ void generic(Emit emit) {
    constexpr int PER_LANE = DTF_ATTN_MAX_HEAD_DIM / 32;
    C* qs = sh.qs;
    int kvh_off = kvh * head_dim;
    float scale = rsqrtf((float)head_dim);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = cvt<C>(q[(size_t)h * head_dim + d]);
    __syncthreads();
    A o[PER_LANE];
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) o[e] = from_f32<A>(0.0f);
    float m = neg_inf(), l = 0.0f;
    constexpr int KV = 16 / sizeof(KC);
    int quarter_ = head_dim / LPP, sub_ = lane % LPP;
    bool kvec = (quarter_ % KV) == 0 && ((kv_dim * sizeof(KC)) % 16) == 0 && ((kvh_off * sizeof(KC)) % 16) == 0
                && (head_dim % LPP) == 0 && (reinterpret_cast<size_t>(k_cache) % 16) == 0;
    for (int t0 = warp * CHUNK; t0 < seq; t0 += NW * CHUNK) {
      int t = t0 + lane / LPP;
      const KC* kt = k_cache + (size_t)t * kv_dim + kvh_off;
      A dot = from_f32<A>(0.0f);
      if (t < seq) {
        if (kvec) {
#pragma unroll 4
          for (int d = sub_ * quarter_; d < (sub_ + 1) * quarter_; d += KV) {
            uint4 raw = __ldg(reinterpret_cast<const uint4*>(kt + d));
            const KC* kk = reinterpret_cast<const KC*>(&raw);
#pragma unroll
            for (int e = 0; e < KV; ++e) dot = fma_acc(qs[d + e], cvt<C>(kk[e]), dot);
          }
        } else {
          for (int d = sub_; d < head_dim; d += LPP) dot = fma_acc(qs[d], cvt<C>(kt[d]), dot);
        }
      }
#pragma unroll
      for (int off = LPP / 2; off > 0; off >>= 1) dot = add(dot, __shfl_xor_sync(0xffffffffu, dot, off));
      float s = t < seq ? to_f32(dot) * scale : neg_inf();
      float cmax = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
      float m_new = fmaxf(m, cmax);
      float corr = __expf(m - m_new);
      float pw = t < seq ? __expf(s - m_new) : 0.0f;
      float psum = sub_ == 0 ? pw : 0.0f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
      l = l * corr + psum;
      m = m_new;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) o[e] = from_f32<A>(to_f32(o[e]) * corr);
      int n = min(CHUNK, seq - t0);
#pragma unroll
      for (int tt = 0; tt < CHUNK; ++tt) {
        if (tt >= n) break;
        C pc = from_f32<C>(__shfl_sync(0xffffffffu, pw, tt * LPP));
        const VC* vt = v_cache + (size_t)(t0 + tt) * kv_dim + kvh_off;
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) {
          int d = lane + 32 * e;
          if (d < head_dim) o[e] = fma_acc(pc, cvt<C>(__ldg(vt + d)), o[e]);
        }
      }
    }
    if (lane == 0) { sh.m_s[warp] = m; sh.l_s[warp] = l; }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e)
      if (lane + 32 * e < head_dim) sh.o_s[warp][lane + 32 * e] = to_f32(o[e]);
    __syncthreads();
    sh.merge(head_dim, nullptr, emit);
  }
};
// The whole context of one head in one block (max_seq <= DTF_ATTN_SPLIT, so one split): AttnHead's
// fast path without the split bookkeeping, with its state in plain locals. Written apart because, at
// one split, AttnHead's version measured 1% slower on the Llama-3.2-1B shape (H100, 1.032 vs 1.022
// ms/token with the same L2 prefetch; at the 128-register launch bound it needs 130 unbounded, this
// 120). wait() waits for the previous kernel; emit(d, value) takes the head's output.
template <typename C, typename A, typename Q, typename KC, typename VC, typename Wait, typename Emit>
__device__ __forceinline__ void attn_one_block(const Q* __restrict__ q, const KC* __restrict__ k_cache,
    const VC* __restrict__ v_cache, const int* __restrict__ pos, int n_heads, int n_kv_heads, int head_dim, int max_seq,
    AttnSmem<C>& sh, Wait wait, Emit emit) {
  typedef AttnHead<C, A, Q, KC, VC> H;
  constexpr int NW = H::NW, CHUNK = H::CHUNK, LPP = H::LPP, KVEC = H::KVEC, VVEC = H::VVEC, KMAX = H::KMAX, VMAX = H::VMAX;
  int p = pos[0], seq = p + 1, kv_dim = n_kv_heads * head_dim;
  int quarter = head_dim / LPP, kn = quarter / KVEC, lpr = head_dim / VVEC, rpl = lpr > 0 ? 32 / lpr : 0;
  int h = blockIdx.x, kvh = h / (n_heads / n_kv_heads), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bool fast = head_dim % (LPP * KVEC) == 0 && kn <= KMAX && head_dim % VVEC == 0 && lpr > 0 && lpr <= 32 && 32 % lpr == 0
              && CHUNK % rpl == 0 && CHUNK / rpl <= VMAX
              && (reinterpret_cast<size_t>(k_cache) % 16) == 0 && (reinterpret_cast<size_t>(v_cache) % 16) == 0;
  if (!fast) {
    wait();
    H(q, k_cache, v_cache, pos, n_heads, n_kv_heads, head_dim, max_seq, sh).generic(emit);
    return;
  }
  int vn = CHUNK / rpl, sub = lane % LPP, vrow = lane / lpr, vcol = (lane % lpr) * VVEC;
  const KC* kbase = k_cache + (size_t)kvh * head_dim + sub * quarter;
  const VC* vbase = v_cache + (size_t)kvh * head_dim + vcol;
  uint4 kr[KMAX], vr[VMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i) kr[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < VMAX; ++i) vr[i] = make_uint4(0, 0, 0, 0);
  // K and V rows of the chunk at t0 whose positions lie in [lo, hi); other registers keep their values
  // (positions >= seq are masked out of the softmax and the V sum)
  auto load_chunk = [&](int t0, int lo, int hi) {
    int t = t0 + lane / LPP;
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
      if (i < kn && t >= lo && t < hi) kr[i] = __ldg(reinterpret_cast<const uint4*>(kbase + (size_t)t * kv_dim) + i);
#pragma unroll
    for (int i = 0; i < VMAX; ++i) {
      int tv = t0 + vrow + i * rpl;
      if (i < vn && tv >= lo && tv < hi) vr[i] = __ldg(reinterpret_cast<const uint4*>(vbase + (size_t)tv * kv_dim));
    }
  };
  int first = warp * CHUNK;
  if (first < p) load_chunk(first, 0, p);            // earlier steps' rows: in flight before the wait
  wait();
  if (first <= p && p < first + CHUNK) load_chunk(first, p, seq);   // row pos, written by the previous kernel
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) sh.qs[d] = cvt<C>(q[(size_t)h * head_dim + d]);
  __syncthreads();
  float scale = rsqrtf((float)head_dim), m = neg_inf(), l = 0.0f;
  A o[VVEC];
#pragma unroll
  for (int e = 0; e < VVEC; ++e) o[e] = from_f32<A>(0.0f);
  for (int t0 = warp * CHUNK; t0 < seq; t0 += NW * CHUNK) {
    int t = t0 + lane / LPP;
    A dot = from_f32<A>(0.0f);
#pragma unroll
    for (int i = 0; i < KMAX; ++i) {
      if (i >= kn) break;
      float kf[KVEC];
      Widen<KC>::run(kr[i], kf);
#pragma unroll
      for (int e = 0; e < KVEC; ++e) dot = fma_acc(sh.qs[sub * quarter + i * KVEC + e], from_f32<C>(kf[e]), dot);
    }
#pragma unroll
    for (int off = LPP / 2; off > 0; off >>= 1) dot = add(dot, __shfl_xor_sync(0xffffffffu, dot, off));
    float s = t < seq ? to_f32(dot) * scale : neg_inf();
    float cmax = s;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
    float m_new = fmaxf(m, cmax);
    float corr = __expf(m - m_new);
    float pw = t < seq ? __expf(s - m_new) : 0.0f;
    float psum = sub == 0 ? pw : 0.0f;          // each position's score is held by its LPP lanes
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
    l = l * corr + psum;
    m = m_new;
#pragma unroll
    for (int e = 0; e < VVEC; ++e) o[e] = from_f32<A>(to_f32(o[e]) * corr);
#pragma unroll
    for (int i = 0; i < VMAX; ++i) {
      if (i >= vn) break;
      int r = vrow + i * rpl;                   // this lane's V row of the chunk; its weight is on lane r * LPP
      C pc = from_f32<C>(__shfl_sync(0xffffffffu, pw, r * LPP));
      float vf[VVEC];
      Widen<VC>::run(vr[i], vf);
      if (t0 + r < seq) {
#pragma unroll
        for (int e = 0; e < VVEC; ++e) o[e] = fma_acc(pc, from_f32<C>(vf[e]), o[e]);
      }
    }
    if (t0 + NW * CHUNK < seq) load_chunk(t0 + NW * CHUNK, 0, seq);
  }
  // lanes holding the same dims (lane % lpr) sum their rows' contributions
#pragma unroll
  for (int e = 0; e < VVEC; ++e)
    for (int off = lpr; off < 32; off <<= 1) o[e] = add(o[e], __shfl_xor_sync(0xffffffffu, o[e], off));
  if (lane == 0) { sh.m_s[warp] = m; sh.l_s[warp] = l; }
  if (lane < lpr) {
#pragma unroll
    for (int e = 0; e < VVEC; ++e) sh.o_s[warp][vcol + e] = to_f32(o[e]);
  }
  __syncthreads();
  sh.merge(head_dim, nullptr, emit);
}
}  // namespace dtf
