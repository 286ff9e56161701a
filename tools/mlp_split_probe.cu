// mlp_split_probe: the Llama-3.2-1B MLP (f16 policy) as shipped, two kernels per layer, against one
// kernel per layer that splits the down projection over the intermediate dimension.
//
// Shipped (generated/h200.f16.fused): norm + gate/up + SiLU*mul writes act (8192), then down +
// residual reads all of act. The down kernel's 33.5 MB stream starts at that boundary (H200
// timeline, 2026-12-02: down spans 12.3 us for 7.9 us of bytes). Split: block b owns intermediate rows
// [bT, bT+T): it computes their gate/up/SiLU*mul into shared memory and then dots them with the
// matching T columns of the down weight (packed block-major, [S][hidden][T], so each block streams
// one contiguous range) for partial sums of all `hidden` outputs. No boundary between the two streams.
// The partials are then summed one of these ways:
//   ticket        deterministic: partials to global memory, each block takes a ticket, the last S/2 blocks
//                 wait for all and each sums (in a fixed order) a share of the outputs, adds the residual, writes x
//   reduce        deterministic: partials to global memory, a small kernel after it sums them in a fixed
//                 order and adds the residual; "early": that kernel lets the next one launch as it starts
//   atomic        f32 atomicAdd into an accumulator that the next layer's prologue adds to x (order-
//                 dependent sums; three accumulators in rotation so each is zeroed before it is reused);
//                 "x4": one float4 atomic per four rows; "f64": double atomics; "rotated": each block
//                 starts its rows at a different batch, so fewer blocks add to the same address at once
//   none          partials written, not summed (the bound: what the summing costs)
// T is the intermediate rows per block (grid I / T), with 8 or 16 warps per block. "run-time shape": the
// same kernel with hidden, T and the warp count as run-time values (as a generic generated kernel has
// them), so none of its loops has a compile-time trip count.
// The chain of 16 layers (distinct weights, so nothing stays in L2) is captured as one CUDA graph with
// programmatic dependent launch, as runtime/cuda.py launches, and replayed: first the MLP alone, then
// whole layers (the generated q/k/v, attention at 128 positions and o-proj kernels before the MLP).
// Results: docs/benchmarks.md (Tried and lost: the split MLP layout).
//
// Build and run (GPU machine): nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/mlp tools/mlp_split_probe.cu && /tmp/mlp
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <cuda_runtime.h>
#include "../generated/h200.f16.fused/kernels.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); std::exit(1); } } while (0)

#define GATE_UP norm_gemv_swiglu_xf16_gf16_wf16_yf16_ncf32_naf32_nof16_cf16_af32_of16_ecf32
#define DOWN gemv_residual_wf16_if16_xf16_cf16_af32_of16_ecf32_early

