"""Op-by-op check of a target's GPU kernels against the reference backend's ops.

As llama.cpp's test-backend-ops does for its backends: every distinct entry point the backend
launches (one per kernel, or with the model's shapes compiled in, one per op) is launched alone
on fresh random inputs (never zeros), its outputs first poisoned with NaN, and compared with the
reference implementation of the same op under the same policy. The reference's outputs start
as NaN too, so an element the reference leaves unwritten (a KV cache row other than ``pos``)
must stay unwritten on the GPU, and every element it writes must be written and agree within
the error bound of its dtype. A grid-stride kernel is checked
twice: with the grid the runtime launches and with a single block, whose warps then each loop
over many rows (the path a long row count takes on a full GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtypeforge.codegen.dtypes import from_storage, round_to, to_storage

from .binding import INDEX
from .reference import OPS

# max |gpu - ref| / (1 + max |ref|) <= RTOL[d], norm-wise over each output tensor, d the coarsest
# dtype the op stores or rounds through (the output's, and its compute/accumulate/output role
# dtypes; not its inputs', which are exact values): covers summation order
# and f32 math library differences, plus one rounding step of d. A kernel that rounds an
# intermediate (the RMSNorm output to bf16 before a GEMV with an f32 output) may round one element
# the other way after a 1-ulp f32 difference, which moves every output by |w| * ulp(d): tiny against
# the tensor's scale, but not against an output near 0 (so norm-wise), and not within one rounding
# of the f32 output (so d, not the output's dtype).
RTOL = {"f32": 2e-4, "f16": 2 ** -9, "bf16": 2 ** -6}


@dataclass
class OpResult:
    kernel: str
    op: str
    max_err: float       # max |gpu - ref| / (1 + max |ref|) over written elements
    bound: float
    ok: bool
    detail: str = ""


def _bytes(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).view(np.uint8)


def _fill(rng, info, shape, pos: int, vocab: int) -> np.ndarray:
    if info.dtype == INDEX:
        return np.array([pos], np.int32) if info.name == "pos" else rng.integers(0, vocab, size=shape, dtype=np.int32)
    return round_to(rng.standard_normal(shape, dtype=np.float32), info.dtype)


def check_target_ops(cuda_be, ref_be, seed: int = 0, pos: int = 37) -> list[OpResult]:
    """Launch each distinct entry point of ``cuda_be`` alone and compare with ``ref_be`` (same target, same weights)."""
    rng = np.random.default_rng(seed)
    results, seen = [], set()
    for idx, launch in enumerate(cuda_be.launches):
        entry = cuda_be.entries[idx]     # the shaped entries are one per op: each is checked
        if entry in seen:
            continue
        seen.add(entry)
        variants = [("", cuda_be.calls[idx])]
        if launch.grid_stride:
            variants.append((" [1 block]", cuda_be.launch_with_grid(idx, (1, 1, 1))))
        for suffix, call in variants:
            _, ref_args, dtypes = ref_be.program[idx]
            results.append(_check_one(cuda_be, ref_args, dtypes, launch, call, rng, pos, entry + suffix))
    return results


def check_prefill_ops(cuda_be, ref_be, tokens: int, seed: int = 0, pos: int = 37) -> list[OpResult]:
    """The same check for each distinct entry point of one prefill launch of `tokens` rows at `pos`
    (pos + tokens must fit the context)."""
    rng = np.random.default_rng(seed)
    calls = [iter(part) for part in cuda_be.prefill_calls(tokens)]   # (every chunk's, the final ones)
    results, seen = [], set()
    for _, ref_args, dtypes, final in ref_be.prefill_program(tokens):
        call = next(calls[final])
        entry = call.launch.shaped_kernel if cuda_be.shaped else call.launch.kernel
        if entry not in seen:
            seen.add(entry)
            results.append(_check_one(cuda_be, ref_args, dtypes, call.launch, call, rng, pos, entry))
    return results


def _check_one(cuda_be, ref_args, dtypes, launch, call, rng, pos: int, name: str) -> OpResult:
    drv, table, env = cuda_be.drv, cuda_be.table, cuda_be.env
    outs = []
    for a in launch.args:
        if a.buffer is None or table[a.buffer].weight:
            continue
        info = table[a.buffer]
        ptr = cuda_be.ptr[a.buffer] + a.offset * info.itemsize
        ref_view = ref_args[a.param]
        if a.kind in ("out", "index_out"):
            poison = np.full(a.shape, -1 if info.dtype == INDEX else np.nan, np.int32 if info.dtype == INDEX else np.float32)
            ref_view[...] = poison
            drv.memcpy_htod(ptr, _bytes(poison if info.dtype in (INDEX, "f32") else to_storage(poison, info.dtype)))
            outs.append((a, info, ptr, ref_view))
        else:
            vals = _fill(rng, info, a.shape, min(pos, env["max_seq"] - 1), env["vocab"])
            ref_view[...] = vals
            drv.memcpy_htod(ptr, _bytes(vals if info.dtype in (INDEX, "f32") else to_storage(vals, info.dtype)))
            if a.kind in ("inout", "index_inout"):
                outs.append((a, info, ptr, ref_view))
    call.run()
    cuda_be.stream.synchronize()
    OPS[launch.template](ref_args, dtypes)
    rounds_through = [d for f, d in dtypes.items() if f.rsplit(".", 1)[-1] in ("compute", "accumulate", "output")]
    worst, detail, ok = 0.0, "", True
    bound = 0.0
    for a, info, ptr, ref_view in outs:
        host = np.empty(a.shape, cuda_be._np(info.dtype))
        drv.memcpy_dtoh(_bytes(host), ptr)
        got = host if info.dtype == INDEX else from_storage(host, info.dtype)
        want = np.asarray(ref_view)
        if info.dtype == INDEX:
            if not np.array_equal(got, want):
                ok, detail = False, f"{a.param}: got {got.ravel()[:4]}, want {want.ravel()[:4]}"
            continue
        tol = max(RTOL[d] for d in (info.dtype, *rounds_through) if d in RTOL)
        bound = max(bound, tol)
        unwritten_ref, unwritten_gpu = np.isnan(want), np.isnan(got)
        if not np.array_equal(unwritten_ref, unwritten_gpu):
            n = int((unwritten_ref != unwritten_gpu).sum())
            ok, detail = False, f"{a.param}: {n} elements written by only one of gpu/reference"
            continue
        m = ~unwritten_ref
        err = float(np.max(np.abs(got[m] - want[m]), initial=0.0) / (1.0 + np.max(np.abs(want[m]), initial=0.0)))
        worst = max(worst, err)
        if err > tol:
            ok, detail = False, f"{a.param}: max scaled error {err:.3g} > {tol:.3g}"
    return OpResult(name, launch.op, worst, bound, ok, detail)
