"""The PyCUDA backend: compile a target's kernels, upload packed weights, replay the decode step.

* Kernels are compiled for the GPU's own arch through ``codegen.compile`` (the same toolchain
  code the tests use) into a persistent cache keyed by source, options, toolchain and arch. By
  default the model's shapes are compiled in (``-DDTF_SHAPED``: one entry point per launch, its
  shape arguments constants; ``runtime.binding.shape_defines``), so each model shape has its own cubin.
* Weights go to the GPU exactly as the loader packed them; every launch is bound by
  ``runtime.binding``, which checks each argument's declared dtype and shape against the
  buffer bound to it before the first launch.
* One decode step is captured once as a CUDA graph (PyCUDA has no graph API; stream capture
  goes through libcuda with ctypes) and replayed every step. Position and token live in
  device memory: the host writes them before a replay, and the graph's last kernels write
  the argmax token and advance the position, so greedy decoding can replay back to back.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from dtypeforge.codegen.compile import ARCH_RE, compile_cubin, header_files, toolchains_for
from dtypeforge.codegen.contract import Manifest
from dtypeforge.codegen.dtypes import DTYPES, INDEX_NP, from_storage

from .binding import INDEX, BoundLaunch, bind, buffer_table, prefill_chunks, shape_defines
from .errors import BackendUnavailable, KernelError
from .target import cache_root

CACHE = cache_root() / "cubin"
COMPILE_OPTIONS: tuple[str, ...] = ()


def _driver():
    try:
        import pycuda.driver as drv
    except ImportError:
        raise BackendUnavailable("PyCUDA is not installed (pip install -e '.[cuda]' on a machine with the CUDA "
                                 "toolkit); use --backend cpu") from None
    try:
        drv.init()
        if drv.Device.count() == 0:
            raise BackendUnavailable("no CUDA GPU is visible; use --backend cpu")
    except drv.Error as e:
        raise BackendUnavailable(f"the CUDA driver cannot start ({e}); use --backend cpu") from None
    return drv


def unavailable_reason() -> str | None:
    try:
        _driver()
        return None
    except BackendUnavailable as e:
        return str(e)


def gpu_name() -> str:
    return _driver().Device(0).name()


def check_gpu_runs(manifest: Manifest, gpu: str, major: int, minor: int) -> None:
    """Refuse a target generated for a newer arch than the GPU's, before compiling: its kernels use
    what that arch has (griddepcontrol, bulk prefetch, fp8 conversions), so ptxas would fail deep
    inside the build, or a kernel at launch. A newer GPU runs an older arch's target."""
    spec = manifest.arch
    number, suffix = ARCH_RE.match(spec).groups()
    if suffix and int(number) != 10 * major + minor:   # sm_90a: that arch's own instructions (wgmma), no other
        raise BackendUnavailable(
            f"target {manifest.target} was generated for {spec} (device spec {manifest.device}), whose code runs "
            f"only on sm_{number} GPUs, but this GPU, {gpu}, is sm_{major}{minor}: pass --device auto, or --device with "
            f"a spec for sm_{major}{minor} (`codegen list` shows each spec's arch)")
    if int(number) > 10 * major + minor:
        raise BackendUnavailable(
            f"target {manifest.target} was generated for {spec} (device spec {manifest.device}), but this GPU, "
            f"{gpu}, is sm_{major}{minor}: pass --device auto, or --device with a spec for sm_{major}{minor} or older "
            f"(`codegen list` shows each spec's arch)")


def compile_arch(manifest: Manifest, major: int, minor: int) -> str:
    """The arch a target's kernels are built for on an sm_{major}{minor} GPU: the GPU's own, so ptxas
    tunes for it, except a target generated for an arch-specific spec (sm_90a: wgmma), whose kernels
    build only for that exact arch (``check_gpu_runs`` has refused it on any other GPU)."""
    _, suffix = ARCH_RE.match(manifest.arch).groups()
    return manifest.arch if suffix else f"sm_{major}{minor}"