constexpr int H = 2048, I = 8192, L = 16, NW = 8;
enum { TICKET = 0, ATOMIC = 1, NONE = 2, ATOMIC4 = 3, ATOMIC64 = 4, REDUCE = 5, REDUCE_EARLY = 6 };
#define IS_ATOMIC(m) ((m) == ATOMIC || (m) == ATOMIC4 || (m) == ATOMIC64)

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <int T_, int MODE, int NW_ = 8, bool ROT = false, bool RT = false>
__global__ void __launch_bounds__(32 * NW_) mlp_split(__half* __restrict__ x, const float* __restrict__ acc_prev,
    float* __restrict__ acc_cur_, float* __restrict__ acc_zero, const __half* __restrict__ gamma,
    const __half* __restrict__ wgu, const __half* __restrict__ wdown, float* __restrict__ part,
    unsigned* __restrict__ counters, float eps, int n_red, int h_arg, int t_arg) {
  DTF_KERNEL_START(0);
  // RT: the shapes are run-time values (hidden, rows per block, warps per block), as a generated kernel
  // has them, so no loop below has a compile-time trip count; otherwise the template's constants
  const int H = RT ? h_arg : ::H, T = RT ? t_arg : T_, NW = RT ? (int)(blockDim.x / 32) : NW_,
            I = RT ? (int)gridDim.x * T : ::I;
  float* acc_cur = acc_cur_;
  extern __shared__ __align__(16) unsigned char probe_smem[];
  float* xs = reinterpret_cast<float*>(probe_smem);
  float* gs = xs + H;
  float* hs = gs + H;            // T floats: this block's act
  float* tmp = hs + T;           // H floats (atomic mode: the pending delta)
  const int S = gridDim.x, b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sweep = S * NW;
  auto rows_of = [=](int g, const __half* (&wr)[2]) {
    int k = g / sweep, w = (g % sweep) % NW, blk = (g % sweep) / NW;
    int r = blk * T + w + NW * k;
    wr[0] = wgu + (size_t)r * H;
    wr[1] = wgu + (size_t)(I + r) * H;
  };
  dtf::RowsDot<__half, float, __half, 2, decltype(rows_of)> dot(rows_of);
  dot.start(I, H);
  dtf::load_f32(gamma, H, gs, dot.tvec());
  DTF_WAIT_PRIOR();
  if (IS_ATOMIC(MODE)) {
    if (b == 0) for (int i = threadIdx.x; i < (MODE == ATOMIC64 ? 2 : 1) * H; i += blockDim.x) acc_zero[i] = 0.0f;
    dtf::load_f32(x, H, xs, dot.tvec());
    // f64 mode reads the delta in plain order while xs is in RowsDot's layout: its x is wrong, so it is
    // timed only (the checks skip it); the bytes and the atomics, what it measures, are the same
    if (MODE == ATOMIC64) { for (int i = threadIdx.x; i < H; i += blockDim.x) tmp[i] = (float)reinterpret_cast<const double*>(acc_prev)[i]; __syncthreads(); }
    else dtf::load_f32(acc_prev, H, tmp, dot.tvec());
    for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = dtf::round_to<__half>(xs[i] + dtf::round_to<__half>(tmp[i]));
    __syncthreads();
    __shared__ float red[32];
    float inv = dtf::block_rms_inv<float, float>(xs, H, eps, red);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
      xs[i] = dtf::round_to<__half>(xs[i] * inv * gs[i]);
    __syncthreads();
  } else {
    dtf::stage_rmsnorm<float, float, __half, __half>(x, gs, H, eps, xs, dot.tvec());
  }
  dot.run(xs, [&](int g, float (&gu)[2]) {
    if (lane != 0) return;
    int k = g / sweep, w = (g % sweep) % NW;
    float gf = __half2float(__float2half_rn(gu[0]));
    float s = gf / (1.0f + expf(-gf));
    hs[w + NW * k] = __half2float(__float2half_rn(s * __half2float(__float2half_rn(gu[1]))));
  });
  // down: this block's [hidden][T] slice; warp w the rows [w H/NW, (w+1) H/NW), LPR lanes per row
  constexpr int B = 8;
  const int LPR = T / 8, RPL = 32 / LPR, RPW = H / NW, NU = RPW / RPL, NQ = NU / B;   // NU % (2 B) == 0: two batches per pass
  const uint4* base = reinterpret_cast<const uint4*>(wdown + ((size_t)b * H + (size_t)warp * RPW) * T) + lane;
  const int rot = ROT ? b % NQ : 0;   // blocks start their rows at different batches: fewer same-address atomics at once
  auto qq = [&](int q) { return (q + rot) % NQ; };
  uint4 r0[B], r1[B];
#pragma unroll
  for (int j = 0; j < B; ++j) r0[j] = __ldg(base + (qq(0) * B + j) * 32);
#pragma unroll
  for (int j = 0; j < B; ++j) r1[j] = __ldg(base + (qq(1) * B + j) * 32);
  __syncthreads();               // hs complete
  float hv[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) hv[e] = hs[(lane % LPR) * 8 + e];
  auto consume = [&](uint4 (&r)[B], int q) {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      float w[8];
      dtf::Widen<__half>::run(r[j], w);
      float d = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) d = fmaf(w[e], hv[e], d);
#pragma unroll
      for (int o = 1; o < LPR; o <<= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      int n = warp * RPW + (qq(q) * B + j) * RPL + lane / LPR;
      if (MODE == ATOMIC4 && LPR * 4 <= 32) {   // four consecutive rows' sums in one lane: one vector atomic
        float d1 = __shfl_down_sync(0xffffffffu, d, LPR), d2 = __shfl_down_sync(0xffffffffu, d, 2 * LPR),
              d3 = __shfl_down_sync(0xffffffffu, d, 3 * LPR);
        if (lane % (4 * LPR) == 0) atomicAdd(reinterpret_cast<float4*>(acc_cur + n), make_float4(d, d1, d2, d3));
      } else if (lane % LPR == 0) {
        if (MODE == ATOMIC64) atomicAdd(reinterpret_cast<double*>(acc_cur) + n, (double)d);
        else if (IS_ATOMIC(MODE)) atomicAdd(acc_cur + n, d);
        else part[(size_t)b * H + n] = d;
      }
    }
  };
  for (int q = 0; q < NQ; q += 2) {
    consume(r0, q);
    if (q + 2 < NQ) {
#pragma unroll
      for (int j = 0; j < B; ++j) r0[j] = __ldg(base + (qq(q + 2) * B + j) * 32);
    }
    consume(r1, q + 1);
    if (q + 3 < NQ) {
#pragma unroll
      for (int j = 0; j < B; ++j) r1[j] = __ldg(base + (qq(q + 3) * B + j) * 32);
    }
  }
  if (MODE != TICKET) return;
  __shared__ unsigned ticket;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicAdd(&counters[0], 1u);
  __syncthreads();
  int r = (int)ticket - (S - n_red);
  if (r < 0) return;             // not one of the last n_red: done
  if (threadIdx.x == 0) while (ld_acquire(&counters[0]) < (unsigned)S) {}
  __syncthreads();
  // outputs [r * H / n_red, ...): thread (group gi, output oi) sums partials b = gi, gi + G, ...
  const int n_out = H / n_red, G = blockDim.x / n_out;
  int oi = threadIdx.x % n_out, gi = threadIdx.x / n_out, n = r * n_out + oi;
  float s = 0.0f;
