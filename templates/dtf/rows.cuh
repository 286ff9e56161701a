#pragma once
// dtf/rows.cuh: the row-parallel kernels' building blocks: staging an input vector in shared memory, the
// RMSNorm prologue, RowsDot (a warp's grid-stride, double-buffered weight stream) and EarlyScale.
// The target's kernels.cu defines DTF_FP8, DTF_ARITH_F16, DTF_ARITH_BF16, DTF_PDL and the tuning
// macros before including it (templates/kernels.cu.j2).

// ---- building blocks shared by the row-parallel kernels ------------------------------------
namespace dtf {
// 1 / sqrt(mean(x^2) + eps) over x[0..n), squares summed in A, result in C; every thread of the
// block gets it. `red` is 32 floats of shared memory.
template <typename C, typename A, typename X>
__device__ __forceinline__ C block_rms_inv(const X* __restrict__ x, int n, float eps, A* red) {
  A ss = from_f32<A>(0.0f);
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    C v = cvt<C>(x[i]);
    ss = fma_acc(v, v, ss);
  }
  ss = warp_sum(ss);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  A s = lane < (int)(blockDim.x / 32) ? red[lane] : from_f32<A>(0.0f);
  s = warp_sum(s);
  return from_f32<C>(rsqrtf(to_f32(s) / (float)n + eps));
}

// Exact widening of one 16-byte vector of W to f32, with throughput in mind: f16/fp8 pairs go
// through the packed conversions, bf16 is a shift and int8 pairs an f16 magic number, so the GEMV
// is bound by memory, not by the SM's (16 per clock) scalar conversion unit.
template <typename W> struct Widen;
template <> struct Widen<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void run(const uint4& r, float* o) {
    o[0] = __uint_as_float(r.x); o[1] = __uint_as_float(r.y); o[2] = __uint_as_float(r.z); o[3] = __uint_as_float(r.w);
  }
};
template <> struct Widen<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void run(const uint4& r, float* o) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 f = __half22float2(h[i]); o[2 * i] = f.x; o[2 * i + 1] = f.y; }
  }
};
template <> struct Widen<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void run(const uint4& r, float* o) {
    const unsigned u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { o[2 * i] = __uint_as_float(u[i] << 16); o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u); }
  }
};
#if DTF_FP8

template <> struct Widen<__nv_fp8_e4m3> {
  static constexpr int N = 16;
  __device__ __forceinline__ static void run(const uint4& r, float* o) {
    const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&r);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3)));
      o[2 * i] = f.x; o[2 * i + 1] = f.y;
    }
  }
};
#endif
// int8 through f16 pairs (sm_80+): with t = q + 128 (q's byte with its top bit flipped), the f16 of
// bits 0x64tt is 1024 + t exactly, so one byte permute builds two such halves from two bytes, one
// packed f16 subtraction of 1152 gives q exactly, and the f16 -> f32 conversion follows as for f16
// weights: 2.25 instructions per weight where the f32 magic number takes 3.3 (H200: SmolLM2 int8
// 0.457 -> 0.426 ms/token, docs/benchmarks.md). Older GPUs, whose f16 arithmetic is slow or emulated
// (Maxwell, Pascal) or unmeasured (Volta, Turing), keep the f32 magic number: 2^23 + (q + 128),
// exactly, minus 2^23 + 128. Both are exact.
template <> struct Widen<signed char> {
  static constexpr int N = 16;
  __device__ __forceinline__ static void run(const uint4& r, float* o) {
#if __CUDA_ARCH__ >= 800
    const unsigned u[4] = {r.x ^ 0x80808080u, r.y ^ 0x80808080u, r.z ^ 0x80808080u, r.w ^ 0x80808080u};
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));   // 1152
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned lo = __byte_perm(u[i], 0x64646464u, 0x4140), hi = __byte_perm(u[i], 0x64646464u, 0x4342);
      float2 a = __half22float2(__hsub2(*reinterpret_cast<const __half2*>(&lo), bias));
      float2 b = __half22float2(__hsub2(*reinterpret_cast<const __half2*>(&hi), bias));
      o[4 * i] = a.x; o[4 * i + 1] = a.y; o[4 * i + 2] = b.x; o[4 * i + 3] = b.y;
    }
#else
    const unsigned u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int b = 0; b < 4; ++b)
        o[4 * i + b] = __uint_as_float(0x4b000000u | (((u[i] >> (8 * b)) & 0xffu) ^ 0x80u)) - 8388736.0f;
