"""Run-time agreement of emitter and loader: before any launch, every kernel argument's declared
dtype and shape is checked against the buffer bound to it. Tampering with a manifest (as a
stale or hand-edited file would) must be caught with kernel, argument, expected and found."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import as_json

from dtypeforge.codegen.contract import load_manifest
from dtypeforge.runtime.binding import BindError, bind, buffer_table
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import find_target, load_target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny"), shape="tiny")


@pytest.fixture(scope="module")
def packed(tiny):
    t = load_target(find_target("h100", "f16", "separate"))
    return t, pack_weights(t, tiny, progress=False)


def _gemv(manifest: dict, op):
    return next(l for l in manifest["decode_step"] if l["op"] == op)


def _load(manifest: dict):
    return load_manifest(manifest, "edited manifest.json")


def test_untampered_manifest_binds(packed):
    t, p = packed
    launches = bind(t.manifest, p.env, buffer_table(t.manifest, p.env, p.arrays))
    n_layers = p.env["n_layers"]
    per_layer = sum(l.per_layer for l in t.manifest.decode_step)
    assert len(launches) == n_layers * per_layer + len(t.manifest.decode_step) - per_layer
    # layer-major order: all of layer 0's ops before layer 1's
    layers = [l.layer for l in launches if l.layer is not None]
    assert layers == sorted(layers)


def test_weight_dtype_tampered_in_manifest(packed):
    t, p = packed
    m = as_json(t.manifest)
    launch = _gemv(m, "q_proj")
    kern = next(k for k in m["kernels"] if k["name"] == launch["kernel"])
    # a manifest claiming the q weights are f32 (kernel signature and launch agree, the loader does not)
    kern["params"][0]["dtype"] = "f32"
    for k in m["kernels"]:
        if k["name"] == launch["kernel"]:
            k["params"][0]["dtype"] = "f32"
    for l in m["decode_step"]:
        if l["kernel"] == launch["kernel"]:
            l["args"][0]["dtype"] = "f32"
    m = _load(m)
    with pytest.raises(BindError) as e:
        bind(m, p.env, buffer_table(m, p.env, p.arrays))
    msg = str(e.value)
    assert launch["kernel"] in msg and "argument w" in msg and "expected f32" in msg and "found buffer layers.0.wq f16" in msg


def test_shape_tampered_in_manifest(packed):
    t, p = packed
    m = as_json(t.manifest)
    next(a for a in _gemv(m, "o_proj")["args"] if a["param"] == "w")["shape"] = ["n_heads * head_dim", "hidden"]
    m = _load(m)
    arrays = dict(p.arrays)
    # n_heads * head_dim == hidden in every shipped shape, so a packed array of another shape stands in
    # for a loader that packed something other than what the manifest declares
    arrays["layers.0.wo"] = np.zeros((p.env["hidden"] + 1, p.env["n_heads"] * p.env["head_dim"]), np.float16)
    with pytest.raises(BindError, match=r"op o_proj, layer 0\), argument w: expected f16\[64, 64\], found buffer layers.0.wo f16\[65, 64\]"):
        bind(m, p.env, buffer_table(m, p.env, arrays))


def test_launch_and_kernel_signature_disagree(packed):
    t, p = packed
    m = as_json(t.manifest)
    next(a for a in _gemv(m, "down_proj")["args"] if a["param"] == "x")["dtype"] = "bf16"
    m = _load(m)
    with pytest.raises(BindError, match="argument x: the launch declares dtype bf16 but the kernel's parameter is f16"):
        bind(m, p.env, buffer_table(m, p.env, p.arrays))


def test_missing_packed_weight(packed):
    t, p = packed
    arrays = {k: v for k, v in p.arrays.items() if k != "layers.1.wdown"}
    with pytest.raises(BindError, match="layer 1\\), argument w: buffer layers.1.wdown was never packed"):
        bind(t.manifest, p.env, buffer_table(t.manifest, p.env, arrays))


def test_reference_backend_refuses_tampered_manifest(packed):
    t, p = packed
    m = as_json(t.manifest)
    next(a for a in _gemv(m, "lm_head")["args"] if a["param"] == "w")["dtype"] = "f32"
    with pytest.raises(BindError):
        ReferenceBackend(_load(m), p)


def test_model_beyond_a_kernels_limit_is_refused_before_binding(packed):
    """Attention's CUDA template sizes its per-block arrays for head_dim <= 256; a larger head_dim
    would overrun them silently, so binding refuses it by name (the reference backend has no limit,
    and the reference targets' manifests carry none)."""
    t, p = packed
    limits = [l.limits for l in t.manifest.decode_step if l.limits is not None]
    assert limits == [{"head_dim": 256}]
    table = buffer_table(t.manifest, p.env, p.arrays)
    with pytest.raises(BindError, match=r"kernel attention_\w+ \(op attention\): head_dim = 512 exceeds 256, the most its "
                                         r"CUDA template supports; .*--backend cpu"):
        bind(t.manifest, {**p.env, "head_dim": 512}, table)
    ref = load_target(find_target("reference", "f16", "separate"))
    assert all(l.limits is None for l in ref.manifest.decode_step)



def test_attention_launches_its_one_split_entry_point_exactly_when_the_context_fits_one_split(tiny):
    """The manifest offers attention's `_one_split` entry point for max_seq <= 512; binding launches it
    (one block per head) up to that bound and the split kernel (a block per head and split) past it."""
    t = load_target(find_target("h100", "f16", "fused"))
    for max_seq, suffix, blocks_per_head in ((512, "_one_split", 1), (513, "", 2), (64, "_one_split", 1)):
        p = pack_weights(t, tiny, max_seq=max_seq, progress=False)
        env = {**p.env, "max_seq": max_seq}
        att = [l for l in bind(t.manifest, env, buffer_table(t.manifest, env, p.arrays)) if l.template == "attention"]
        assert att and all(l.kernel == f"attention_qf16_kcf16_vcf16_yf16_cf32_af32{suffix}" for l in att), max_seq
        assert all(l.grid[0] == env["n_heads"] * blocks_per_head for l in att), max_seq
    ref = load_target(find_target("reference", "f16", "fused"))
    assert all(l.variants is None for l in ref.manifest.decode_step)


def test_shaped_entries_compile_the_models_shapes_but_not_the_context(tiny):
    """With the model's shapes compiled in, each launch runs its own entry point (`<kernel>__<op>`, a
    variant's too), and every int argument but max_seq becomes a -D constant with exactly the value the
    generic entry would be passed. max_seq varies per run (the cache is capped to the prompt plus new
    tokens), so two runs of one model with different contexts share one cubin."""
    from dtypeforge.runtime.binding import shape_defines
    t = load_target(find_target("h100", "f16", "fused"))
    by_context = {}
    for max_seq in (64, 700):
        p = pack_weights(t, tiny, max_seq=max_seq, progress=False)
        launches = bind(t.manifest, p.env, buffer_table(t.manifest, p.env, p.arrays))
        defines = shape_defines(t.manifest, p.env)
        by_context[max_seq] = defines
        assert defines[0] == "-DDTF_SHAPED"
        consts = dict(d[2:].split("=") for d in defines[1:])
        for l in launches:
            assert l.shaped_kernel == f"{l.kernel}__{l.op}", l.op
            for a in l.args:
                if a.kind != "int":
                    continue
                macro = f"DTF_SHAPE_{l.op}_{a.param}"
                if a.param == "max_seq":
                    assert macro not in consts
                else:
                    assert int(consts[macro]) == a.value, macro
        assert consts["DTF_SHAPE_down_proj_residual_cols"] == str(p.env["intermediate"])
    assert by_context[64] == by_context[700]
    ref = load_target(find_target("reference", "f16", "fused"))
    assert shape_defines(ref.manifest, p.env) is None
    assert all(l.shaped_kernel is None and all(a.macro is None for a in l.args) for l in ref.manifest.decode_step)


def test_a_shape_too_large_for_an_int_argument_is_refused(packed):
    from dtypeforge.runtime.binding import shape_defines
    t, p = packed
    with pytest.raises(BindError, match=r"op lm_head\): rows = vocab = 4294967296 does not fit"):
        shape_defines(t.manifest, {**p.env, "vocab": 2 ** 32})