#pragma unroll 8
  for (int bb = gi; bb < S; bb += G) s += __ldcg(part + (size_t)bb * H + n);
  float* sred = xs;              // reuse: G x n_out
  sred[gi * n_out + oi] = s;
  __syncthreads();
  if (gi == 0) {
    float t = 0.0f;
    for (int g = 0; g < G; ++g) t += sred[g * n_out + oi];
    x[n] = __float2half_rn(__half2float(x[n]) + __half2float(__float2half_rn(t)));
  }
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&counters[1], 1u) == (unsigned)n_red - 1) { counters[0] = 0; counters[1] = 0; }
}

// x[n] += f16(sum over b of part[b][n]), in a fixed order: 16 outputs per block, 16 groups of partials
template <int EARLY>
__global__ void __launch_bounds__(256) reduce_partials(__half* __restrict__ x, const float* __restrict__ part, int S) {
  DTF_KERNEL_START(EARLY);   // EARLY: the next kernel may launch as this one starts (it reads no weights)
  __shared__ float sred[16][17];
  DTF_WAIT_PRIOR();
  int oi = threadIdx.x % 16, gi = threadIdx.x / 16, n = blockIdx.x * 16 + oi;
  float v = 0.0f;
#pragma unroll 8
  for (int bb = gi; bb < S; bb += 16) v += __ldcg(part + (size_t)bb * H + n);
  sred[gi][oi] = v;
  __syncthreads();
  if (gi == 0) {
    float t = 0.0f;
    for (int g = 0; g < 16; ++g) t += sred[g][oi];
    x[n] = __float2half_rn(__half2float(x[n]) + __half2float(__float2half_rn(t)));
  }
}

__global__ void fill(__half* p, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2half_rn(((h & 0xffff) / 65535.0f - 0.5f) * scale);
  }
}
// wdown [H][I] row-major -> [S][H][T]
__global__ void repack(const __half* w, __half* o, int T) {
  size_t n = (size_t)H * I;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    size_t row = i / I, col = i % I, s = col / T, t = col % T;
    o[(s * H + row) * T + t] = w[i];
  }
}

#define QKV norm_qkv_rope_kv_xf16_gf16_wf16_qf16_kf16_vf16_ncf32_naf32_nof16_cf16_af32_of16_rcf32
#define ATTN attention_qf16_kf16_vf16_of16_cf32_af32_one_split
constexpr int NH = 32, NKV = 8, HD = 64, MAXSEQ = 256, QKV_ROWS = (NH + 2 * NKV) * HD;
struct Bufs {
  std::vector<__half*> wgu, wdown, wblk, gamma, wqkv, wo, gamma2, kc, vc;
  __half *q, *attn;
  int* pos;
  unsigned char* work;
  __half *x, *act;
  float *acc[3], *part;
  unsigned* counters;
};

template <typename... Args>
static void launch(void (*k)(Args...), int grid, int block, size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid; cfg.blockDim = block; cfg.dynamicSmemBytes = smem; cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  CK(cudaLaunchKernelEx(&cfg, k, args...));
}

static int wave(const void* k, int block, size_t smem) {
  int per_sm = 0, sms = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, block, smem));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return per_sm * sms;
}