#endif
  }
};

// Whether every value of W is exact in C (then a widened weight needs no rounding to C).
template <typename W, typename C> struct ExactIn { static constexpr bool value = false; };
template <typename W> struct ExactIn<W, float> { static constexpr bool value = true; };
template <> struct ExactIn<__half, __half> { static constexpr bool value = true; };
template <> struct ExactIn<__nv_bfloat16, __nv_bfloat16> { static constexpr bool value = true; };
template <> struct ExactIn<signed char, __half> { static constexpr bool value = true; };
template <> struct ExactIn<signed char, __nv_bfloat16> { static constexpr bool value = true; };
#if DTF_FP8

template <> struct ExactIn<__nv_fp8_e4m3, __half> { static constexpr bool value = true; };
template <> struct ExactIn<__nv_fp8_e4m3, __nv_bfloat16> { static constexpr bool value = true; };
#endif

template <typename C> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<C>(v)); }

// x[0..n) widened exactly to f32 into shared memory: 16-byte loads, several in flight per thread
// (a scalar loop would wait out one memory latency per element it strides over). With tvec > 0 the
// vector is stored in the layout RowsDot reads: the lanes of a warp each hold one tvec-wide weight
// vector v, and read its inputs as tvec/4 float4 chunks c; chunk (c, v) sits at float4 index
// c * (n / tvec) + v, so the lanes read consecutive 16-byte words, without bank conflicts. (In
// order, lane i would read at i * tvec floats: a 2-way (f16) or 4-way (fp8, int8) conflict on every
// read.) f32 weights (tvec 4) keep the order.
template <typename X>
__device__ __forceinline__ void load_f32(const X* __restrict__ x, int n, float* xs, int tvec) {
  constexpr int VEC = Widen<X>::N;
  int nt = tvec ? n / tvec : 0, sh = __ffs(tvec) - 1;   // tvec is a power of two (a Widen<W>::N)
  auto at = [=](int j) { return tvec ? ((((j & (tvec - 1)) >> 2) * nt + (j >> sh)) << 2) + (j & 3) : j; };
  int j0 = 0;
  if ((n % VEC) == 0 && (reinterpret_cast<size_t>(x) % 16) == 0) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
#pragma unroll 4
    for (int v = threadIdx.x; v < n / VEC; v += blockDim.x) {
      float f[VEC];
      Widen<X>::run(__ldg(xv + v), f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xs[at(v * VEC + k)] = f[k];
    }
    j0 = n;
  }
  for (int i = j0 + threadIdx.x; i < n; i += blockDim.x) xs[at(i)] = to_f32(x[i]);
  __syncthreads();
}

// The normalized vector, as an RMSNorm kernel would store it (rounded to NO), then rounded to the
// GEMV's compute dtype C, staged as f32 in shared memory for every warp of the block to read.
// x is read from global memory once (into xs), squared and normalized in place; gs holds the norm
// weight widened exactly to f32 in the same layout (load_f32 of gamma with the same tvec, done
// before the kernel waits for its inputs: gamma is a weight, so it costs no memory round trip after
// the wait). The math is elementwise, so the layout (tvec) does not change it.
template <typename NC, typename NA, typename NO, typename C, typename X>
__device__ __forceinline__ void stage_rmsnorm(const X* __restrict__ x, const float* gs, int n, float eps, float* xs, int tvec) {
  __shared__ NA red[32];
  load_f32(x, n, xs, tvec);
  NC inv = block_rms_inv<NC, NA>(xs, n, eps, red);
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    xs[i] = to_f32(cvt<C>(cvt<NO>(mul(mul(cvt<NC>(xs[i]), inv), from_f32<NC>(gs[i])))));
  __syncthreads();
}

// x rounded to the compute dtype C, staged as f32 in shared memory (layout as load_f32), read once per block.
template <typename C, typename X>
__device__ __forceinline__ void stage(const X* __restrict__ x, int n, float* xs, int tvec) {
  load_f32(x, n, xs, tvec);
  if (!ExactIn<X, C>::value) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = round_to<C>(xs[i]);
    __syncthreads();
  }
}

