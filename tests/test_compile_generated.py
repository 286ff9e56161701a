"""Every generated target's kernels compile for its device's arch with the real toolchain:
nvcc 13 for sm_75 to sm_121, CUDA 12.9 NVRTC + ptxas for the archs CUDA 13 dropped (the M40's sm_52,
the P40's sm_61, the V100's sm_70). Both builds: the generic entry points (as generated), and the ones
the runtime compiles with a model's shapes (-DDTF_SHAPED, here SmolLM2-135M's).

Targets whose kernels differ only in the header comment (h100 and h200 share sm_90 and
policies) are compiled once; the set of distinct sources is what the compiler must accept."""
from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest

from dtypeforge.codegen.build import GENERATED
from dtypeforge.codegen.compile import compile_cubin, toolchains_for
from dtypeforge.codegen.expr import evaluate
from dtypeforge.runtime.binding import shape_defines
from dtypeforge.runtime.synth import hf_config
from dtypeforge.runtime.target import load_target, model_env

REGISTER_FILE = 65536            # 32-bit registers per SM on every arch the specs name (sm_52 .. sm_121)


def _distinct_sources():
    seen = {}
    for d in sorted(GENERATED.iterdir()):
        cu = d / "kernels.cu"
        if not cu.exists():
            continue
        arch = json.loads((d / "manifest.json").read_text())["arch"]
        body = "\n".join(l for l in cu.read_text().splitlines() if not l.startswith("// "))
        key = (arch, hashlib.sha256(body.encode()).hexdigest())
        seen.setdefault(key, d.name)
    return sorted((arch, name) for (arch, _), name in seen.items())


SOURCES = _distinct_sources()


