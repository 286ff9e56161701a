"""Compile a generated ``kernels.cu`` into a cubin for one GPU architecture.

Two toolchains cover Maxwell (sm_52) to Blackwell (sm_100 / sm_121):

* **nvcc** from the CUDA toolkit on PATH (13.0 on the developers' machines and CI).
  CUDA 13 builds sm_75 and newer only: it dropped sm_5x, sm_6x, sm_70 and sm_72.
* **CUDA 12.9 from PyPI** (the ``sm52`` extra): NVRTC (``libnvrtc.so.12`` from
  ``nvidia-cuda-nvrtc-cu12``) compiles to PTX against the headers of
  ``nvidia-cuda-runtime-cu12``, and the ptxas of ``nvidia-cuda-nvcc-cu12`` assembles
  the PTX to a cubin. That wheel ships ptxas but no nvcc driver, hence NVRTC as the
  front end. It is the only way here to build the M40's sm_52, the P40's sm_61 and the
  V100's sm_70.

nvcc is used for every arch it supports, the CUDA 12.9 pair for the others (and for
every arch it supports when there is no nvcc). ``toolchains_for`` says which one an
arch gets, and ``ToolchainError`` says what to install when neither fits.

What NVRTC 12.9 needs, found by compiling the project's kernels with it:

* No ``<stdint.h>``: NVRTC has no C library headers, and nothing in the CUDA headers
  defines ``int8_t``/``uint32_t``. NVRTC is handed an in-memory ``stdint.h``
  (``_NVRTC_STDINT``) so kernels keep ``#include <stdint.h>`` and build under both
  toolchains; it has the exact-width and pointer-sized types only, typed as glibc
  does on x86-64 (``int64_t`` is ``long``), so overload resolution (``atomicAdd``
  has no ``unsigned long`` overload) fails or works alike under nvcc and NVRTC.
* The program is named by the source's absolute path, which makes NVRTC resolve
  ``#include "x.cuh"`` next to the source, as nvcc does.
* ``-default-device`` is not needed: ``constexpr`` and ``__constant__``
  namespace-scope data compile without it, and leaving it off keeps NVRTC from
  accepting unannotated functions that nvcc would treat as host code.
* NVRTC rejects ``-O3`` (device optimisation is ptxas's, at -O3 by default), and has
  no switch for its "architectures prior to compute_75 are deprecated" warning,
  which therefore only goes to the debug log, like any other successful-compile
  output.
* ``int8_t`` only where the kernels ``#include <stdint.h>`` (nvcc's headers bring it in
  anyway): the int8 targets of the V100 were the first NVRTC build to need it.
* ``cuda_fp8.h`` conversions compile for compute_52 (as software emulation, with no
  fp8 ``cvt`` instructions); policies keep fp8 off sm_52 regardless.

``options`` are handed to the front end verbatim (nvcc or NVRTC), so callers should
use those both understand: ``-D``, ``-I``, ``-lineinfo``, ``--use_fast_math``.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CompileError", "ToolchainError", "compile_cubin", "toolchains_for"]

_log = logging.getLogger(__name__)
# The shared device headers every generated kernels.cu includes ("dtf/dtypes.cuh", ...): the package's
# templates/ folder is on the include path of every compile.
HEADERS = Path(__file__).resolve().parent.parent / "templates"


def header_files() -> list[Path]:
    """The headers a compile can include, for cache keys that must change when one does."""
    return sorted((HEADERS / "dtf").glob("*.cuh"))

ARCH_RE = re.compile(r"^sm_([0-9]{2,3})([a-z]?)$")

# Lines of compiler output an error message quotes; the rest is counted, not shown.
_DIAGNOSTIC_LINES = 40

_SM52_HINT = (
    "CUDA 13 dropped sm_5x, sm_6x, sm_70 and sm_72; install the sm52 extra "
    "(CUDA 12.9 NVRTC + ptxas from PyPI): pip install -e '.[sm52]'"
)

_NVRTC_STDINT = b"""\
#pragma once
static_assert(sizeof(long) == 8, "dtypeforge's NVRTC stdint.h assumes LP64");
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;
"""


class ToolchainError(Exception):
    """No installed toolchain can build the requested arch; the message says what to install."""


class CompileError(Exception):
    """A toolchain rejected the source; the message quotes its diagnostics."""


def _quote_output(output: str) -> str:
    lines = output.strip().splitlines()
    shown = "\n".join(lines[:_DIAGNOSTIC_LINES])
    if len(lines) > _DIAGNOSTIC_LINES:
        shown += f"\n[... {len(lines) - _DIAGNOSTIC_LINES} more lines]"
    return shown


def _run(cmd: list[str], what: str) -> None:
    """Run a compiler; its output is an error's diagnostics or, on success, debug log."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise CompileError(
            f"{what} (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{_quote_output(proc.stdout)}"
        )
    if proc.stdout.strip():
        _log.debug("%s: %s", " ".join(cmd), proc.stdout)