// A warp's share of a GEMV: row groups g = first, first + stride, ... < n_groups (grid-stride, so a
// grid of one wave covers any number of rows), each group R weight rows dotted with one staged
// vector. The warp's work is one stream of batches (U 16-byte loads per row and lane), double
// buffered across batches and across row groups: while one batch is consumed the next is in flight,
// so rows stream without a bubble, and the next group's first loads overlap this group's reduction.
// `start` issues the first two batches (weights depend on nothing), the kernel then stages its input
// (RMSNorm, GEMV input), and `run` consumes the stream, calling epi(g, sums) per group (all lanes get
// the sums). 2 * DTF_GEMV_LOADS loads in flight per lane; DTF_GEMV_LOADS is the device spec's
// tuning.gemv_loads. Weights are widened exactly (and rounded to C where C is narrower than W);
// exact products are summed in A. rows_of(g, wr) names group g's R row pointers.
template <typename C, typename A, typename W, int R, typename RowsOf>
struct RowsDot {
  static constexpr int VEC = Widen<W>::N;
  static constexpr int U = DTF_GEMV_LOADS / R;
  RowsOf rows_of;
  int cols, lane, nv, nb, first, stride, n_flat, rot;
  bool vec;
  uint4 raw[2][R][U];
  A acc[R];

  __device__ __forceinline__ RowsDot(RowsOf rows_of_) : rows_of(rows_of_) {}

  // flat batch f -> its row group and the lane's first vector index in each row. Batch f % nb of a group
  // reads the row's batch (f + rot) % nb: with rot = the warp's index (rows of at least
  // DTF_GEMV_ROTATE_BATCHES batches, the device spec's tuning.gemv_rotate_batches), neighbouring warps
  // read different parts of their rows at a time, not every row's first 4 KiB together, which the
  // H200's memory serves faster: the 1B down projection (16 KiB rows, 4 batches) 11.6 -> 10.7 us
  // alone, and 0.763 -> 0.744 ms/token (docs/benchmarks.md); rows of 2 batches measured slower rotated.
  __device__ __forceinline__ int group_of(int f) const { return first + (f / nb) * stride; }
  __device__ __forceinline__ int vec_of(int f) const { return lane + 32 * U * ((f + rot) % nb); }

  template <int S> __device__ __forceinline__ void load(int f) {
    const W* wr[R];
    rows_of(group_of(f), wr);
    int v = vec_of(f);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        raw[S][r][u] = v + 32 * u < nv ? __ldg(reinterpret_cast<const uint4*>(wr[r]) + v + 32 * u) : make_uint4(0, 0, 0, 0);
  }

  template <int S, typename Epi> __device__ __forceinline__ void consume(const float* __restrict__ xs, int f, Epi& epi) {
    int v = vec_of(f);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v + 32 * u >= nv) break;
      float xj[VEC];                          // the vector's inputs: VEC/4 float4 chunks (load_f32's layout)
#pragma unroll
      for (int c = 0; c < VEC / 4; ++c) {
        float4 q = reinterpret_cast<const float4*>(xs)[c * nv + v + 32 * u];
        xj[4 * c] = q.x; xj[4 * c + 1] = q.y; xj[4 * c + 2] = q.z; xj[4 * c + 3] = q.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float w[VEC];
        Widen<W>::run(raw[S][r][u], w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float wc = ExactIn<W, C>::value ? w[k] : round_to<C>(w[k]);
          acc[r] = from_f32<A>(fmaf(wc, xj[k], to_f32(acc[r])));
        }
      }
    }
    if (f % nb == nb - 1) {                  // the group's last batch: reduce, hand over, start afresh
      A out[R];
#pragma unroll
      for (int r = 0; r < R; ++r) { out[r] = warp_sum(acc[r]); acc[r] = from_f32<A>(0.0f); }
      epi(group_of(f), out);
    }
  }

  // This warp's share in a grid-stride launch: group first = its global warp index, stride = all warps.
  __device__ __forceinline__ void start(int n_groups, int cols_) {
    int warps = blockDim.x / 32;
    cols = cols_, lane = threadIdx.x % 32, first = blockIdx.x * warps + threadIdx.x / 32, stride = gridDim.x * warps;
    nv = cols / VEC;
    nb = max(1, (nv + 32 * U - 1) / (32 * U));
    rot = DTF_GEMV_ROTATE_BATCHES > 0 && nb >= DTF_GEMV_ROTATE_BATCHES ? first % nb : 0;
    n_flat = first < n_groups ? ((n_groups - 1 - first) / stride + 1) * nb : 0;
    vec = (cols % VEC) == 0;
    if (vec && first < n_groups) {   // rows start at multiples of cols: the first group's alignment is every group's
      const W* wr[R];
      rows_of(first, wr);
#pragma unroll
      for (int r = 0; r < R; ++r) vec = vec && (reinterpret_cast<size_t>(wr[r]) % 16) == 0;
    }
    if (vec && n_flat > 0) load<0>(0);
    if (vec && n_flat > 1) load<1>(1);
  }

  // The layout `run` reads the staged vector in (load_f32's tvec): transposed by VEC on the vector path.
  __device__ __forceinline__ int tvec() const { return vec ? VEC : 0; }

  template <typename Epi> __device__ __forceinline__ void run(const float* __restrict__ xs, Epi epi) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = from_f32<A>(0.0f);
    if (vec) {
      for (int f = 0; f < n_flat; f += 2) {
        consume<0>(xs, f, epi);
        if (f + 2 < n_flat) load<0>(f + 2);
        if (f + 1 < n_flat) {
          consume<1>(xs, f + 1, epi);
          if (f + 3 < n_flat) load<1>(f + 3);
        }
      }
      return;
    }
    for (int f = 0; f < n_flat; f += nb) {   // unaligned or ragged rows: scalar loads
      const W* wr[R];
      int g = group_of(f);
      rows_of(g, wr);
      A out[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        A a = from_f32<A>(0.0f);
        for (int j = lane; j < cols; j += 32) a = fma_acc(cvt<C>(wr[r][j]), cvt<C>(xs[j]), a);
        out[r] = warp_sum(a);
      }
      epi(g, out);
    }
  }
};

