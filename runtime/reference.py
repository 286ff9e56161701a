"""The numpy reference backend: runs a target's decode step on the CPU with its rounding points.

It interprets the same ``manifest.json`` launch sequence the GPU runs, kernel by kernel, and
each kernel family below mirrors its template in templates/: values are rounded to the
compute dtype where the template rounds (dot products take operands in the compute dtype,
form exact products and sum them in the accumulate dtype, as fmaf and tensor cores do), and to a buffer's dtype when stored. Every buffer holds float32 values that are
exactly representable in its declared dtype. Sums are taken in float32 (or exactly, then
rounded once, for narrower accumulators), so results match the GPU up to summation order,
which the GPU tests' per-policy tolerances cover.

This makes it the numerical ground truth for every policy, and the backend that lets
``codegen generate`` run on a machine without a GPU.
"""
from __future__ import annotations

import numpy as np

from dtypeforge.codegen.contract import Manifest
from dtypeforge.codegen.dtypes import from_storage, round_to
from .binding import bind, buffer_table, prefill_chunks

F32 = np.float32


def _r(a, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` (kept as float32)."""
    return a if dtype == "f32" else round_to(np.asarray(a, dtype=F32), dtype)


def _dot(a: np.ndarray, b: np.ndarray, acc: str) -> np.ndarray:
    """a @ b with operands already in the compute dtype: exact products, summed in ``acc``.

    Products of f32 operands (so of f16/bf16 ones too) are exact in float64, and their float64 sum
    is, to far below an f32 ulp, the exact sum: rounded once to ``acc`` it is the same on every
    machine, whatever order the BLAS sums in. A float32 matmul's result depends on the BLAS kernel
    numpy picks for the CPU, and that flipped a near-tie greedy token of the bf16 policy between two
    machines. The kernels' f32 sums differ from this by their summation order, within the op checks'
    bounds."""
    s = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
    return _r(s.astype(F32), acc)


def _f32_of(fn, x) -> np.ndarray:
    """numpy's ``fn`` evaluated in float64, rounded to float32: the same bits on every CPU (numpy's
    float32 exp/sin/cos/power run SIMD code chosen by the CPU, whose last bits differ)."""
    return fn(np.asarray(x, dtype=np.float64)).astype(F32)


# ---- one function per kernel family; `d` maps pointer params / role fields to dtype names ----

def embedding_gather(a, d):
    a["out"][:] = _r(a["table"][int(a["token"][0])], d["out"])


def rmsnorm(a, d):
    c, acc = d["compute"], d["accumulate"]
    v = _r(a["x"], c)
    ss = _dot(v, v, acc)
    inv = _r(F32(1.0) / np.sqrt(F32(ss) / F32(a["n"]) + F32(a["eps"]), dtype=F32), c)
    a["y"][:] = _r(_r(_r(v * inv, c) * _r(a["gamma"], c), c), d["y"])


def gemv(a, d):
    # a["w"] arrives already rounded to the compute dtype (ReferenceBackend does it once at load)
    acc = _dot(a["w"], _r(a["x"], d["compute"]), d["accumulate"])
    if "scale" in a:
        acc = _r(acc, d["accumulate"]) * a["scale"]
    a["y"][:] = _r(acc, d["y"])


def rope(a, d):
    c, hd = d["compute"], a["head_dim"]
    half = hd // 2
    ang = F32(a["pos"][0]) * np.asarray(a["inv_freq"], dtype=F32)   # the model's scaled table (runtime/rope.py)
    cc, sc = _r(_f32_of(np.cos, ang), c), _r(_f32_of(np.sin, ang), c)
    for name, heads in (("q", a["n_heads"]), ("k", a["n_kv_heads"])):
        v = a[name].reshape(heads, hd)
        x1, x2 = _r(v[:, :half], c), _r(v[:, half:], c)
        o1 = _r(_r(x1 * cc, c) + _r(_r(-x2, c) * sc, c), c)
        o2 = _r(_r(x2 * cc, c) + _r(x1 * sc, c), c)
        v[:, :half], v[:, half:] = _r(o1, d[name]), _r(o2, d[name])


def kv_append(a, d):
    p = int(a["pos"][0])
    a["k_cache"][p] = _r(a["k"], d["k_cache"])
    a["v_cache"][p] = _r(a["v"], d["v_cache"])


def attention(a, d):
    c, acc = d["compute"], d["accumulate"]
    nh, nkv, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    seq = int(a["pos"][0]) + 1
    q = _r(a["q"].reshape(nh, hd), c)
    # K and V widened to float64 (exactly) once, not per head in _dot: a group of heads shares them
    k = _r(a["k_cache"][:seq].reshape(seq, nkv, hd), c).astype(np.float64)
    v = _r(a["v_cache"][:seq].reshape(seq, nkv, hd), c).astype(np.float64)
    group = nh // nkv
    out = a["out"].reshape(nh, hd)
    scale = F32(1.0) / np.sqrt(F32(hd), dtype=F32)
    for h in range(nh):
        kh, vh = k[:, h // group], v[:, h // group]
        s = _dot(kh, q[h], acc) * scale
        p = _f32_of(np.exp, s - s.max())
        o = _dot(_r(p, c), vh, acc)
        out[h] = _r(o / F32(p.sum(dtype=np.float64)), d["out"])


def silu_mul(a, d):
    c = d["compute"]
    g = _r(a["gate"], c)
    s = _r(g / (F32(1.0) + _f32_of(np.exp, -g)), c)
    a["y"][:] = _r(_r(s * _r(a["up"], c), c), d["y"])


def residual_add(a, d):
    c = d["compute"]
    a["x"][:] = _r(_r(_r(a["x"], c) + _r(a["d"], c), c), d["x"])


def argmax(a, d):
    a["token"][0] = int(np.argmax(a["logits"]))


def advance_pos(a, d):
    a["pos"][0] += 1


# ---- fused kernels: the composition of the ops above, with the same rounding points ----------

def _sub(d: dict, slot: str) -> dict:
    """The role dtypes of one stage of a fused kernel, keyed as the unfused op expects."""
    return {f.split(".", 1)[1]: v for f, v in d.items() if f.startswith(slot + ".")}


def _norm_then_gemv(a, d, rows_w):
    """rmsnorm into a temporary rounded to norm.output, then the GEMV into one rounded to output."""
    xn = np.empty(a["cols"], F32)
    rmsnorm({"x": a["x"], "gamma": a["gamma"], "y": xn, "n": a["cols"], "eps": a["eps"]}, {**_sub(d, "norm"), "y": d["norm.output"]})
    y = np.empty(rows_w, F32)
    g = {"w": a["w"], "x": xn, "y": y, **({"scale": a["scale"]} if "scale" in a else {})}
    gemv(g, {"compute": d["compute"], "accumulate": d["accumulate"], "y": d.get("output", d.get("y"))})
    return y


def norm_gemv(a, d):
    a["y"][:] = _norm_then_gemv(a, d, a["rows"])


def norm_gemv_argmax(a, d):
    norm_gemv(a, d)
    argmax({"logits": a["y"], "token": a["token"]}, d)
    advance_pos(a, d)


def norm_qkv_rope_kv(a, d):
    nq, nkv = a["n_heads"] * a["head_dim"], a["n_kv_heads"] * a["head_dim"]
    y = _norm_then_gemv(a, d, nq + 2 * nkv)
    q, k, v = y[:nq], y[nq:nq + nkv], y[nq + nkv:]
    rope({"q": q, "k": k, "pos": a["pos"], "n_heads": a["n_heads"], "n_kv_heads": a["n_kv_heads"],
          "head_dim": a["head_dim"], "inv_freq": a["inv_freq"]}, {**_sub(d, "rope"), "q": d["output"], "k": d["output"]})
    a["q"][:] = _r(q, d["q"])
    kv_append({"k": k, "v": v, "k_cache": a["k_cache"], "v_cache": a["v_cache"], "pos": a["pos"]},
              {"k_cache": d["k_cache"], "v_cache": d["v_cache"]})


def gemv_residual(a, d):
    o = np.empty(a["rows"], F32)
    gemv({"w": a["w"], "x": a["a"], "y": o, **({"scale": a["scale"]} if "scale" in a else {})},
         {"compute": d["compute"], "accumulate": d["accumulate"], "y": d["output"]})
    residual_add({"x": a["x"], "d": o}, {**_sub(d, "act"), "x": d["x"]})


def norm_gemv_swiglu(a, d):
    y = _norm_then_gemv(a, d, 2 * a["rows"])
    silu_mul({"gate": y[:a["rows"]], "up": y[a["rows"]:], "y": a["y"]}, {**_sub(d, "act"), "y": d["y"]})


# ---- batched prefill: the ops above over the block's first m rows, row for row the same rounding ------

def embedding_gather_rows(a, d):
    m = a["m"]
    a["out"][:m] = _r(a["table"][a["ids"][:m]], d["out"])


def rmsnorm_rows(a, d):
    for t in range(a["m"]):
        rmsnorm({"x": a["x"][t], "gamma": a["gamma"], "y": a["y"][t], "n": a["n"], "eps": a["eps"]}, d)


def _gemm(a, d, rows_w=None) -> np.ndarray:
    """The GEMV of every row: x rows in the compute dtype, exact products summed in the accumulate dtype,
    the per-channel scale after the sum; rounded to the GEMM's output dtype by the caller."""
    m = a["m"]
    acc = _dot(_r(a["x"][:m], d["compute"]), a["w"].T, d["accumulate"])
    if "scale" in a:
        acc = _r(acc, d["accumulate"]) * a["scale"]
    return acc


def gemm(a, d):
    a["y"][:a["m"]] = _r(_gemm(a, d), d["y"])


def gemm_residual(a, d):
    m = a["m"]
    o = _r(_gemm({**a, "x": a["a"]}, d), d["output"])
    residual_add({"x": a["x"][:m], "d": o}, {**_sub(d, "act"), "x": d["x"]})


def gemm_swiglu(a, d):
    y, rows = _r(_gemm(a, d), d["output"]), a["rows"]
    silu_mul({"gate": y[:, :rows], "up": y[:, rows:], "y": a["y"][:a["m"]]}, {**_sub(d, "act"), "y": d["y"]})


def rope_rows(a, d):
    for t in range(a["m"]):
        rope({**a, "q": a["q"][t], "k": a["k"][t], "pos": [a["pos"][0] + t]}, d)


def kv_append_rows(a, d):
    p, m = int(a["pos"][0]), a["m"]
    a["k_cache"][p:p + m] = _r(a["k"][:m], d["k_cache"])
    a["v_cache"][p:p + m] = _r(a["v"][:m], d["v_cache"])


def gemm_rope_kv(a, d):
    m, hd = a["m"], a["head_dim"]
    nq, nkv = a["n_heads"] * hd, a["n_kv_heads"] * hd
    y = _r(_gemm(a, d), d["output"])
    rope_rows({"q": y[:, :nq], "k": y[:, nq:nq + nkv], "pos": a["pos"], "m": m, "n_heads": a["n_heads"],
               "n_kv_heads": a["n_kv_heads"], "head_dim": hd, "inv_freq": a["inv_freq"]},
              {**_sub(d, "rope"), "q": d["output"], "k": d["output"]})
    a["q"][:m] = _r(y[:, :nq], d["q"])
    kv_append_rows({"k": y[:, nq:nq + nkv], "v": y[:, nq + nkv:], "k_cache": a["k_cache"], "v_cache": a["v_cache"],
                    "pos": a["pos"], "m": m}, {"k_cache": d["k_cache"], "v_cache": d["v_cache"]})


def prefill_attention(a, d):
    """Row t is the decode step's attention at position pos + t: over cache rows 0 .. pos + t (a head's
    rows at once, the later keys of earlier rows masked to probability 0, which adds exactly nothing)."""
    c, acc = d["compute"], d["accumulate"]
    nh, nkv, hd, m, p0 = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["m"], int(a["pos"][0])
    seq = p0 + m
    q = _r(a["q"][:m].reshape(m, nh, hd), c)
    k = _r(a["k_cache"][:seq].reshape(seq, nkv, hd), c).astype(np.float64)
    v = _r(a["v_cache"][:seq].reshape(seq, nkv, hd), c).astype(np.float64)
    group = nh // nkv
    out = a["out"][:m].reshape(m, nh, hd)
    scale = F32(1.0) / np.sqrt(F32(hd), dtype=F32)
    later = np.arange(seq)[None, :] > (p0 + np.arange(m))[:, None]
    for h in range(nh):
        s = _dot(q[:, h], k[:, h // group].T, acc) * scale
        s[later] = -np.inf
        p = _f32_of(np.exp, s - s.max(axis=1, keepdims=True))
        o = _dot(_r(p, c), v[:, h // group], acc)
        out[:, h] = _r(o / p.sum(axis=1, dtype=np.float64).astype(F32)[:, None], d["out"])


def last_row(a, d):
    a["x"][:] = _r(a["xs"][a["m"] - 1], d["x"])


OPS = {f.__name__: f for f in (embedding_gather, rmsnorm, gemv, rope, kv_append, attention, silu_mul,
                               residual_add, argmax, advance_pos,
                               norm_gemv, norm_gemv_argmax, norm_qkv_rope_kv, gemv_residual, norm_gemv_swiglu,
                               embedding_gather_rows, rmsnorm_rows, gemm, gemm_residual, gemm_swiglu, rope_rows,
                               kv_append_rows, gemm_rope_kv, prefill_attention, last_row)}


class ReferenceBackend:
    """Holds a target's buffers as numpy arrays and replays its bound decode step."""

    name = "cpu"

    def __init__(self, manifest: Manifest, packed):
        self.manifest, self.env = manifest, packed.env
        table = self.table = buffer_table(manifest, self.env, packed.arrays)
        self.launches = bind(manifest, self.env, table)
        self._rounded: dict[tuple[str, str], np.ndarray] = {}
        self.arrays: dict[str, np.ndarray] = {
            n: from_storage(a, table[n].dtype) for n, a in packed.arrays.items()}
        for info in table.values():
            if not info.weight:
                self.arrays[info.name] = np.zeros(info.shape, dtype=np.int32 if info.dtype == "index" else F32)
        self.program = [(OPS[l.template], self._args(l), l.dtypes) for l in self.launches]
        self._prefill: dict[int, list] = {}     # tokens -> its bound prefill program

    def _args(self, launch) -> dict:
        args = {a.param: self._arg(a) for a in launch.args}
        if "w" in args:                               # weights rounded to the compute dtype once
            w = next(a.buffer for a in launch.args if a.param == "w")
            key = (w, launch.dtypes["compute"])
            if key not in self._rounded:             # held as float64, exactly, for _dot
                self._rounded[key] = _r(args["w"], launch.dtypes["compute"]).astype(np.float64)
            args["w"] = self._rounded[key]
        return args

    def _arg(self, a):
        if a.buffer is None:
            return a.value
        arr = self.arrays[a.buffer]
        if arr.shape == a.shape:
            return arr
        n = int(np.prod(a.shape))                     # a layer's slice of a cache
        return arr.reshape(-1)[a.offset:a.offset + n].reshape(a.shape)

    def reset(self) -> None:
        for b in self.manifest.buffers:
            self.arrays[b.name][...] = 0

    def prefill_program(self, tokens: int) -> list[tuple]:
        """(op, args, dtypes, final) of one prefill launch of `tokens` rows, bound once per size."""
        if tokens not in self._prefill:
            self._prefill[tokens] = [(OPS[l.template], self._args(l), l.dtypes, l.final)
                                     for l in bind(self.manifest, self.env, self.table, "prefill_step", tokens)]
        return self._prefill[tokens]

    def prefill(self, tokens, pos: int = 0) -> np.ndarray:
        """Run the prompt `tokens` at positions pos.. through the prefill step, a chunk at a time; returns
        the last token's logits as float32 (the decode step then continues at pos + len(tokens))."""
        for start, stop, last in prefill_chunks(len(tokens), self.env["chunk"]):
            part = tokens[start:stop]
            self.arrays["prompt"][:len(part)] = part
            self.arrays["pos"][0] = pos + start
            for fn, args, dtypes, final in self.prefill_program(len(part)):
                if last or not final:
                    fn(args, dtypes)
        return self.arrays["logits"].astype(F32, copy=True)

    def step(self, token: int, pos: int) -> np.ndarray:
        """Run one decode step for ``token`` at ``pos``; returns the logits as float32."""
        self.arrays["token"][0], self.arrays["pos"][0] = token, pos
        for fn, args, dtypes in self.program:
            fn(args, dtypes)
        return self.arrays["logits"].astype(F32, copy=True)