def cached_cubin(source: Path, arch: str, options=COMPILE_OPTIONS, progress: bool = True, what: str = "") -> Path:
    """Compile ``source`` for ``arch`` once; later calls (any process) reuse the cubin."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in header_files())   # what the compile reads
    key = hashlib.sha256(b"\0".join([text, " ".join(options).encode(), toolchains_for(arch).encode(),
                                     arch.encode()])).hexdigest()[:24]

    def build(tmp: Path) -> None:
        if progress:
            print(f"compiling {source} for {arch}{what} ...", file=sys.stderr, flush=True)
        compile_cubin(source, arch, tmp, options=options)

    return cache_entry(CACHE / f"{source.parent.name}.{arch}.{key}.cubin", build)


def _digest_path(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def _intact(out: Path) -> bool:
    """The cached file matches the sha256 recorded when it was written (a file cut short by a full
    disk or a killed copy, or edited since, does not: the driver would reject it, or worse)."""
    try:
        want = _digest_path(out).read_text(encoding="ascii").strip()
        return hashlib.sha256(out.read_bytes()).hexdigest() == want
    except (OSError, UnicodeDecodeError):
        return False


def cache_entry(out: Path, build) -> Path:
    """``out`` if it is intact, else rebuilt: ``build(tmp)`` writes the new file to a temporary in the
    same folder, its sha256 goes to ``<out>.sha256`` and both are renamed into place, so no reader
    ever sees a partial file and an interrupted build leaves no temporary behind."""
    if _intact(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{out.name}.{os.getpid()}.{threading.get_ident()}"
    tmp, tmp_digest = out.with_name(stem + ".tmp"), out.with_name(stem + ".sha256.tmp")
    try:
        build(tmp)
        tmp_digest.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest() + "\n", encoding="ascii")
        # The digest first: a reader between the two renames sees a mismatch and rebuilds,
        # never an unchecked file.
        os.replace(tmp_digest, _digest_path(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)
    return out


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id and a 64-byte value union, here as 16 unsigned ints (a c_char array
    field stops copying at the first zero byte: a value like a cluster's (x, 1, 1) would lose y and z)."""
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_uint * 16)]

    def __init__(self, id_: int, *value: int):
        super().__init__(id_, 0, (ctypes.c_uint * 16)(*value))


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6          # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8              # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_lib = None


def _libcuda():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL("libcuda.so.1")
    return _lib


def _check(err: int, what: str) -> None:
    if err:
        name = ctypes.c_char_p()
        _libcuda().cuGetErrorName(err, ctypes.byref(name))
        raise KernelError(f"{what} failed: {name.value.decode() if name.value else err}")


class _Module:
    """A cubin loaded through the driver API, whose CUfunction handles cuLaunchKernelEx needs
    (PyCUDA exposes no function handles)."""

    def __init__(self, cubin: Path):
        self.h = ctypes.c_void_p()
        data = cubin.read_bytes()
        _check(_libcuda().cuModuleLoadData(ctypes.byref(self.h), ctypes.c_char_p(data)), f"loading {cubin}")
        self.functions: dict[str, ctypes.c_void_p] = {}
        self.smem_allowed: dict[str, int] = {}

    def function(self, name: str, smem: int) -> ctypes.c_void_p:
        """The kernel's handle, allowed at least `smem` bytes of dynamic shared memory. The allowance is
        the function's, not the launch's: one kernel serving launches of different sizes (the separate
        layout's q/k/v, down and lm_head are the same GEMV) keeps the largest, or the larger launch would fail."""
        if name not in self.functions:
            f = ctypes.c_void_p()
            _check(_libcuda().cuModuleGetFunction(ctypes.byref(f), self.h, name.encode()), f"finding kernel {name}")
            self.functions[name] = f
        if smem > self.smem_allowed.get(name, 48 * 1024):   # 48 KiB: every function's default
            _check(_libcuda().cuFuncSetAttribute(self.functions[name], _MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                   f"{name}: {smem} bytes of shared memory")
            self.smem_allowed[name] = smem
        return self.functions[name]

    def global_ptr(self, name: str) -> tuple[int, int]:
        """Device address and size of a __device__ variable of the module (the timeline's buffers)."""
        ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
        _check(_libcuda().cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), self.h, name.encode()),
               f"finding {name} (compiled without -DDTF_TRACE?)")
        return ptr.value, size.value


