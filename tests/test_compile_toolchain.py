"""codegen.compile builds real cubins: nvcc 13 for sm_90/100/121, CUDA 12.9 NVRTC + ptxas for sm_52.

Nothing here is skipped: CI and every developer machine have nvcc 13, and
`pip install -e '.[test]'` brings the sm52 extra, so a missing toolchain fails.

The arch a cubin targets is read from its ELF header, not trusted from the command
line. No cuobjdump or nvdisasm ships with the toolkit here or in the cu12 wheels (and
CUDA 13.5's nvdisasm refuses sm_52), so the e_flags decoding below was checked once
against cuobjdump 13.5 (`cuobjdump -sass` names "code for sm_52/sm_90/sm_100/sm_121").
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dtypeforge.codegen.compile import CompileError, ToolchainError, compile_cubin, toolchains_for

pytestmark = pytest.mark.compile

# Representative of generated kernels: every storage dtype's conversions (fp8 included,
# on every arch, to show cuda_fp8.h builds for compute_52), 16-byte uint4 vector loads,
# warp shuffles, <stdint.h> types (NVRTC has no stdint.h of its own) and extern "C" entries.
KERNELS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

static __device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void dot_f16_bf16(const __half* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                        float* __restrict__ out, int n) {
    const uint4* a4 = reinterpret_cast<const uint4*>(a);
    const uint4* b4 = reinterpret_cast<const uint4*>(b);
    float acc = 0.f;
    for (int i = threadIdx.x; i < n / 8; i += blockDim.x) {
        const uint4 va = a4[i], vb = b4[i];
        const __half* ha = reinterpret_cast<const __half*>(&va);
        const __nv_bfloat16* hb = reinterpret_cast<const __nv_bfloat16*>(&vb);
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc += __half2float(ha[j]) * __bfloat162float(hb[j]);
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, acc);
}

extern "C" __global__ void dequant_fp8_int8(const __nv_fp8_e4m3* __restrict__ w8, const int8_t* __restrict__ q,
                                            const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                            __nv_fp8_e4m3* __restrict__ requant, uint32_t n) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float w = static_cast<float>(w8[i]) + static_cast<float>(q[i]);
    y[i] = __float2bfloat16(w * scale[i / 32]);
    requant[i] = __nv_fp8_e4m3(__float2half(w));
}
"""

EM_CUDA = 190


def cubin_sm(data: bytes) -> int:
    """The SM number a cubin's ELF header says it is for.

    e_flags carries it in bits 0-7 under CUDA ELF ABI version 7 (ptxas <= 12.x, as in
    the sm52 extra) and in bits 8-15 under ABI version 8 (CUDA 13).
    """
    assert data[:4] == b"\x7fELF", f"not an ELF file: {data[:16]!r}"
    assert data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    assert struct.unpack_from("<H", data, 18)[0] == EM_CUDA, "ELF machine is not EM_CUDA"
    e_flags = struct.unpack_from("<I", data, 48)[0]
    abi_version = data[8]
    if abi_version == 7:
        return e_flags & 0xFF
    if abi_version == 8:
        return (e_flags >> 8) & 0xFF
    raise AssertionError(f"unknown CUDA ELF ABI version {abi_version}")


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    path = tmp_path / "gen" / "kernels.cu"
    path.parent.mkdir()
    path.write_text(KERNELS)
    return path


def _check_cubin(path: Path, sm: int, entries: tuple[str, ...] = ("dot_f16_bf16", "dequant_fp8_int8")) -> None:
    data = path.read_bytes()
    assert cubin_sm(data) == sm
    for entry in entries:
        assert entry.encode() + b"\0" in data, f"extern \"C\" kernel {entry} missing from {path}"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


@pytest.mark.parametrize("arch", ["sm_90", "sm_100", "sm_121"])
def test_nvcc_builds_modern_archs(kernels: Path, arch: str) -> None:
    assert toolchains_for(arch).startswith("nvcc 13.")
    out = compile_cubin(kernels, arch)
    assert out == kernels.with_name(f"kernels.{arch}.cubin")
    _check_cubin(out, int(arch[3:]))


