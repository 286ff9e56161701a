// sync_probe: what one dependency between two steps of a decode costs on this GPU, four ways.
//
// SmolLM2-135M's decode step is ~150 dependent kernels that each do ~1-3 us of work, so the cost of
// a boundary decides its speed (docs/benchmarks.md). Here a chain of N stages, each G blocks, every block
// reading what another block of the previous stage wrote (so the dependency is real), is captured in
// one CUDA graph and replayed; the time per stage is the price of one dependency:
//   plain    one kernel per stage, stream order (no programmatic dependent launch)
//   pdl      one kernel per stage, programmatic dependent launch: griddepcontrol.launch_dependents at
//            the start, griddepcontrol.wait before the read (what runtime/cuda.py does today)
//   flag     launched as pdl, but instead of griddepcontrol.wait each block spins (ld.acquire) until a
//            global counter holds every block of the earlier stages; a block done adds one (release)
//   barrier  one kernel, the N stages separated by a software grid barrier (all G blocks resident)
// The last stage's values are checked, so a broken ordering fails instead of timing garbage.
//
// Build and run (GPU machine): nvcc -O3 -arch=sm_90 -o /tmp/sync_probe tools/sync_probe.cu && /tmp/sync_probe
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); std::exit(1); } } while (0)

constexpr int THREADS = 128;

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// stage s: out[b] = in[(b + 1) % G] + 1, in = the previous stage's buffer (ping-pong)
template <int MODE>   // 0 plain, 1 pdl, 2 flag
__global__ void stage_kernel(int* buf, int G, int s, unsigned* counter) {
  if (MODE >= 1) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (threadIdx.x != 0) return;
  int b = blockIdx.x;
  int v = 0;
  if (s > 0) {
    if (MODE == 1) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (MODE == 2) { unsigned want = (unsigned)s * G; while (ld_acquire(counter) < want) {} }
    v = __ldcg(buf + ((s - 1) & 1) * G + (b + 1) % G);
  }
  buf[(s & 1) * G + b] = v + 1;
  if (MODE == 2) red_release_add(counter, 1u);
}

__global__ void barrier_kernel(int* buf, int G, int N, unsigned* counter) {
  for (int s = 0; s < N; ++s) {
    if (threadIdx.x == 0) {
      int b = blockIdx.x;
      int v = s > 0 ? __ldcg(buf + ((s - 1) & 1) * G + (b + 1) % G) : 0;
      buf[(s & 1) * G + b] = v + 1;
      red_release_add(counter, 1u);
      unsigned want = (unsigned)(s + 1) * G;
      while (ld_acquire(counter) < want) {}
    }
    __syncthreads();
  }
}

static void (*const STAGE_KERNELS[3])(int*, int, int, unsigned*) = {stage_kernel<0>, stage_kernel<1>, stage_kernel<2>};

static float run(int mode, int G, int N, int reps, cudaStream_t st, int* buf, unsigned* counter) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  CK(cudaMemsetAsync(counter, 0, sizeof(unsigned), st));
  if (mode == 3) {
    barrier_kernel<<<G, THREADS, 0, st>>>(buf, G, N, counter);
  } else {
    for (int s = 0; s < N; ++s) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(G); cfg.blockDim = dim3(THREADS); cfg.stream = st;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cfg.attrs = attr; cfg.numAttrs = (mode >= 1 && s > 0) ? 1 : 0;
      CK(cudaLaunchKernelEx(&cfg, STAGE_KERNELS[mode], buf, G, s, counter));
    }
  }
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(exec, st));
  CK(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a, st));
  for (int i = 0; i < reps; ++i) CK(cudaGraphLaunch(exec, st));
  CK(cudaEventRecord(b, st));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  std::vector<int> host(G);
  CK(cudaMemcpy(host.data(), buf + ((N - 1) & 1) * G, G * sizeof(int), cudaMemcpyDeviceToHost));
  for (int i = 0; i < G; ++i)
    if (host[i] != N) { std::fprintf(stderr, "mode %d G %d: block %d holds %d, want %d\n", mode, G, i, host[i], N); std::exit(2); }
  CK(cudaEventDestroy(a)); CK(cudaEventDestroy(b));
  CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(graph));
  return ms * 1000.0f / (reps * N);
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, barrier_kernel, THREADS, 0));
  std::printf("%s, %d SMs; chain of N = 150 stages, us per stage (one dependency), graph replay\n", prop.name,
              prop.multiProcessorCount);
  std::printf("%8s %10s %10s %10s %10s\n", "blocks", "plain", "pdl", "flag", "barrier");
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  int sms = prop.multiProcessorCount;
  int grids[] = {9, 60, sms, 2 * sms, 4 * sms};
  int* buf;
  unsigned* counter;
  CK(cudaMalloc(&buf, 2 * 4 * sms * sizeof(int)));
  CK(cudaMalloc(&counter, sizeof(unsigned)));
  for (int G : grids) {
    float t[4];
    for (int mode = 0; mode < 4; ++mode)
      t[mode] = (mode == 3 && G > per_sm * sms) ? -1.0f : run(mode, G, 150, 50, st, buf, counter);
    std::printf("%8d %10.3f %10.3f %10.3f %10.3f\n", G, t[0], t[1], t[2], t[3]);
  }
  return 0;
}
