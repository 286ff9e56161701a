// cluster_probe: can one thread-block cluster stream a SmolLM2 decode layer faster than ~150 kernels?
//
// The SmolLM2-135M step is ~154 dependent launches of 1-3 us of work, and a kernel boundary costs
// >= 0.76 us (tools/sync_probe.cu). On sm_90 the blocks of one cluster (up to 16) can synchronize
// with a hardware barrier (barrier.cluster) and exchange values through each other's shared memory,
// with no kernel boundary. The price is streaming the weights from 8-16 SMs instead of 132. This
// probe measures both sides with no arithmetic, so a fused design is judged before it is written:
//   stream   G blocks (cluster size 1), every warp streams its share of the bytes with
//            cp.async.bulk into a shared-memory ring (mbarrier completion): GB/s per SM and in all
//   layer    one cluster of C blocks streams 30 "layers" of SmolLM2's weight bytes (q/k/v, o, gate/up,
//            down; 7.08 MB a layer) and, at each of the 5 dependencies of a layer (attention included),
//            all-gathers 64 floats per block through distributed shared memory and passes a cluster
//            barrier; the ring keeps loading the next stage's weights across the barrier, as weights
//            do not depend on activations
//   sync     the same with no bytes: the price of one dependency inside a cluster
// The gathered values are checked, so a broken barrier fails instead of timing garbage.
//
// Build and run (GPU machine): nvcc -O3 -arch=sm_90a -o /tmp/cluster_probe tools/cluster_probe.cu && /tmp/cluster_probe
// (-DWARPS=8 -DCHUNK=8192 -DNSLOT=3 and the like change the ring's shape)
#include <cooperative_groups.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); std::exit(1); } } while (0)

#ifndef WARPS
#define WARPS 16                     // warps a block
#endif
#ifndef CHUNK
#define CHUNK 2048                   // bytes per bulk copy
#endif
#ifndef NSLOT
#define NSLOT 6                      // ring slots per warp (16 x 6 x 2 KiB: 192 KiB a block)
#endif
constexpr int THREADS = WARPS * 32;
constexpr int GATHER = 64;           // floats each block publishes per dependency
constexpr int MAX_STAGES = 8;

struct Layer {
  int n_stages;
  long long offset[MAX_STAGES];      // byte offset of each stage inside a layer
  int chunks[MAX_STAGES];            // CHUNK-sized pieces of each stage
  long long layer_bytes;
  int n_layers;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(bar)), "r"(CHUNK) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_u32(dst)), "l"(src), "r"(CHUNK), "r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" :: "r"(smem_u32(bar)), "r"(parity) : "memory");
}

// A warp's position in its own sequence of chunks: layer l, stage s, j-th chunk of the warp there.
struct Cursor {
  int l, s, j;
  __device__ bool done(const Layer& L) const { return l >= L.n_layers; }
  __device__ void settle(const Layer& L, int wid, int W) {   // skip stages where this warp has no chunk
    while (l < L.n_layers && wid + j * W >= L.chunks[s]) { j = 0; if (++s == L.n_stages) { s = 0; ++l; } }
  }
  __device__ void next(const Layer& L, int wid, int W) { ++j; settle(L, wid, W); }
};