static void enqueue_attn_half(Bufs& B, cudaStream_t s, int l);
template <int T, int MODE, int NW = 8, bool ROT = false, bool RT = false>
static void enqueue_split(Bufs& B, cudaStream_t s, int layers, int n_red, bool full = false) {
  size_t smem = (2 * H + T + (IS_ATOMIC(MODE) ? H : 0)) * 4;
  for (int l = 0; l < layers; ++l) {
    if (l > 0 && MODE == REDUCE) launch(reduce_partials<0>, H / 16, 256, 0, s, B.x, (const float*)B.part, I / T);
    if (l > 0 && MODE == REDUCE_EARLY) launch(reduce_partials<1>, H / 16, 256, 0, s, B.x, (const float*)B.part, I / T);
    if (full) enqueue_attn_half(B, s, l);
    launch(mlp_split<T, MODE, NW, ROT, RT>, I / T, 32 * NW, smem, s, B.x, (const float*)B.acc[(l + 2) % 3], B.acc[l % 3], B.acc[(l + 1) % 3],
           (const __half*)B.gamma[l], (const __half*)B.wgu[l], (const __half*)B.wblk[l], B.part, B.counters, 1e-5f, n_red, H, T);
  }
  if (MODE == REDUCE) launch(reduce_partials<0>, H / 16, 256, 0, s, B.x, (const float*)B.part, I / T);
  if (MODE == REDUCE_EARLY) launch(reduce_partials<1>, H / 16, 256, 0, s, B.x, (const float*)B.part, I / T);
}
// the attention half of a layer, as the runtime launches it (kernels from generated/h200.f16.fused)
static void enqueue_attn_half(Bufs& B, cudaStream_t s, int l) {
  int gq = wave((const void*)QKV, 256, 2 * H * 4), go = wave((const void*)DOWN, 256, H * 4);
  launch(QKV, std::min(gq, QKV_ROWS / 2 / NW), 256, (size_t)2 * H * 4, s, (const __half*)B.x, (const __half*)B.gamma2[l],
         (const __half*)B.wqkv[l], B.q, B.kc[l], B.vc[l], (const int*)B.pos, H, NH, NKV, HD, 1e-5f, 500000.0f);
  launch(ATTN, NH, 256, 0, s, (const __half*)B.q, (const __half*)B.kc[l], (const __half*)B.vc[l], B.attn, (const int*)B.pos,
         NH, NKV, HD, MAXSEQ, B.work, (const void*)B.wgu[l], 0);
  launch(DOWN, std::min(go, H / NW), 256, (size_t)H * 4, s, (const __half*)B.wo[l], (const __half*)B.attn, B.x, H, H);
}
static void enqueue_shipped(Bufs& B, cudaStream_t s, int layers, bool full = false) {
  int g1 = wave((const void*)GATE_UP, 256, 2 * H * 4), g2 = wave((const void*)DOWN, 256, I * 4);
  for (int l = 0; l < layers; ++l) {
    if (full) enqueue_attn_half(B, s, l);
    launch(GATE_UP, std::min(g1, I / NW), 256, (size_t)2 * H * 4, s, (const __half*)B.x, (const __half*)B.gamma[l],
           (const __half*)B.wgu[l], B.act, I, H, 1e-5f);
    launch(DOWN, std::min(g2, H / NW), 256, (size_t)I * 4, s, (const __half*)B.wdown[l], (const __half*)B.act, B.x, H, I);
  }
}

template <typename F>
static double time_graph(cudaStream_t s, F enqueue, int reps) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  enqueue();
  CK(cudaStreamEndCapture(s, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 5; ++i) CK(cudaGraphLaunch(exec, s));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a, s));
  for (int i = 0; i < reps; ++i) CK(cudaGraphLaunch(exec, s));
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(graph));
  return ms / reps;
}

