"""Bind a manifest's decode step to concrete buffers, checking every argument first.

Both backends run the same expansion: per-layer ops are unrolled, ``{i}`` weight names and
``cache[i]`` slices become concrete buffers and offsets, and scalar arguments are evaluated
for the checkpoint's config. Before anything is launched, every pointer argument's declared
dtype and shape (from manifest.json) is compared with the buffer bound to it, whose dtype
and shape come from what the loader actually packed (packing.json) or allocated. A mismatch
raises a ``BindError`` naming the kernel, the argument, what was expected and what was found:
"emitter and loader never disagree" is checked at run time, not assumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dtypeforge.codegen.contract import Manifest, StepOp
from dtypeforge.codegen.dtypes import DTYPES, INDEX_NP
from dtypeforge.codegen.expr import evaluate

INDEX = "index"
_NP_TO_NAME = {d.np_dtype: n for n, d in DTYPES.items()}


class BindError(ValueError):
    pass


@dataclass(frozen=True)
class BufferInfo:
    name: str
    dtype: str                   # a DTYPES key or "index"
    shape: tuple[int, ...]
    weight: bool

    @property
    def itemsize(self) -> int:
        return INDEX_NP.itemsize if self.dtype == INDEX else DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class Arg:
    param: str
    kind: str
    buffer: str | None = None    # pointer args: concrete buffer name
    offset: int = 0              # pointer args: elements into the buffer (layer slices)
    shape: tuple[int, ...] = ()  # pointer args: the shape the kernel sees at that offset
    value: int | float | None = None


@dataclass(frozen=True)
class BoundLaunch:
    op: str
    layer: int | None
    kernel: str
    template: str
    dtypes: dict                 # pointer param / role field -> dtype name (for the reference ops)
    args: tuple[Arg, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int                    # dynamic shared memory bytes
    grid_stride: bool = False    # the kernel is correct with any grid up to `grid`
    workspace: int = 0           # bytes of scratch the backend binds to the kernel's "workspace" argument
    shaped_kernel: str | None = None   # the entry compiled for this model's shapes (-DDTF_SHAPED), if any
    final: bool = False          # prefill: runs only after a prompt's last chunk


def dtype_name(arr: np.ndarray) -> str:
    if arr.dtype == INDEX_NP:
        return INDEX
    name = _NP_TO_NAME.get(arr.dtype)
    if name is None:
        raise BindError(f"array dtype {arr.dtype} is not one of dtypeforge's: {', '.join(DTYPES)}")
    return name


def buffer_table(manifest: Manifest, env: dict, packed: dict[str, np.ndarray]) -> dict[str, BufferInfo]:
    """Weights as the loader packed them; activations and caches as the manifest declares them."""
    table = {name: BufferInfo(name, dtype_name(arr), tuple(arr.shape), True) for name, arr in packed.items()}
    for b in manifest.buffers:
        table[b.name] = BufferInfo(b.name, b.dtype, tuple(evaluate(s, env) for s in b.shape), False)
    return table


def _dim3(v) -> tuple[int, int, int]:
    return (int(v), 1, 1)


def _schedule(step: tuple[StepOp, ...], n_layers: int):
    """(launch, layer) in execution order: each run of consecutive per-layer ops is one
    transformer layer, executed for layer 0, then layer 1, ..."""
    run: list[StepOp] = []
    for launch in step + (None,):
        if launch is not None and launch.per_layer:
            run.append(launch)
            continue
        for i in range(n_layers):
            for l in run:
                yield l, i
        run = []
        if launch is not None:
            yield launch, None


def _check_limits(manifest: Manifest, env: dict) -> None:
    """A model beyond a kernel's limits (sizes its CUDA template fixes at compile time) is refused by
    name, before any buffer is looked at: it is the model's size, not a stale file, that is wrong."""
    for launch in manifest.decode_step + manifest.prefill_step:
        for name, most in (launch.limits or {}).items():
            value = evaluate(next(a.value for a in launch.args if a.param == name), env)
            if value > most:
                raise BindError(f"kernel {launch.kernel} (op {launch.op}): {name} = {value} exceeds {most}, the "
                                f"most its CUDA template supports; this model runs on the reference backend (--backend cpu)")