// SYNC: 0 streaming only; 1 a cluster barrier + DSMEM all-gather after every stage.
template <int SYNC>
__global__ void __launch_bounds__(THREADS, 1) probe(const uint8_t* __restrict__ w, Layer L, float* out, int* err) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bars[WARPS][NSLOT];
  __shared__ float gathered[16 * GATHER];
  cg::cluster_group cluster = cg::this_cluster();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nblk = SYNC ? (int)cluster.num_blocks() : (int)gridDim.x;
  const int rank = SYNC ? (int)cluster.block_rank() : (int)blockIdx.x;
  const int W = nblk * WARPS, wid = rank * WARPS + warp;
  uint8_t* ring = smem + warp * NSLOT * CHUNK;
  if (lane < NSLOT) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_u32(&bars[warp][lane])) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  if (SYNC) cluster.sync();

  Cursor issue{0, 0, 0}, use{0, 0, 0};
  issue.settle(L, wid, W); use.settle(L, wid, W);
  int islot = 0;
  if (lane == 0)
    for (; islot < NSLOT && !issue.done(L); ++islot, issue.next(L, wid, W))
      bulk_load(ring + islot * CHUNK, w + (long long)issue.l * L.layer_bytes + L.offset[issue.s] +
                (long long)(wid + issue.j * W) * CHUNK, &bars[warp][islot]);
  islot %= NSLOT;
  uint32_t acc = 0;
  int slot = 0;
  uint32_t phase = 0;   // bit k: parity of slot k's next completion
  for (int l = 0; l < L.n_layers; ++l) {
    for (int s = 0; s < L.n_stages; ++s) {
      while (!use.done(L) && use.l == l && use.s == s) {
        wait_parity(&bars[warp][slot], (phase >> slot) & 1u);
        phase ^= 1u << slot;
        const uint4* v = reinterpret_cast<const uint4*>(ring + slot * CHUNK);
#pragma unroll
        for (int k = 0; k < CHUNK / 16 / 32; ++k) { uint4 x = v[lane + 32 * k]; acc ^= x.x ^ x.y ^ x.z ^ x.w; }
        __syncwarp();
        if (lane == 0 && !issue.done(L)) {
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          bulk_load(ring + slot * CHUNK, w + (long long)issue.l * L.layer_bytes + L.offset[issue.s] +
                    (long long)(wid + issue.j * W) * CHUNK, &bars[warp][slot]);
          issue.next(L, wid, W);
        }
        slot = slot + 1 == NSLOT ? 0 : slot + 1;
        use.next(L, wid, W);
      }
      if (SYNC) {
        // every block writes GATHER floats into every block's `gathered`, then the barrier
        const int tag = l * L.n_stages + s;
        for (int i = threadIdx.x; i < nblk * GATHER; i += THREADS) {
          float* dst = cluster.map_shared_rank(gathered, i / GATHER);
          dst[rank * GATHER + i % GATHER] = (float)(tag * 16 + rank);
        }
        cluster.sync();
        if (threadIdx.x < nblk * GATHER && gathered[threadIdx.x] != (float)(tag * 16 + threadIdx.x / GATHER))
          atomicAdd(err, 1);
        cluster.sync();   // nobody overwrites `gathered` before every block has read it
      }
    }
  }
  if (acc == 0x12345678u) out[0] = 1.0f;   // keep the loads
}

// plain loads for comparison: each warp reads its chunks with 16-byte ld.global.nc, 4 chunks in flight
__global__ void __launch_bounds__(THREADS, 1) plain(const uint8_t* __restrict__ w, long long total, float* out) {
  const int lane = threadIdx.x & 31;
  const long long W = (long long)gridDim.x * WARPS, wid = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const long long n = total / CHUNK;
  uint32_t acc = 0;
  constexpr int V = CHUNK / 16 / 32;
  for (long long c = wid; c < n; c += 4 * W) {
    uint4 x[4][V];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k)
        x[u][k] = c + u * W < n ? __ldg(reinterpret_cast<const uint4*>(w + (c + u * W) * CHUNK) + lane + 32 * k) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) acc ^= x[u][k].x ^ x[u][k].y ^ x[u][k].z ^ x[u][k].w;
  }
  if (acc == 0x12345678u) out[0] = 1.0f;
}

static float time_plain(int blocks, const uint8_t* w, long long total, float* out) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  plain<<<blocks, THREADS>>>(w, total, out);
  CK(cudaDeviceSynchronize());
  CK(cudaEventRecord(a));
  for (int i = 0; i < 5; ++i) plain<<<blocks, THREADS>>>(w, total, out);
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms * 1000.0f / 5;
}