def test_nvrtc_ptxas_builds_sm52(kernels: Path, tmp_path: Path) -> None:
    assert toolchains_for("sm_52").startswith("NVRTC 12.9 + ptxas 12.9")
    out = compile_cubin(kernels, "sm_52", tmp_path / "cubins" / "m40" / "k.cubin")
    assert out == tmp_path / "cubins" / "m40" / "k.cubin"
    _check_cubin(out, 52)


def test_nvrtc_resolves_quoted_includes_next_to_source(tmp_path: Path) -> None:
    (tmp_path / "common.cuh").write_text("#define WIDTH 8\n")
    src = tmp_path / "k.cu"
    src.write_text('#include "common.cuh"\nextern "C" __global__ void k(float* y) { y[0] = WIDTH; }\n')
    _check_cubin(compile_cubin(src, "sm_52"), 52, entries=("k",))


@pytest.mark.parametrize("arch", ["sm_90", "sm_52"])
def test_syntax_error_quotes_compiler_and_keeps_old_cubin(kernels: Path, arch: str) -> None:
    out = kernels.with_name(f"kernels.{arch}.cubin")
    out.write_bytes(b"previous cubin")
    kernels.write_text(KERNELS.replace("float acc = 0.f;", "float acc = 0.f"))
    # Both front ends (EDG) report the missing ';' on the statement that follows it.
    line = 1 + KERNELS.splitlines().index("    float acc = 0.f;") + 1
    with pytest.raises(CompileError) as err:
        compile_cubin(kernels, arch)
    message = str(err.value)
    assert arch in message
    assert f'{kernels}({line}): error: expected a ";"' in message
    assert out.read_bytes() == b"previous cubin"
    assert sorted(p.name for p in kernels.parent.iterdir()) == ["kernels.cu", out.name]


@pytest.mark.parametrize("arch", ["sm_90", "sm_52"])
def test_ptxas_error_is_quoted(tmp_path: Path, arch: str) -> None:
    # Valid C++ that only the assembler rejects: 64 KiB of static shared memory (48 KiB max).
    src = tmp_path / "smem.cu"
    src.write_text('extern "C" __global__ void too_much_smem(float* y) {\n'
                   "    __shared__ float s[16384];\n"
                   "    s[threadIdx.x] = y[threadIdx.x];\n"
                   "    __syncthreads();\n"
                   "    y[threadIdx.x] = s[16383 - threadIdx.x];\n"
                   "}\n")
    with pytest.raises(CompileError, match=r"ptxas error +: Entry function 'too_much_smem' uses too much shared data"):
        compile_cubin(src, arch)
    assert [p.name for p in tmp_path.iterdir()] == ["smem.cu"]


def test_arch_no_toolchain_supports() -> None:
    with pytest.raises(ToolchainError) as err:
        toolchains_for("sm_20")
    message = str(err.value)
    assert "no toolchain can build sm_20" in message
    assert "nvcc 13.0" in message and "sm_75" in message       # what CUDA 13 offers
    assert "NVRTC 12.9" in message and "sm_50" in message      # what the sm52 extra offers
    assert "predates Maxwell" in message


def test_sm52_without_extra_says_what_to_install() -> None:
    # A fresh interpreter in which the `nvidia` wheels cannot be imported, as when the
    # sm52 extra is not installed.
    probe = (
        "import sys; sys.modules['nvidia'] = None\n"
        "from dtypeforge.codegen.compile import ToolchainError, toolchains_for\n"
        "try:\n    toolchains_for('sm_52')\n"
        "except ToolchainError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "no toolchain can build sm_52" in out
    assert "nvidia-cuda-nvrtc-cu12 is not installed" in out
    assert "CUDA 13 dropped" in out and "pip install -e '.[sm52]'" in out


@pytest.mark.parametrize("arch", ["sm90", "compute_90", "sm_9", "sm_1000", "SM_90", "sm_90ab"])
def test_malformed_arch_rejected(kernels: Path, arch: str) -> None:
    with pytest.raises(ValueError, match="not of the form"):
        compile_cubin(kernels, arch)