def bind(manifest: Manifest, env: dict, table: dict[str, BufferInfo], step: str = "decode_step",
         tokens: int | None = None) -> list[BoundLaunch]:
    """The launches of one step, bound: the decode step, or (step="prefill_step") one prefill launch of
    `tokens` prompt rows, 1 <= tokens <= env["chunk"]."""
    _check_limits(manifest, env)
    if step == "prefill_step":
        if not 1 <= tokens <= env["chunk"]:
            raise BindError(f"a prefill launch takes 1 to {env['chunk']} tokens (the prefill chunk), not {tokens}")
        env = {**env, "tokens": tokens}
    kernels = {k.name: k for k in manifest.kernels}
    out = []
    steps = {"decode_step": manifest.decode_step, "prefill_step": manifest.prefill_step}
    for launch, i in _schedule(steps[step], env["n_layers"]):
        kern = kernels.get(launch.kernel)
        if kern is None:
            raise BindError(f"op {launch.op}: kernel {launch.kernel} is not among the manifest's kernels")
        declared = {p.name: p for p in kern.params}
        dtypes = {p.name: p.dtype for p in kern.params if p.dtype is not None}
        dtypes.update(kern.roles)
        if [a.param for a in launch.args] != list(declared):
            raise BindError(f"kernel {kern.name} (op {launch.op}): arguments {[a.param for a in launch.args]} "
                            f"do not match its parameters {list(declared)}")
        args, scalars = [], {}
        for a in launch.args:
            if a.kind == "workspace":
                args.append(Arg(a.param, a.kind))
                continue
            if a.value is not None:
                v = evaluate(a.value, env)
                v = float(v) if a.kind == "float" else int(v)
                scalars[a.param] = v
                args.append(Arg(a.param, a.kind, value=v))
                continue
            name = a.buffer.format(i=i) if i is not None else a.buffer
            where = f"kernel {kern.name} (op {launch.op}{'' if i is None else f', layer {i}'}), argument {a.param}"
            info = table.get(name)
            if info is None:
                raise BindError(f"{where}: buffer {name} was never packed or allocated")
            # a prefetch hint's parameter is untyped (the kernel never reads it): the buffer must still be
            # the weight the Plan sized its prefetch_kib argument from
            want_dtype = a.dtype if a.kind == "prefetch" else declared[a.param].dtype or INDEX
            if a.dtype != want_dtype:
                raise BindError(f"{where}: the launch declares dtype {a.dtype} but the kernel's parameter is {want_dtype}")
            shape = tuple(evaluate(s, env) for s in a.shape)
            offset = 0
            found_shape = info.shape
            if a.layer_slice:
                found_shape = info.shape[1:]
                offset = i * math.prod(found_shape)
            if info.dtype != want_dtype or found_shape != shape:
                raise BindError(f"{where}: expected {want_dtype}{list(shape)}, found buffer {name} "
                                f"{info.dtype}{list(found_shape)}")
            args.append(Arg(a.param, a.kind, buffer=name, offset=offset, shape=shape))
        ev = {**env, **scalars}
        name, grid, shaped = kern.name, launch.grid, launch.shaped_kernel
        for v in launch.variants or ():     # the first entry point whose bounds hold replaces the kernel
            if all(scalars[p] <= most for p, most in v.at_most.items()):
                name, grid, shaped = v.kernel, v.grid, v.shaped_kernel
                break
        out.append(BoundLaunch(launch.op, i, name, kern.template, dtypes, tuple(args),
                               _dim3(evaluate(grid, ev)), _dim3(evaluate(launch.block, ev)),
                               int(evaluate(launch.smem, ev)), launch.grid_stride,
                               int(evaluate(launch.workspace or "0", ev)), shaped, bool(launch.final)))
    return out


def prefill_chunks(n_tokens: int, chunk: int):
    """(start, stop, last) of each prefill launch of an n-token prompt: chunks of `chunk` rows, the last
    one shorter; `last` marks the one after which the step's final ops run."""
    for start in range(0, n_tokens, chunk):
        yield start, min(start + chunk, n_tokens), start + chunk >= n_tokens


def shape_defines(manifest: Manifest, env: dict) -> tuple[str, ...] | None:
    """The nvcc options that compile a target's shaped entry points for the model `env` describes:
    -DDTF_SHAPED and each fixed int argument's value as its macro (manifest.json's "macro"), evaluated
    from the same expressions, with the same config, as the arguments `bind` passes the generic entries.
    None when the manifest has no shaped entries (a CPU target). Each model shape gets its own cubin."""
    steps = manifest.decode_step + manifest.prefill_step
    if not manifest.decode_step or any(l.shaped_kernel is None for l in steps):
        return None
    values = {}
    for l in steps:
        for a in l.args:
            if a.macro is not None:
                v = values[a.macro] = int(evaluate(a.value, env))
                if not 0 <= v < 2 ** 31:
                    raise BindError(f"kernel {l.kernel} (op {l.op}): {a.param} = {a.value} = {v} does not fit "
                                    f"the kernel's int argument")
    return ("-DDTF_SHAPED",) + tuple(f"-D{m}={v}" for m, v in sorted(values.items()))
