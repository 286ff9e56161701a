"""Runtime behaviour that does not need a GPU: the CUDA backend's refusal without one, and the
persistent compile cache (nvcc is on every machine, so it is exercised for real)."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from dtypeforge.codegen.build import GENERATED
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import load_target


def _no_cuda() -> bool:
    from dtypeforge.runtime.cuda import unavailable_reason
    return unavailable_reason() is not None


@pytest.mark.skipif(not _no_cuda(), reason="a usable GPU is present; this checks the message without one")
def test_cuda_backend_without_gpu_points_at_cpu(tmp_path):
    model = write_synthetic_model(tmp_path / "tiny", shape="tiny")
    r = subprocess.run([sys.executable, "-m", "dtypeforge.cli", "generate", "--model", str(model), "--prompt", "hi",
                        "--backend", "cuda"], capture_output=True, text=True)
    assert r.returncode == 1 and "use --backend cpu" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # and nothing was packed before refusing
    assert "packing" not in r.stderr


def _build(args):
    cache, src = args
    import os
    os.environ["DTYPEFORGE_CACHE"] = cache
    import importlib
    from dtypeforge.runtime import cuda
    importlib.reload(cuda)
    return str(cuda.cached_cubin(Path(src), "sm_90a", progress=False))


@pytest.mark.compile
def test_compile_cache_is_shared_and_safe_across_processes(tmp_path):
    src = GENERATED / "llama.h100.f16.fused" / "kernels.cu"
    with ProcessPoolExecutor(2) as ex:
        paths = list(ex.map(_build, [(str(tmp_path), str(src))] * 2))
    assert paths[0] == paths[1]
    cubin = Path(paths[0])
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.name for p in cubin.parent.iterdir()) == [cubin.name, cubin.name + ".sha256"]   # no temp files left behind
    mtime = cubin.stat().st_mtime_ns
    assert _build((str(tmp_path), str(src))) == paths[0] and cubin.stat().st_mtime_ns == mtime   # a hit, not a rebuild


def test_compile_cache_key_changes_with_the_source(tmp_path, monkeypatch):
    from dtypeforge.runtime import cuda
    monkeypatch.setattr(cuda, "CACHE", tmp_path)
    calls = []
    monkeypatch.setattr(cuda, "compile_cubin", lambda src, arch, out, options=(): calls.append(out) or out.write_bytes(b"x"))
    a = tmp_path / "a" / "kernels.cu"
    a.parent.mkdir()
    a.write_text("// one\n")
    p1 = cuda.cached_cubin(a, "sm_90", progress=False)
    a.write_text("// two\n")
    p2 = cuda.cached_cubin(a, "sm_90", progress=False)
    p3 = cuda.cached_cubin(a, "sm_100", progress=False)
    assert len({p1, p2, p3}) == 3 and len(calls) == 3
    cuda.cached_cubin(a, "sm_100", progress=False)
    assert len(calls) == 3


def test_bench_report_states_each_ops_share_and_its_bandwidth_efficiency():
    """The in-graph profile line of an op: its ms, share of the step, time per launch and its weight
    bytes at the copy bandwidth as a fraction of that time (33.55 MB at 4270 GB/s = 7.86 us of 11.72);
    and the step's time beyond its bytes at the copy rate, per launch."""
    import io
    from dtypeforge.runtime.bench import BenchResult, print_result
    r = BenchResult("llama.h200.f16.fused", "NVIDIA H200", 128, 0.845, 0.86, 2_471_600_000, 4270.0,
                    [("down [k]", 16, 0.25)], [("down [k]", 16, 0.1875, 16 * 33_554_432), ("attention [a]", 16, 0.0732, 0)])
    out = io.StringIO()
    print_result(r, out=out)
    text = out.getvalue()
    assert "68.5% of copy bandwidth" in text
    # 0.845 ms - 2471.6 MB at 4270 GB/s (0.5788 ms) = 0.266 ms over the profile's 16 launches
    assert "0.266 ms/token over 16 launches, 16.64 us each" in text
    down = next(l for l in text.splitlines() if l.endswith("down [k]") and "us/launch" in l)
    assert "22.2%" in down and "11.72 us/launch" in down and "33.55 MB/launch" in down and "67% of copy bw" in down
    attn = next(l for l in text.splitlines() if l.endswith("attention [a]"))
    assert "copy bw" not in attn          # no weights: no bandwidth claim


