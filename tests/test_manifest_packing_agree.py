"""For every generated target, the buffers the loader packs are exactly what the kernels take.

manifest.json and packing.json are both rendered from one Plan, so they should agree by
construction; this checks it from the outside, first on the JSON (names, dtype and shape
strings, kernel signatures), then concretely: a tiny synthetic model is packed for the
target and every weight argument of every launch, per-layer names expanded, must find an
array of exactly the kernel's dtype and the shape its expressions evaluate to.

Packing depends only on packing.json's weight table, which many devices share, so each
distinct table is packed once and every target using it is checked against that result.
"""
from __future__ import annotations

import hashlib
import json
import math

import pytest
from conftest import as_json

from dtypeforge.codegen.dtypes import DTYPES
from dtypeforge.codegen.expr import evaluate
from dtypeforge.codegen.plan import all_targets
from dtypeforge.codegen.specs import load_specs
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import GENERATED, load_target

TARGETS = sorted(p.parent.name for p in GENERATED.glob("*/manifest.json"))


def weight_args(manifest):
    """(launch, arg) for every weight-bound kernel argument of the decode step."""
    return [(launch, arg) for launch in manifest.decode_step for arg in launch.args if arg.weight]


def packed_buffers(packing) -> dict[str, dict]:
    """Packed buffer name -> {dtype, shape, per_layer}: each entry, and its scale buffer."""
    out = {}
    for e in packing.weights:
        out[e.name] = {"dtype": e.dtype, "shape": e.shape, "per_layer": e.per_layer}
        if e.scale:
            out[e.scale.name] = {"dtype": e.scale.dtype, "shape": e.scale.shape, "per_layer": e.per_layer}
    return out


def test_generated_holds_every_target_of_the_specs():
    """So the parametrized tests below cover every target, not just whatever is on disk."""
    assert TARGETS == sorted(t.name for t in all_targets(load_specs()))


@pytest.mark.parametrize("name", TARGETS)
def test_weight_arguments_name_packed_buffers_of_the_same_dtype_and_shape(name):
    t = load_target(GENERATED / name)
    bufs = packed_buffers(t.packing)
    kernels = {k.name: {p.name: p for p in k.params} for k in t.manifest.kernels}
    used = set()
    for launch, arg in weight_args(t.manifest):
        where = f"{name} op {launch.op} param {arg.param}"
        assert arg.buffer in bufs, f"{where} binds {arg.buffer}, which packing.json does not pack"
        b = bufs[arg.buffer]
        assert (arg.dtype, arg.shape) == (b["dtype"], b["shape"]), where
        if arg.kind == "prefetch":            # an untyped L2 hint: sized by the Plan from this buffer
            assert kernels[launch.kernel][arg.param].dtype is None, where
            env = {sym: 1000 + 37 * n for n, sym in enumerate(t.manifest.config)}   # any model size
            kib = next(a for a in launch.args if a.param == f"{arg.param}_kib").value
            nbytes = math.prod(evaluate(s, env) for s in b["shape"]) * DTYPES[b["dtype"]].itemsize
            assert evaluate(kib, env) == nbytes // 1024, where
        else:
            assert kernels[launch.kernel][arg.param].dtype == arg.dtype, f"{where}: kernel signature differs"
        assert b["per_layer"] == ("{i}" in arg.buffer) and (launch.per_layer or not b["per_layer"]), where
        used.add(arg.buffer)
    assert used == set(bufs), f"{name}: packed but never launched: {sorted(set(bufs) - used)}"
    unbound = [(l.op, a.buffer) for l in t.manifest.decode_step for a in l.args if not a.weight and a.buffer in bufs]
    assert not unbound, f"{name}: packed buffers bound as non-weight arguments: {unbound}"
    listed = {w.name: (w.dtype, w.shape, w.per_layer, w.scale, w.scale_dtype) for w in t.manifest.weights}
    assert listed == {e.name: (e.dtype, e.shape, e.per_layer, e.scale and e.scale.name, e.scale and e.scale.dtype)
                      for e in t.packing.weights}, f"{name}: manifest weights and packing.json differ"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", tied=True)


@pytest.fixture(scope="session")
def packed_by_table(tiny):
    """Packs each distinct (config symbols, packing.json weight table) once, on demand."""
    cache = {}

    def get(target):
        content = [as_json(target.manifest)["config"], as_json(target.packing)["weights"]]
        key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        if key not in cache:
            cache[key] = pack_weights(target, tiny, progress=False)
        return cache[key]
    return get


@pytest.mark.parametrize("name", TARGETS)
def test_every_weight_argument_gets_an_array_of_its_dtype_and_shape(name, packed_by_table):
    t = load_target(GENERATED / name)
    packed = packed_by_table(t)
    env = packed.env
    bound = set()
    for launch, arg in weight_args(t.manifest):
        for i in range(env["n_layers"]) if launch.per_layer else [None]:
            buf = arg.buffer.replace("{i}", str(i))
            assert buf in packed.arrays, f"{name} op {launch.op}: no packed array {buf}"
            arr = packed.arrays[buf]
            shape = tuple(evaluate(e, env) for e in arg.shape)
            assert (arr.dtype, arr.shape) == (DTYPES[arg.dtype].np_dtype, shape), \
                f"{name} op {launch.op} param {arg.param} layer {i}: {buf} is {arr.dtype}{arr.shape}"
            bound.add(buf)
    assert bound == set(packed.arrays), f"{name}: packed but never bound: {sorted(set(packed.arrays) - bound)}"