static std::vector<float> read_x(Bufs& B) {
  std::vector<__half> h(H);
  CK(cudaMemcpy(h.data(), B.x, H * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(H);
  for (int i = 0; i < H; ++i) f[i] = __half2float(h[i]);
  return f;
}

int main() {
  Bufs B;
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CK(cudaFuncSetAttribute(DOWN, cudaFuncAttributeMaxDynamicSharedMemorySize, I * 4));
  for (int l = 0; l < L; ++l) {
    __half *a, *d, *k, *g;
    CK(cudaMalloc(&a, (size_t)2 * I * H * 2)); CK(cudaMalloc(&d, (size_t)H * I * 2));
    CK(cudaMalloc(&k, (size_t)H * I * 2)); CK(cudaMalloc(&g, H * 2));
    fill<<<1024, 256>>>(a, (size_t)2 * I * H, 11 + l, 0.08f);
    fill<<<1024, 256>>>(d, (size_t)H * I, 101 + l, 0.04f);
    fill<<<16, 256>>>(g, H, 7 + l, 0.5f);
    B.wgu.push_back(a); B.wdown.push_back(d); B.wblk.push_back(k); B.gamma.push_back(g);
  }
  for (int l = 0; l < L; ++l) {
    __half *a, *o, *g, *k, *v;
    CK(cudaMalloc(&a, (size_t)QKV_ROWS * H * 2)); CK(cudaMalloc(&o, (size_t)H * H * 2)); CK(cudaMalloc(&g, H * 2));
    CK(cudaMalloc(&k, (size_t)MAXSEQ * NKV * HD * 2)); CK(cudaMalloc(&v, (size_t)MAXSEQ * NKV * HD * 2));
    fill<<<1024, 256>>>(a, (size_t)QKV_ROWS * H, 1001 + l, 0.08f); fill<<<1024, 256>>>(o, (size_t)H * H, 2001 + l, 0.04f);
    fill<<<16, 256>>>(g, H, 3001 + l, 0.5f);
    fill<<<256, 256>>>(k, (size_t)MAXSEQ * NKV * HD, 4001 + l, 1.0f); fill<<<256, 256>>>(v, (size_t)MAXSEQ * NKV * HD, 5001 + l, 1.0f);
    B.wqkv.push_back(a); B.wo.push_back(o); B.gamma2.push_back(g); B.kc.push_back(k); B.vc.push_back(v);
  }
  CK(cudaMalloc(&B.q, NH * HD * 2)); CK(cudaMalloc(&B.attn, NH * HD * 2));
  CK(cudaMalloc(&B.pos, 4)); { int p0 = 128; CK(cudaMemcpy(B.pos, &p0, 4, cudaMemcpyHostToDevice)); }
  CK(cudaMalloc(&B.work, 1 << 20)); CK(cudaMemset(B.work, 0, 1 << 20));
  CK(cudaMalloc(&B.x, H * 2)); CK(cudaMalloc(&B.act, I * 2));
  for (auto& a : B.acc) { CK(cudaMalloc(&a, H * 8)); CK(cudaMemset(a, 0, H * 8)); }
  CK(cudaMalloc(&B.part, (size_t)(I / 8) * H * 4));
  CK(cudaMalloc(&B.counters, 64)); CK(cudaMemset(B.counters, 0, 64));
  // copy bandwidth (read + write), as codegen bench measures it
  {
    char *p, *q; size_t n = (size_t)1 << 30;
    CK(cudaMalloc(&p, n)); CK(cudaMalloc(&q, n));
    CK(cudaMemcpyAsync(q, p, n, cudaMemcpyDeviceToDevice, s));
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a, s));
    for (int i = 0; i < 10; ++i) CK(cudaMemcpyAsync(q, p, n, cudaMemcpyDeviceToDevice, s));
    CK(cudaEventRecord(b, s)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b));
    double bw = 2.0 * n * 10 / (ms * 1e-3) / 1e9;
    double bytes = (double)L * 3 * I * H * 2;
    std::printf("copy bandwidth %.1f GB/s; MLP weights %.1f MB per 16 layers = %.1f us per layer at copy bandwidth\n",
                bw, bytes / 1e6, bytes / L / bw / 1e3);
    CK(cudaFree(p)); CK(cudaFree(q));
  }
  // x small, so the MLP's output decides x and the checks compare the down projection's sums
  auto reset_x = [&] { fill<<<16, 256>>>(B.x, H, 3, 0.02f); for (auto& a : B.acc) CK(cudaMemset(a, 0, H * 8)); CK(cudaDeviceSynchronize()); };

  const char* names[] = {"ticket", "atomic f32", "none (partials not summed)", "atomic f32 x4 (vector)", "atomic f64", "partials + reduce kernel", "partials + reduce kernel, early"};
  const int reps = 50;