def test_timeline_measures_each_launch_from_the_previous_launchs_end():
    """timeline_rows: a launch's span runs from the previous launch's end (the previous step's last
    launch for a step's first), so a step's spans add up to its time; step 0 has no predecessor."""
    import numpy as np
    from dtypeforge.runtime.bench import timeline_rows
    names = ["qkv [a]", "attn [b]", "qkv [a]"]               # an op that runs twice per step
    rng = np.random.default_rng(0)
    trace, t = [], 1_000_000
    for _ in range(4):
        for _ in names:
            start = t - int(rng.integers(500, 3000))           # launched early (PDL), before the previous end
            waited = t + int(rng.integers(200, 900))
            t = waited + int(rng.integers(1000, 5000))
            trace.append((start, waited, t))
    trace = np.array(trace, np.int64)
    rows = {r.name: r for r in timeline_rows(trace, names, steps=4)}
    assert rows["qkv [a]"].launches == 2 and rows["attn [b]"].launches == 1
    step_us = (trace[-1][2] - trace[2][2]) / 1e3 / 3           # steps 1..3
    assert abs(sum(r.span_us * r.launches for r in rows.values()) - step_us) < 1e-6
    ends, waits = trace[:, 2], trace[:, 1]
    attn = [k for k in range(3, 12) if k % 3 == 1]
    assert abs(rows["attn [b]"].released_us - np.mean([(waits[k] - ends[k - 1]) / 1e3 for k in attn])) < 1e-9
    assert abs(rows["attn [b]"].after_wait_us - np.mean([(ends[k] - waits[k]) / 1e3 for k in attn])) < 1e-9
    assert abs(rows["attn [b]"].started_us - np.mean([(trace[k][0] - ends[k - 1]) / 1e3 for k in attn])) < 1e-9
    assert rows["attn [b]"].started_us < 0


def test_traced_kernels_build_and_export_the_timeline(tmp_path):
    """-DDTF_TRACE (codegen bench --timeline) builds every kernel of a target with the clock stamps
    and exports the buffers the runtime reads by name; without it, no trace symbol is left."""
    from dtypeforge.codegen.compile import compile_cubin
    cu = GENERATED / "llama.h200.f16.fused" / "kernels.cu"
    traced = compile_cubin(cu, "sm_90a", tmp_path / "traced.cubin", options=("-DDTF_TRACE",)).read_bytes()
    plain = compile_cubin(cu, "sm_90a", tmp_path / "plain.cubin", options=()).read_bytes()
    for sym in (b"dtf_trace\0", b"dtf_trace_started\0", b"dtf_trace_ended\0", b"dtf_trace_blocks_done\0"):
        assert sym in traced and sym not in plain
    assert b"globaltimer" not in plain


@pytest.mark.parametrize("flag", [["--timeline"], ["--compare", "hf"]])
def test_bench_refuses_gpu_only_flags_on_the_cpu_backend(tmp_path, capsys, flag):
    """--timeline and --compare time the GPU: with --backend cpu they are refused by name before any
    packing, rather than silently ignored."""
    from dtypeforge.cli import main
    model = write_synthetic_model(tmp_path / "tiny", shape="tiny")
    assert main(["bench", "--model", str(model), "--backend", "cpu", "--device", "reference", *flag]) == 1
    err = capsys.readouterr().err
    assert flag[0] in err and "--backend cuda" in err and "packing" not in err