// A per-output-channel scale (a weight) whose first row is read before the kernel waits: the
// epilogue of a warp's first row group then costs no memory round trip after the dot product, and
// later groups read theirs. `lead`: this lane runs the epilogue and the warp has a first group.
template <typename S> struct EarlyScale {
  const S* __restrict__ scale;
  int first;
  float v;
  __device__ __forceinline__ EarlyScale(const S* __restrict__ s, int first_row, bool lead)
      : scale(s), first(first_row), v(lead ? to_f32(s[first_row]) : 0.0f) {}
  __device__ __forceinline__ float operator()(int row) const { return row == first ? v : to_f32(scale[row]); }
};

// The best (value, index) a thread has seen; the lowest index wins ties, as numpy's argmax, and a
// NaN never wins. The order values are seen in does not change the result.
struct ArgBest {
  float v = neg_inf();
  int i = 0x7fffffff;
  __device__ __forceinline__ void see(float x, int j) { if (x > v || (x == v && j < i)) { v = x; i = j; } }
  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) see(__shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  }
  __device__ __forceinline__ int index() const { return i == 0x7fffffff ? 0 : i; }   // all NaN or empty: 0
  // every thread's best reduced over the block; the block's best is returned to every thread
  __device__ __forceinline__ ArgBest block_reduce() {
    __shared__ float sv[32];
    __shared__ int si[32];
    warp_reduce();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();   // sv/si free (a second call in the same kernel)
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    ArgBest b;
    if (lane < nw) { b.v = sv[lane]; b.i = si[lane]; }
    b.warp_reduce();
    return b;
  }
};

// argmax over every block's rows of a grid-stride kernel, and pos += 1, without another launch:
// each block publishes its best in work (after a counter), the last block to finish reduces them,
// writes the token, advances pos and zeroes the counter for the next step. Which block is last
// does not change the token (ArgBest's order does not matter). Call from every thread of the block.
__device__ __forceinline__ void grid_argmax(ArgBest best, unsigned char* __restrict__ work, int* __restrict__ token,
                                            int* __restrict__ pos) {
  __shared__ bool last;
  unsigned* counter = reinterpret_cast<unsigned*>(work);
  int2* parts = reinterpret_cast<int2*>(work + 8);
  best = best.block_reduce();
  if (threadIdx.x == 0) {
    parts[blockIdx.x] = make_int2(__float_as_int(best.v), best.i);
    __threadfence();                          // the part is visible before the count says so
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  ArgBest all;
  for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
    int2 p = __ldcg(parts + b);
    all.see(__int_as_float(p.x), p.y);
  }
  all = all.block_reduce();
  if (threadIdx.x == 0) {
    token[0] = all.index();
    pos[0] += 1;
    *counter = 0;
  }
}

}  // namespace dtf
