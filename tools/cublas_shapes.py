"""cuBLAS through torch on the prefill GEMM shapes of the Llama-3.2-1B and SmolLM2-135M models (M = 512
and 2048 token rows, f16, y = x W^T), each timed as a CUDA graph of 20 GEMMs so that launch overhead is
excluded: the reference column of docs/benchmarks.md's GEMM table (tools/gpu_prefill_bench.sh runs it
beside tools/gemm_check.cu). Needs torch with CUDA.

    python3 tools/cublas_shapes.py
"""
from __future__ import annotations

# (N, K) of q/k/v, o-proj, gate/up, down: the 1B shape, then SmolLM2's
SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (960, 576), (576, 576), (3072, 576), (576, 1536)]


def time_gemm(torch, m: int, n: int, k: int, reps: int = 20, replays: int = 10) -> float:
    """Microseconds per f16 GEMM of x [m, k] by W [n, k]^T, from graph replays."""
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    b = torch.randn(n, k, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm up (cuBLAS picks its kernel) off the capture
        for _ in range(3):
            a @ b.T
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            a @ b.T
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * replays)


def main() -> None:
    import torch
    print(torch.cuda.get_device_name())
    for m in (512, 2048):
        for n, k in SHAPES:
            us = time_gemm(torch, m, n, k)
            print(f"CUBLAS M={m} N={n} K={k} {us:7.1f} us {2 * m * n * k / us * 1e-6:6.1f} TFLOP/s")


if __name__ == "__main__":
    main()