#define VARIANTS(X) X(32, 2, 8, false, false) X(32, 1, 8, false, false) X(32, 0, 8, false, false) X(32, 5, 8, false, false) \
  X(64, 2, 8, false, false) X(64, 1, 8, false, false) X(64, 2, 16, false, false) X(64, 1, 16, false, false) X(64, 1, 16, true, false) \
  X(64, 3, 16, true, false) X(64, 4, 16, false, false) X(64, 0, 16, false, false) X(64, 5, 16, false, false) X(64, 6, 16, false, false) \
  X(64, 2, 16, false, true) X(64, 6, 16, false, true)
  int last_T = 0;
  std::vector<float> ref;
#define RUN(T_, M_, NW_, ROT_, RT_) { \
    if (last_T != T_) { \
      for (int l = 0; l < L; ++l) repack<<<1024, 256>>>(B.wdown[l], B.wblk[l], T_); \
      CK(cudaDeviceSynchronize()); last_T = T_; \
      reset_x(); enqueue_shipped(B, s, 1); CK(cudaStreamSynchronize(s)); ref = read_x(B); \
    } \
    if (M_ != NONE && M_ != ATOMIC64) { \
      reset_x(); enqueue_split<T_, M_, NW_, ROT_, RT_>(B, s, 1, I / T_ / 2); CK(cudaStreamSynchronize(s)); \
      std::vector<float> got = read_x(B); \
      if (M_ != TICKET && M_ != REDUCE && M_ != REDUCE_EARLY) { std::vector<float> acc(H); CK(cudaMemcpy(acc.data(), B.acc[0], H * 4, cudaMemcpyDeviceToHost)); \
        for (int i = 0; i < H; ++i) got[i] = __half2float(__float2half_rn(got[i] + __half2float(__float2half_rn(acc[i])))); } \
      double md = 0, mx = 0; int diff = 0; \
      for (int i = 0; i < H; ++i) { md = std::max(md, (double)std::fabs(got[i] - ref[i])); mx = std::max(mx, (double)std::fabs(ref[i])); diff += got[i] != ref[i]; } \
      std::printf("  check against the shipped kernels, one layer: max |x - shipped| %.3g (max |x| %.3g), %d of %d differ\n", md, mx, diff, H); \
      if (md > 2e-3 * mx) { std::printf("  MISMATCH\n"); std::exit(1); } \
    } \
    double t = time_graph(s, [&] { enqueue_split<T_, M_, NW_, ROT_, RT_>(B, s, L, I / T_ / 2); }, reps); \
    double t0 = time_graph(s, [&] { enqueue_shipped(B, s, L); }, reps); \
    std::printf("T=%3d  %2d warps  %-28s %-8s %-14s %6.2f us per layer   (shipped, same run: %6.2f)\n", T_, NW_, names[M_], ROT_ ? "rotated" : "", \
                RT_ ? "run-time shape" : "", t * 1e3 / L, t0 * 1e3 / L); \
  }
  VARIANTS(RUN)
  // whole layers: q/k/v + attention + o-proj, then the MLP either way (T = 64, 16 warps)
  for (int l = 0; l < L; ++l) repack<<<1024, 256>>>(B.wdown[l], B.wblk[l], 64);
  CK(cudaDeviceSynchronize());
  for (int round = 0; round < 2; ++round) {
    double t0 = time_graph(s, [&] { enqueue_shipped(B, s, L, true); }, reps);
    double tr = time_graph(s, [&] { enqueue_split<64, REDUCE, 16, false>(B, s, L, 0, true); }, reps);
    double tn = time_graph(s, [&] { enqueue_split<64, NONE, 16, false>(B, s, L, 0, true); }, reps);
    double ta = time_graph(s, [&] { enqueue_split<64, ATOMIC, 16, true>(B, s, L, 0, true); }, reps);
    double te = time_graph(s, [&] { enqueue_split<64, REDUCE_EARLY, 16, false>(B, s, L, 0, true); }, reps);
    double tt = time_graph(s, [&] { enqueue_split<64, REDUCE_EARLY, 16, false, true>(B, s, L, 0, true); }, reps);
    std::printf("whole layer: split + reduce kernel that lets q/k/v launch as it starts %.2f us per layer; the same with run-time shapes %.2f\n",
                te * 1e3 / L, tt * 1e3 / L);
    std::printf("whole layer (q/k/v, attention at 128 positions, o-proj, MLP), us per layer: shipped %.2f | split + reduce kernel %.2f"
                " | split, atomic (q/k/v not reading the accumulator: a bound) %.2f | split, partials not summed %.2f\n",
                t0 * 1e3 / L, tr * 1e3 / L, ta * 1e3 / L, tn * 1e3 / L);
  }
  return 0;
}