def _sm_list(archs: Sequence[int]) -> str:
    return " ".join(f"sm_{n}" for n in sorted(archs))


@dataclass(frozen=True)
class _Missing:
    """A toolchain that is not installed, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class _Nvcc:
    exe: str
    version: str
    archs: frozenset[int]

    def __str__(self) -> str:
        return f"nvcc {self.version} ({self.exe})"

    def compile(self, source: Path, arch: str, out: Path, options: Sequence[str]) -> None:
        cmd = [self.exe, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", *options,
               "-o", str(out), str(source)]
        _run(cmd, f"{self} failed to compile {source} for {arch}")


@dataclass(frozen=True)
class _Nvrtc12:
    lib: ctypes.CDLL
    include_dir: Path
    ptxas: Path
    version: str
    ptxas_version: str
    archs: frozenset[int]

    def __str__(self) -> str:
        return (f"NVRTC {self.version} + ptxas {self.ptxas_version} "
                f"(CUDA 12 wheels of the sm52 extra, {self.ptxas.parent.parent.parent})")

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed: {self.lib.nvrtcGetErrorString(status).decode()}")

    def _ptx(self, source: Path, arch: str, options: Sequence[str]) -> bytes:
        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.read_bytes(), str(source).encode(),
            1, (ctypes.c_char_p * 1)(_NVRTC_STDINT), (ctypes.c_char_p * 1)(b"stdint.h"),
        ), "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}", "-std=c++17",
                    f"-I{self.include_dir}", *options]
            status = lib.nvrtcCompileProgram(
                prog, len(opts), (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts)))
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            log_text = log.value.decode(errors="replace")
            if status != 0:
                raise CompileError(
                    f"{self} failed to compile {source} for {arch} "
                    f"({lib.nvrtcGetErrorString(status).decode()}):\n"
                    f"NVRTC options: {' '.join(opts)}\n{_quote_output(log_text)}"
                )
            if log_text.strip():
                _log.debug("NVRTC %s for %s: %s", source, arch, log_text)
            self._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return ptx.value
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def compile(self, source: Path, arch: str, out: Path, options: Sequence[str]) -> None:
        ptx = self._ptx(source, arch, options)
        with tempfile.TemporaryDirectory(prefix="dtypeforge-ptx-") as tmp:
            ptx_path = Path(tmp, f"{source.stem}.{arch}.ptx")
            ptx_path.write_bytes(ptx)
            _run([str(self.ptxas), f"-arch={arch}", "-O3", "-o", str(out), str(ptx_path)],
                 f"ptxas {self.ptxas_version} failed to assemble the PTX NVRTC made from {source} for {arch}")


@functools.cache
def _nvcc() -> _Nvcc | _Missing:
    """nvcc on PATH with the real archs it builds (``--list-gpu-code``: cubin targets)."""
    exe = shutil.which("nvcc")
    if exe is None:
        return _Missing("nvcc", "not on PATH")
    version = re.search(r"release (\d+\.\d+)", subprocess.run(
        [exe, "--version"], capture_output=True, text=True, check=True).stdout)
    codes = subprocess.run([exe, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    return _Nvcc(exe, version.group(1) if version else "(unknown version)",
                 frozenset(int(n) for n in re.findall(r"\bsm_(\d+)", codes)))


def _wheel_file(package: str, relative: str) -> Path | None:
    """``relative`` inside namespace package ``nvidia.<package>``, wherever pip put it."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ModuleNotFoundError:
        return None
    for base in (spec.submodule_search_locations or ()) if spec else ():
        if (path := Path(base, relative)).exists():
            return path
    return None