class _Launch:
    """One bound launch with its argument block built once; `run` enqueues it on a stream. With
    `pdl`, the launch may begin while the previous kernel finishes (programmatic dependent launch):
    the generated kernels prefetch their weights, then wait for their inputs (griddepcontrol.wait)."""

    def __init__(self, fn, launch: BoundLaunch, args: list, stream, pdl: bool, grid: tuple[int, int, int]):
        self.fn, self.launch = fn, launch
        self._vals = [ctypes.c_uint64(int(a)) if isinstance(a, np.uintp) else
                      (ctypes.c_float(float(a)) if isinstance(a, np.float32) else ctypes.c_int32(int(a))) for a in args]
        self._params = (ctypes.c_void_p * len(self._vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                             for v in self._vals])
        self._attr = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION, 1)
        self.cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*launch.block), launch.smem,
                                 ctypes.c_void_p(stream.handle), ctypes.pointer(self._attr) if pdl else None, int(pdl))

    def run(self) -> None:
        _check(_libcuda().cuLaunchKernelEx(ctypes.byref(self.cfg), self.fn, self._params, None),
               f"launching {self.launch.kernel} (op {self.launch.op})")


class _Graph:
    """A captured stream replayed as one CUDA graph, through libcuda."""

    def __init__(self, stream, record):
        self.lib = _libcuda()
        self.h = ctypes.c_void_p(stream.handle)
        self._check(self.lib.cuStreamBeginCapture_v2(self.h, 0), "cuStreamBeginCapture")
        try:
            record()
        finally:
            graph = ctypes.c_void_p()
            err = self.lib.cuStreamEndCapture(self.h, ctypes.byref(graph))
        self._check(err, "cuStreamEndCapture")
        self.graph, self.exec = graph, ctypes.c_void_p()
        self._check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), graph, ctypes.c_ulonglong(0)),
                    "cuGraphInstantiate")

    _check = staticmethod(_check)

    def launch(self) -> None:
        self._check(self.lib.cuGraphLaunch(self.exec, self.h), "cuGraphLaunch")