static float time_kernel(int sync, int blocks, int cluster, const uint8_t* w, const Layer& L, float* out, int* err) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks); cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = WARPS * NSLOT * CHUNK;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  auto k = sync ? probe<1> : probe<0>;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  CK(cudaLaunchKernelEx(&cfg, k, w, L, out, err));   // warm-up
  CK(cudaDeviceSynchronize());
  const int reps = 5;
  CK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) CK(cudaLaunchKernelEx(&cfg, k, w, L, out, err));
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  int h_err = 0;
  CK(cudaMemcpy(&h_err, err, sizeof(int), cudaMemcpyDeviceToHost));
  if (h_err) { std::fprintf(stderr, "sync=%d blocks=%d cluster=%d: %d wrong gathered values\n", sync, blocks, cluster, h_err); std::exit(2); }
  CK(cudaEventDestroy(a)); CK(cudaEventDestroy(b));
  return ms * 1000.0f / reps;   // us per launch
}

static Layer smollm2_layer(double scale, int n_layers) {
  // SmolLM2-135M f16 per layer: q/k/v 576x960, attention (no weights), o 576x576, gate/up 576x3072, down 1536x576
  const double stage_bytes[] = {576.0 * 960 * 2, 0.0, 576.0 * 576 * 2, 576.0 * 3072 * 2, 1536.0 * 576 * 2};
  Layer L = {};
  L.n_stages = 5; L.n_layers = n_layers;
  long long off = 0;
  for (int s = 0; s < 5; ++s) {
    L.offset[s] = off;
    L.chunks[s] = (int)((stage_bytes[s] * scale + CHUNK - 1) / CHUNK);
    off += (long long)L.chunks[s] * CHUNK;
  }
  L.layer_bytes = off;
  return L;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const int smem = WARPS * NSLOT * CHUNK;
  CK(cudaFuncSetAttribute(probe<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(probe<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(probe<0>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CK(cudaFuncSetAttribute(probe<1>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  std::printf("%s, %d SMs, %d threads a block, %d KiB ring a block\n", prop.name, sms, THREADS, smem / 1024);
  for (int c : {8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(c); cfg.blockDim = dim3(THREADS); cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = c; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr; cfg.numAttrs = 1;
    int n = 0;
    CK(cudaOccupancyMaxActiveClusters(&n, probe<1>, &cfg));
    std::printf("  clusters of %d that fit at once: %d\n", c, n);
  }
  const int n_layers = 30;
  Layer L = smollm2_layer(1.0, n_layers);
  const long long total = L.layer_bytes * n_layers;
  uint8_t* w;
  float* out;
  int* err;
  CK(cudaMalloc(&w, total));
  CK(cudaMemset(w, 1, total));
  CK(cudaMalloc(&out, 4));
  CK(cudaMalloc(&err, 4));
  CK(cudaMemset(err, 0, 4));
  std::printf("\nstream: %.1f MB (30 SmolLM2 layers), cluster size 1, no barriers\n", total / 1e6);
  std::printf("%8s %12s %12s %14s %18s\n", "blocks", "us", "GB/s", "GB/s per SM", "plain loads GB/s/SM");
  for (int g : {1, 8, 16, 32, 66, sms}) {
    float us = time_kernel(0, g, 1, w, L, out, err);
    float pl = time_plain(g, w, total, out);
    std::printf("%8d %12.1f %12.1f %14.1f %18.1f\n", g, us, total / us / 1e3, total / us / 1e3 / g, total / pl / 1e3 / g);
  }
  std::printf("\nlayer: one cluster, 30 layers x 5 dependencies (DSMEM all-gather + cluster barrier)\n");
  std::printf("%8s %14s %14s %12s %16s\n", "cluster", "us per layer", "stream only", "GB/s", "us per dependency");
  for (int c : {8, 16}) {
    float with = time_kernel(1, c, c, w, L, out, err);
    float without = time_kernel(0, c, c, w, L, out, err);
    Layer Z = smollm2_layer(0.0, n_layers);
    float sync_only = time_kernel(1, c, c, w, Z, out, err);
    std::printf("%8d %14.2f %14.2f %12.1f %16.3f\n", c, with / n_layers, without / n_layers, total / with / 1e3,
                sync_only / (n_layers * 5));
  }
  std::printf("\n(for comparison: the shipped kernels took 15.4 us per SmolLM2 layer on the H200 on 2026-12-01)\n");
  return 0;
}