# CUDA device names as the driver reports them, and the spec `--device auto` must pick (None: none).
GPU_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "h200"), ("NVIDIA B200", "b200"), ("NVIDIA GB10", "gb10"), ("Tesla M40 24GB", "m40"),
    ("Tesla P40", "p40"), ("Tesla V100-SXM2-16GB", "v100"), ("Tesla V100S-PCIE-32GB", "v100"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA A10", "a10"), ("NVIDIA A10G", "a10"),
    ("NVIDIA GeForce RTX 3090", "rtx3090"), ("NVIDIA L4", "l4"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4080", None), ("Tesla P100-PCIE-16GB", None),
]


@pytest.mark.parametrize("gpu,device", GPU_NAMES, ids=[g for g, _ in GPU_NAMES])
def test_auto_device_picks_the_spec_that_names_the_gpu(gpu, device):
    """gpu_names entries match whole words of the device name: "A10" is not a word of "A100-SXM4",
    "L4" not of "L40S", "H200" not of "GH200" (which h200.yaml names itself)."""
    from dtypeforge.codegen.specs import load_specs
    from dtypeforge.session import device_for_gpu
    from dtypeforge.runtime.target import LoadError
    specs = load_specs()
    if device is None:
        with pytest.raises(LoadError, match=f"no device spec names the GPU '{gpu}'"):
            device_for_gpu(specs, gpu)
    else:
        assert device_for_gpu(specs, gpu) == device


def test_auto_device_refuses_a_gpu_two_specs_name(tmp_path):
    import shutil
    from dtypeforge.codegen.specs import load_specs
    from dtypeforge.session import device_for_gpu
    from dtypeforge.runtime.target import LoadError
    root = Path(__file__).resolve().parents[1] / "specs"
    shutil.copytree(root, tmp_path / "specs")
    mine = tmp_path / "specs" / "devices" / "my_h100.yaml"
    mine.write_text((root / "devices" / "h100.yaml").read_text().replace("name: h100", "name: my_h100")
                    .replace('gpu_names: ["H100"]', 'gpu_names: ["H100 PCIe"]'))
    specs = load_specs(tmp_path / "specs")
    assert device_for_gpu(specs, "NVIDIA H100 80GB HBM3") == "h100"
    with pytest.raises(LoadError, match=r"named by 2 device specs .*h100\.yaml: \['H100'\]; .*my_h100\.yaml: \['H100 PCIe'\]"):
        device_for_gpu(specs, "NVIDIA H100 PCIe")


@pytest.mark.parametrize("target,cc,refusal", [
    ("llama.a100.f16.fused", (9, 0), None), ("llama.a100.f16.fused", (8, 0), None),
    ("llama.a100.f16.fused", (7, 5), r"was generated for sm_80 \(device spec a100\), but this GPU, NVIDIA GPU, is sm_75"),
    ("llama.h100.f16.fused", (9, 0), None),
    ("llama.h100.f16.fused", (8, 9), r"was generated for sm_90a \(device spec h100\), whose code runs only on sm_90 GPUs, "
                                     r"but this GPU, NVIDIA GPU, is sm_89"),
    ("llama.h100.f16.fused", (10, 0), r"was generated for sm_90a .* runs only on sm_90 GPUs, but this GPU, NVIDIA GPU, is sm_100")])
def test_cuda_backend_refuses_a_target_the_gpu_cannot_run(target, cc, refusal):
    """A target for a newer arch than the GPU's (griddepcontrol, bulk prefetch, fp8 conversions) is
    refused before any compile, naming target, spec, GPU and its arch, and so is an arch-specific one
    (sm_90a: wgmma) on any other arch; a newer GPU runs a plain arch's target."""
    from dtypeforge.runtime.cuda import check_gpu_runs
    from dtypeforge.runtime.errors import BackendUnavailable
    manifest = load_target(GENERATED / target).manifest
    if refusal is None:
        check_gpu_runs(manifest, "NVIDIA GPU", *cc)
    else:
        with pytest.raises(BackendUnavailable, match=rf"target {target} {refusal}"):
            check_gpu_runs(manifest, "NVIDIA GPU", *cc)


@pytest.mark.parametrize("target, cc, arch", [
    ("llama.a100.f16.fused", (9, 0), "sm_90"), ("llama.a100.f16.fused", (8, 6), "sm_86"),
    ("llama.h100.f16.fused", (9, 0), "sm_90a"), ("llama.m40.f16-storage-f32-compute.separate", (6, 1), "sm_61")])
def test_cuda_backend_builds_for_the_gpu_or_for_an_arch_specific_target(target, cc, arch):
    """Kernels are built for the GPU's own arch, except an arch-specific target's (sm_90a), whose
    wgmma code the compiler refuses for plain sm_90: the backend must build it for sm_90a."""
    from dtypeforge.runtime.cuda import compile_arch
    assert compile_arch(load_target(GENERATED / target).manifest, *cc) == arch


def test_cuda_backend_compiles_for_the_targets_arch_and_releases_the_context_when_it_fails(tmp_path, monkeypatch):
    """The backend's own wiring, on a fake driver: an sm_90a target on an sm_90 GPU is compiled for
    sm_90a, and a compile that fails leaves no context pushed (PyCUDA aborts the process at exit when
    one is) and no second error from the cleanup that runs at exit."""
    from dtypeforge.codegen.compile import CompileError
    from dtypeforge.runtime import cuda
    from dtypeforge.runtime.loader import pack_weights

    class Ctx:
        depth = 0
        def push(self): Ctx.depth += 1
        def pop(self): Ctx.depth -= 1

    class GPU:
        def __init__(self, i): pass
        def compute_capability(self): return 9, 0
        def name(self): return "NVIDIA H100 80GB HBM3"
        def retain_primary_context(self): return Ctx()

    class Driver:
        Device = GPU
        def mem_get_info(self): return 2**36, 2**36

    built = []
    def cached_cubin(source, arch, options, **kw):
        built.append(arch)
        raise CompileError("nvcc failed")

    registered = []
    monkeypatch.setattr(cuda, "_driver", Driver)
    monkeypatch.setattr(cuda, "cached_cubin", cached_cubin)
    monkeypatch.setattr(cuda.atexit, "register", registered.append)
    target = load_target(GENERATED / "llama.h100.f16.fused")
    packed = pack_weights(target, write_synthetic_model(tmp_path / "tiny", shape="tiny"), max_seq=64, progress=False)
    with pytest.raises(CompileError):
        cuda.CudaBackend(target, packed, progress=False)
    close = [f for f in registered if getattr(f, "__func__", None) is cuda.CudaBackend.close]
    assert built == ["sm_90a"] and Ctx.depth == 1 and len(close) == 1
    close[0]()                         # the exit-time cleanup
    assert Ctx.depth == 0
    close[0]()                         # idempotent
    assert Ctx.depth == 0


def test_launch_attribute_carries_every_byte_of_its_value():
    """cuLaunchKernelEx reads each attribute as {id, pad, 64-byte value}. A value with zero bytes
    before its end (a cluster's (x, 1, 1)) must arrive whole: a c_char array field stopped copying at
    the first zero byte, and the driver then saw (x, 0, 0) and refused the launch."""
    import ctypes
    import struct
    from dtypeforge.runtime.cuda import _LaunchAttribute
    assert ctypes.sizeof(_LaunchAttribute) == 72           # sizeof(CUlaunchAttribute) in cuda.h
    raw = bytes(_LaunchAttribute(4, 9, 1, 1))
    assert struct.unpack_from("<IIIII", raw) == (4, 0, 9, 1, 1) and raw[20:] == bytes(52)
    pdl = bytes(_LaunchAttribute(6, 1))
    assert struct.unpack_from("<III", pdl) == (6, 0, 1) and pdl[12:] == bytes(60)


def test_a_kernel_keeps_the_largest_shared_memory_any_of_its_launches_needs(monkeypatch):
    """One kernel serves launches of different sizes (the separate layout's q/k/v, down and lm_head
    are the same GEMV). The driver's dynamic shared-memory allowance belongs to the function, so
    setting it per launch to that launch's size left it at the last one's (lm_head's) and the down
    projection refused (CUDA_ERROR_INVALID_VALUE, seen on the H200 when every GEMV's shared memory grew
    past 48 KiB): it only ever grows."""
    from dtypeforge.runtime import cuda

    class FakeDriver:
        def __init__(self):
            self.set = []

        def cuModuleGetFunction(self, out, module, name):
            return 0

        def cuFuncSetAttribute(self, fn, attr, value):
            self.set.append((attr, value))
            return 0

    drv = FakeDriver()
    monkeypatch.setattr(cuda, "_libcuda", lambda: drv)
    m = cuda._Module.__new__(cuda._Module)
    m.h, m.functions, m.smem_allowed = None, {}, {}
    for smem in (72 * 1024, 16 * 1024, 96 * 1024, 72 * 1024):   # q_proj, (small), down_proj, lm_head
        m.function("gemv", smem)
    assert all(attr == cuda._MAX_DYNAMIC_SHARED_SIZE_BYTES for attr, _ in drv.set)
    assert drv.set[-1][1] == 96 * 1024, drv.set


def test_compile_cli_builds_the_entry_points_a_model_gets(tmp_path):
    """`codegen compile` builds the generic entry points; with --model, the ones the runtime compiles for
    that model's shapes (one per op, `<kernel>__<op>`), and not the generic ones."""
    from dtypeforge.cli import main
    model = write_synthetic_model(tmp_path / "tiny", shape="tiny")
    manifest = load_target(GENERATED / "llama.h200.f16.fused").manifest
    generic = {l.kernel for l in manifest.decode_step}
    shaped = {l.shaped_kernel for l in manifest.decode_step}
    for args, want, not_want in (((), generic, shaped), (("--model", str(model)), shaped, generic)):
        cubin = tmp_path / f"k{len(args)}.cubin"
        assert main(["compile", "--device", "h200", "--policy", "f16", "--cubin", str(cubin), *args]) == 0
        data = cubin.read_bytes()
        for name in want:
            assert name.encode() + b"\0" in data, name
        for name in not_want:
            assert name.encode() + b"\0" not in data, name


def test_bench_at_depth_and_prefill_on_the_cpu(tmp_path):
    """`bench --depth D --prefill N` times the decode steps after D positions and a prompt of N tokens (the
    reference backend here; the GPU's replays take the same positions), and refuses more than the context."""
    from dtypeforge.cli import main
    from dtypeforge.runtime.synth import write_synthetic_model
    model = write_synthetic_model(tmp_path / "m", seed=5)
    r = subprocess.run([sys.executable, "-m", "dtypeforge.cli", "bench", "--model", str(model), "--backend", "cpu",
                        "--tokens", "4", "--depth", "200", "--prefill", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prefill of 8 tokens" in r.stdout and "time to first token" in r.stdout
    assert "4 tokens at context depth 200" in r.stdout
    assert main(["bench", "--model", str(model), "--backend", "cpu", "--depth", "250"]) == 1   # 256 positions