class CudaBackend:
    name = "cuda"

    def __init__(self, target, packed, *, use_graph: bool = True, progress: bool = True,
                 options: tuple[str, ...] = COMPILE_OPTIONS, shaped: bool = True):
        drv = self.drv = _driver()
        self.ctx, self.graph, self._prefill_graphs, self.alloc = None, None, {}, {}   # what close() releases
        self.manifest, self.env = target.manifest, packed.env
        dev = drv.Device(0)
        major, minor = dev.compute_capability()
        check_gpu_runs(target.manifest, dev.name(), major, minor)
        self.ctx = dev.retain_primary_context()
        self.ctx.push()
        atexit.register(self.close)
        self.arch = compile_arch(target.manifest, major, minor)
        table = buffer_table(self.manifest, self.env, packed.arrays)
        self.launches: list[BoundLaunch] = bind(self.manifest, self.env, table)   # checks before any allocation
        # the prefill step at its largest block: checked now too, and its kernels' scratch sized
        full_prefill = bind(self.manifest, self.env, table, "prefill_step", self.env["chunk"])

        weights = {id(a): a for a in packed.arrays.values()}
        need = sum(a.nbytes for a in weights.values())
        need += sum(i.nbytes for i in table.values() if not i.weight)
        # each kernel has its own zeroed scratch, shared by its launches: a kernel writes it only after
        # its wait, so two of its launches never use it at once, and it leaves its counters there at
        # zero (kernels keep them at different offsets, so they do not share one scratch)
        self.workspace_bytes: dict[str, int] = {}
        for l in self.launches + full_prefill:
            if any(a.kind == "workspace" for a in l.args):
                self.workspace_bytes[l.kernel] = max(1, l.workspace, self.workspace_bytes.get(l.kernel, 0))
        need += sum(self.workspace_bytes.values())
        free, total = drv.mem_get_info()
        if need > free:
            raise BackendUnavailable(f"target {target.name} needs {need / 2**30:.2f} GiB of device memory for this "
                                     f"model; the GPU has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB")

        # shaped: the entry points compiled for this model's shapes; else the generic ones (shapes as arguments)
        defines = shape_defines(self.manifest, self.env) if shaped else None
        self.shaped = defines is not None
        self.entries = [l.shaped_kernel if self.shaped else l.kernel for l in self.launches]   # what each launch runs
        self.module = _Module(cached_cubin(target.path / "kernels.cu", self.arch, tuple(options) + (defines or ()),
                                           progress=progress, what=" with this model's shapes" if self.shaped else ""))
        self.stream = drv.Stream()
        # kernels generated with griddepcontrol (the device spec's programmatic_dependent_launch) on sm_90+
        self.pdl = self.manifest.programmatic_dependent_launch and major >= 9
        t0 = time.perf_counter()
        self.alloc: dict[str, object] = {}
        by_id: dict[int, object] = {}
        for name, arr in packed.arrays.items():
            if id(arr) not in by_id:
                by_id[id(arr)] = drv.to_device(np.ascontiguousarray(arr).view(np.uint8))
            self.alloc[name] = by_id[id(arr)]
        for info in table.values():
            if not info.weight:
                self.alloc[info.name] = drv.mem_alloc(max(1, info.nbytes))
                drv.memset_d8(self.alloc[info.name], 0, max(1, info.nbytes))
        self.workspace = {k: drv.mem_alloc(n) for k, n in self.workspace_bytes.items()}
        for k, n in self.workspace_bytes.items():
            drv.memset_d8(self.workspace[k], 0, n)
        self.ptr = {n: int(a) for n, a in self.alloc.items()}
        self.table = table
        if progress:
            print(f"uploaded {need / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        self.sms = dev.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        # The step's first launch never overlaps the previous step (no programmatic dependency), so
        # every kernel may read what earlier steps wrote (pos, KV-cache rows < pos) before it waits.
        self.calls = []
        for i, l in enumerate(self.launches):
            fn = self.module.function(self.entries[i], l.smem)
            self.calls.append(_Launch(fn, l, self._args(l), self.stream, self.pdl and i > 0, self._grid(fn, l)))
        self.token = drv.pagelocked_zeros(1, np.int32)
        self.pos = drv.pagelocked_zeros(1, np.int32)
        self.prompt = drv.pagelocked_zeros(self.env["chunk"], np.int32)
        self._prefill: dict[int, tuple[list[_Launch], list[_Launch]]] = {}   # tokens -> (body, final) launches
        self._prefill_graphs: dict[int, _Graph] = {}
        self.logits = drv.pagelocked_empty(table["logits"].nbytes, np.uint8)
        self.graph = _Graph(self.stream, self._enqueue) if use_graph else None

    def _grid(self, fn, l: BoundLaunch) -> tuple[int, int, int]:
        """The launch's grid; a grid-stride kernel gets at most one full wave (SMs x resident blocks
        per SM), so each of its warps streams several rows and its prologue runs once per block.
        (Fewer blocks per SM, to leave room for the next kernel's early start, measured slower.)"""
        if not l.grid_stride:
            return l.grid
        per_sm = ctypes.c_int()
        _check(_libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(per_sm), fn, math.prod(l.block),
                                                                      ctypes.c_size_t(l.smem)), f"occupancy of {l.kernel}")
        return (max(1, min(l.grid[0], self.sms * per_sm.value)),) + tuple(l.grid[1:])

    def launch_with_grid(self, idx: int, grid: tuple[int, int, int]) -> _Launch:
        """Launch `idx` of the step with another grid (grid-stride kernels only; tests)."""
        assert self.launches[idx].grid_stride, self.launches[idx].kernel
        return _Launch(self.calls[idx].fn, self.launches[idx], self._args(self.launches[idx]), self.stream, False, grid)

    @staticmethod
    def _np(dtype: str):
        return INDEX_NP if dtype == INDEX else DTYPES[dtype].np_dtype

    def _args(self, l: BoundLaunch) -> tuple:
        out = []
        for a in l.args:
            if a.buffer is not None:
                out.append(np.uintp(self.ptr[a.buffer] + a.offset * self.table[a.buffer].itemsize))
            elif a.kind == "workspace":
                out.append(np.uintp(int(self.workspace[l.kernel])))
            else:
                out.append(np.float32(a.value) if a.kind == "float" else np.int32(a.value))
        return tuple(out)

    def _enqueue(self) -> None:
        for call in self.calls:
            call.run()

    def _find_failing_kernel(self, err: Exception) -> KernelError:
        """Re-run the step launch by launch, synchronizing after each, to name the culprit."""
        for call, l in zip(self.calls, self.launches):
            try:
                call.run()
                self.stream.synchronize()
            except (self.drv.Error, KernelError) as e:
                layer = "" if l.layer is None else f", layer {l.layer}"
                return KernelError(f"CUDA error in kernel {l.kernel} (op {l.op}{layer}): {e}")
        return KernelError(f"CUDA error during the decode step: {err}")

    def reset(self) -> None:
        for info in self.table.values():
            if not info.weight:
                self.drv.memset_d8(self.alloc[info.name], 0, max(1, info.nbytes))
        for k, n in self.workspace_bytes.items():
            self.drv.memset_d8(self.workspace[k], 0, n)

    def _run(self, token: int, pos: int) -> None:
        self.token[0], self.pos[0] = token, pos
        self.drv.memcpy_htod_async(self.ptr["token"], self.token, self.stream)
        self.drv.memcpy_htod_async(self.ptr["pos"], self.pos, self.stream)
        try:
            if self.graph is not None:
                self.graph.launch()
            else:
                self._enqueue()
            self.stream.synchronize()
        except (self.drv.Error, KernelError) as e:
            raise self._find_failing_kernel(e) from None

    def prefill_calls(self, tokens: int) -> tuple[list[_Launch], list[_Launch]]:
        """One prefill launch of `tokens` rows, bound once per size: the launches every chunk runs, and the
        `final` ones that end the prompt. Each list's first launch waits for all before it (no PDL)."""
        if tokens not in self._prefill:
            parts: tuple[list[_Launch], list[_Launch]] = ([], [])
            for l in bind(self.manifest, self.env, self.table, "prefill_step", tokens):
                fn = self.module.function(l.shaped_kernel if self.shaped else l.kernel, l.smem)
                part = parts[l.final]
                part.append(_Launch(fn, l, self._args(l), self.stream, self.pdl and bool(part), self._grid(fn, l)))
            self._prefill[tokens] = parts
        return self._prefill[tokens]

    def prefill(self, tokens, pos: int = 0) -> np.ndarray:
        """The prompt `tokens` at positions pos.. through the prefill step, a chunk at a time (a full chunk
        replays one CUDA graph, captured on first use; a shorter last one is launched directly); returns
        the last token's logits. The decode step then continues at pos + len(tokens)."""
        chunk = self.env["chunk"]
        try:
            for start, stop, last in prefill_chunks(len(tokens), chunk):
                part = tokens[start:stop]
                self.stream.synchronize()             # the host buffers below are free again
                self.prompt[:len(part)] = part
                self.pos[0] = pos + start
                self.drv.memcpy_htod_async(self.ptr["prompt"], self.prompt, self.stream)
                self.drv.memcpy_htod_async(self.ptr["pos"], self.pos, self.stream)
                body, final = self.prefill_calls(len(part))
                if len(part) == chunk:
                    if chunk not in self._prefill_graphs:
                        self._prefill_graphs[chunk] = _Graph(self.stream, lambda: [c.run() for c in body])
                    self._prefill_graphs[chunk].launch()
                else:
                    for c in body:
                        c.run()
                if last:
                    for c in final:
                        c.run()
            self.stream.synchronize()
        except (self.drv.Error, KernelError) as e:
            raise KernelError(f"CUDA error during prefill: {e}") from None
        self.drv.memcpy_dtoh(self.logits, self.ptr["logits"])
        dt = self.table["logits"].dtype
        return from_storage(self.logits.view(self._np(dt)), dt).astype(np.float32, copy=True)

    def step(self, token: int, pos: int) -> np.ndarray:
        self._run(token, pos)
        self.drv.memcpy_dtoh(self.logits, self.ptr["logits"])
        dt = self.table["logits"].dtype
        return from_storage(self.logits.view(self._np(dt)), dt).astype(np.float32, copy=True)

    def read(self, name: str) -> np.ndarray:
        """A device buffer's contents as its numpy dtype (tests and debugging)."""
        info = self.table[name]
        out = np.empty(info.shape, self._np(info.dtype))
        self.drv.memcpy_dtoh(out.view(np.uint8), self.ptr[name])
        return out

    def greedy(self, first_token: int, pos: int, n: int) -> list[int]:
        """n greedy steps replaying the graph back to back (token and position stay on the device)."""
        self.token[0], self.pos[0] = first_token, pos
        self.drv.memcpy_htod(self.ptr["token"], self.token)
        self.drv.memcpy_htod(self.ptr["pos"], self.pos)
        out = []
        for _ in range(n):
            self.graph.launch()
            self.drv.memcpy_dtoh_async(self.token, self.ptr["token"], self.stream)
            self.stream.synchronize()
            out.append(int(self.token[0]))
        return out

    def close(self) -> None:
        """Free device memory and pop the context (idempotent; also runs at exit)."""
        if self.ctx is not None:
            self.graph = None
            self._prefill_graphs.clear()
            self.alloc.clear()
            self.ctx.pop()
            self.ctx = None