@functools.cache
def _nvrtc12() -> _Nvrtc12 | _Missing:
    """The CUDA 12 NVRTC + ptxas pair from the ``sm52`` extra's wheels."""
    name = "CUDA 12.9 NVRTC + ptxas (sm52 extra)"
    found = {}
    for dist, package, relative in (
        ("nvidia-cuda-nvrtc-cu12", "cuda_nvrtc", "lib/libnvrtc.so.12"),
        ("nvidia-cuda-runtime-cu12", "cuda_runtime", "include/cuda_fp16.h"),
        ("nvidia-cuda-nvcc-cu12", "cuda_nvcc", "bin/ptxas"),
    ):
        path = _wheel_file(package, relative)
        if path is None:
            return _Missing(name, f"{dist} is not installed (no nvidia/{package}/{relative})")
        found[package] = path
    try:
        lib = ctypes.CDLL(str(found["cuda_nvrtc"]))
    except OSError as exc:
        return _Missing(name, f"cannot load {found['cuda_nvrtc']}: {exc}")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                       ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                       ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for fn in ("nvrtcGetProgramLogSize", "nvrtcGetPTXSize"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    for fn in ("nvrtcGetProgramLog", "nvrtcGetPTX"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    major, minor, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    lib.nvrtcGetNumSupportedArchs(ctypes.byref(count))
    archs = (ctypes.c_int * count.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return _Nvrtc12(
        lib=lib,
        include_dir=found["cuda_runtime"].parent,
        ptxas=found["cuda_nvcc"],
        version=f"{major.value}.{minor.value}",
        ptxas_version=importlib.metadata.version("nvidia-cuda-nvcc-cu12"),
        # ptxas comes from the same CUDA release (the extra pins all three to 12.9.*),
        # so it assembles what this NVRTC can target.
        archs=frozenset(archs),
    )


def _select(arch: str) -> _Nvcc | _Nvrtc12:
    match = ARCH_RE.match(arch)
    if match is None:
        raise ValueError(f"arch {arch!r} is not of the form sm_XY or sm_XYZ (e.g. sm_52, sm_90a, sm_121)")
    number = int(match.group(1))
    candidates = (_nvcc(), _nvrtc12())
    for toolchain in candidates:
        if not isinstance(toolchain, _Missing) and number in toolchain.archs:
            return toolchain
    tried = "\n".join(
        f"  {t}" if isinstance(t, _Missing) else f"  {t}: supports {_sm_list(t.archs)}"
        for t in candidates
    )
    hints = []
    if number < 50:
        hints.append(f"{arch} predates Maxwell; neither CUDA 12 nor CUDA 13 targets it.")
    else:
        if isinstance(candidates[1], _Missing):
            hints.append(_SM52_HINT)
        if isinstance(candidates[0], _Missing):
            hints.append("Install the CUDA 13 toolkit so nvcc is on PATH.")
        if not hints:
            hints.append(f"No installed CUDA release targets {arch}; it may need a newer toolkit.")
    raise ToolchainError(f"no toolchain can build {arch}. Tried:\n{tried}\n" + "\n".join(hints))


def toolchains_for(arch: str) -> str:
    """Describe the toolchain ``compile_cubin`` would use for ``arch``.

    Raises ``ValueError`` for a malformed arch and ``ToolchainError`` when nothing
    installed can build it.
    """
    return str(_select(arch))


def compile_cubin(source_path: Path, arch: str, out_path: Path | None = None, *,
                  options: Sequence[str] = ()) -> Path:
    """Compile ``source_path`` to a cubin for ``arch`` and return the cubin's path.

    The default output is ``<source stem>.<arch>.cubin`` beside the source, so every
    arch has one fixed place. The cubin is written to a temporary name in the output
    directory and renamed into place, so a reader never sees a partial file and a
    failed compile leaves any previous cubin untouched.
    """
    if isinstance(options, str):
        raise TypeError("options must be a sequence of option strings, not one string")
    toolchain = _select(arch)
    options = (f"-I{HEADERS}", *options)
    source = Path(source_path).resolve()
    if not source.is_file():
        raise FileNotFoundError(source)
    out = Path(out_path) if out_path is not None else source.with_name(f"{source.stem}.{arch}.cubin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        toolchain.compile(source, arch, tmp, tuple(options))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