def test_every_arch_is_covered():
    assert {a for a, _ in SOURCES} == {"sm_52", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100", "sm_121"}


def _block_threads(manifest, shaped: bool) -> dict[str, int]:
    """Threads per block of each entry point a launch may use (a kernel's or variant's, or with shapes
    compiled in, its shaped entry), the largest over the launches (a block that is an expression,
    RoPE's head_dim // 2, at the largest head_dim attention supports, 256)."""
    out: dict[str, int] = {}
    key = "shaped_kernel" if shaped else "kernel"
    for launch in manifest.decode_step + manifest.prefill_step:
        n = int(evaluate(launch.block, {"head_dim": 256}))
        for name in [getattr(e, key) for e in (launch, *(launch.variants or ()))]:
            out[name] = max(n, out.get(name, 0))
    return out


@pytest.mark.compile
@pytest.mark.parametrize("shaped", [False, True], ids=["generic", "shaped"])
@pytest.mark.parametrize("arch,target", SOURCES, ids=[t for _, t in SOURCES])
def test_target_compiles(arch, target, shaped, tmp_path, caplog):
    """The cubin holds every entry point, and (where nvcc builds it, so ptxas reports its resources)
    each one's registers times its block size fit one SM's register file: otherwise every launch of it
    fails with 'too many resources requested', on the GPU only. The attention kernel's 512 threads
    leave it 128 registers, exactly what it uses; its launch bound keeps it there."""
    via_nvcc = toolchains_for(arch).startswith("nvcc")
    manifest = load_target(GENERATED / target).manifest
    defines = shape_defines(manifest, model_env(manifest, hf_config("smollm2-135m"), "smollm2-135m")) if shaped else ()
    with caplog.at_level(logging.DEBUG, logger="dtypeforge.codegen.compile"):
        cubin = compile_cubin(GENERATED / target / "kernels.cu", arch, tmp_path / "k.cubin",
                              options=(("-Xptxas", "-v") if via_nvcc else ()) + defines)
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF"
    threads = _block_threads(manifest, shaped)
    for name in threads:
        assert name.encode() in data, f"{name} missing from the {arch} cubin of {target}"
    if not via_nvcc:
        return
    used = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", caplog.text, re.S))
    assert set(used) == set(threads), f"ptxas reported {sorted(used)}"
    for name, n in threads.items():
        assert int(used[name]) * n <= REGISTER_FILE, f"{name}: {used[name]} registers x {n} threads > {REGISTER_FILE}"


@pytest.mark.compile
@pytest.mark.parametrize("wgmma", [0, 1])
def test_launch_sizes_mirror_the_device_headers(tmp_path, wgmma):
    """The shared memory the Plan writes into manifests for the prefill GEMM tiles and prefill attention
    (kernels.gemm_smem_bytes, expr.prefill_attn_smem) is what dtf/gemm.cuh and dtf/prefill_attention.cuh
    compute for themselves: both functions evaluated by nvcc's host compiler for every tile, compute
    dtype, head_dim and cache element size, with the wgmma path (sm_90a) compiled in and without."""
    import subprocess

    from dtypeforge.codegen.compile import HEADERS
    from dtypeforge.codegen.expr import prefill_attn_smem
    from dtypeforge.codegen.kernels import GEMM_TILES, GEMM_WIDE_TILES, gemm_smem_bytes
    tiles_made = GEMM_TILES + (GEMM_WIDE_TILES if wgmma else ())
    src = tmp_path / "sizes.cu"
    tiles = "".join(f'  printf("gemm %d %d %d %d\\n", 2, {m}, {n}, dtf::gemm_smem_bytes<__half, __half, __half, {m}, {n}>());\n'
                    f'  printf("gemm %d %d %d %d\\n", 4, {m}, {n}, dtf::gemm_smem_bytes<float, float, float, {m}, {n}>());\n'
                    for m, n in tiles_made)
    src.write_text(f"#define DTF_FP8 1\n#define DTF_ARITH_F16 1\n#define DTF_ARITH_BF16 1\n#define DTF_PDL 0\n#define DTF_GEMM_WGMMA {wgmma}\n"
                   "#define DTF_GEMV_LOADS 8\n#define DTF_GEMV_ROTATE_BATCHES 0\n#define DTF_L2_PREFETCH_KIB 0\n"
                   "#define DTF_ATTN_THREADS 512\n#define DTF_ATTN_MAX_HEAD_DIM 256\n#include <cstdio>\n"
                   '#include "dtf/dtypes.cuh"\n#include "dtf/rows.cuh"\n#include "dtf/attention.cuh"\n'
                   '#include "dtf/gemm.cuh"\n#include "dtf/prefill_attention.cuh"\nint main() {\n' + tiles +
                   '  for (int hd = 2; hd <= 256; hd += 2)\n    for (int eb = 2; eb <= 4; eb += 2)\n'
                   '      printf("attn %d %d %d\\n", hd, eb, dtf::prefill_attn_smem_bytes(hd, eb));\n}\n')
    exe = tmp_path / "sizes"
    subprocess.run(["nvcc", "-std=c++17", f"-I{HEADERS}", "-gencode=arch=compute_90a,code=sm_90a" if wgmma else "-arch=sm_90", "-o", str(exe), str(src)],
                   check=True, capture_output=True)
    lines = [l.split() for l in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()]
    gemm = [tuple(map(int, l[1:])) for l in lines if l[0] == "gemm"]
    attn = [tuple(map(int, l[1:])) for l in lines if l[0] == "attn"]
    assert len(gemm) == 2 * len(tiles_made) and len(attn) == 256
    assert [(c, m, n, gemm_smem_bytes(c, m, n, bool(wgmma))) for c, m, n, _ in gemm] == gemm
    assert [(hd, eb, prefill_attn_smem(hd, eb)) for hd, eb, _ in attn] == attn


@pytest.mark.compile
def test_a_cluster_split_tile_renders_launches_and_compiles(tmp_path):
    """A device spec asking for a K split (`gemm_tiles: {gemm_residual: 128x256/4}`) reaches the three
    places that must agree: the launch (grid four blocks a tile, the 128x256 tile's wgmma stages as
    shared memory), the entry points (a 4-block cluster), and sm_90a code that ptxas accepts; no spec
    ships a split, so only this test builds one."""
    import shutil

    from dtypeforge.codegen.contract import load_manifest
    from dtypeforge.codegen.kernels import gemm_smem_bytes
    from dtypeforge.codegen.plan import resolve
    from dtypeforge.codegen.render import render
    from dtypeforge.codegen.specs import load_specs
    from dtypeforge.runtime.binding import shape_defines
    specs_dir = shutil.copytree(GENERATED.parent / "specs", tmp_path / "specs")
    dev = specs_dir / "devices" / "h100.yaml"
    dev.write_text(re.sub(r"gemm_residual: \w+", "gemm_residual: 128x256/4", dev.read_text()))
    files = render(resolve(load_specs(specs_dir), "h100", "f16", "fused"))
    manifest = load_manifest(json.loads(files["manifest.json"]), "manifest.json")
    residual = [l for l in manifest.prefill_step if l.kernel.startswith("gemm_residual_")]
    assert len(residual) == 2   # o-proj and down
    for launch in residual:
        env = {"m": 512, "rows": 2048}
        assert evaluate(launch.grid, env) == 4 * 8 * 4, launch.grid   # 4 row tiles x 8 column tiles x 4 blocks
        assert evaluate(launch.smem, env) == gemm_smem_bytes(2, 128, 256, True)
    cu = tmp_path / "kernels.cu"
    cu.write_text(files["kernels.cu"])
    entries = re.findall(r'extern "C" __global__ void (__cluster_dims__\(4, 1, 1\) )?(gemm_residual_\w+)\(', files["kernels.cu"])
    assert entries and all(cluster for cluster, _ in entries), entries
    defines = shape_defines(manifest, model_env(manifest, hf_config("llama-3.2-1b"), "llama-3.2-1b"))
    cubin = compile_cubin(cu, "sm_90a", tmp_path / "k.cubin", options=defines)
    assert all(name.encode() in cubin.read_bytes() for _, name in entries)
