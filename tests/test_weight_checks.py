"""The loader refuses checkpoint values it cannot pack faithfully: NaN / inf anywhere, and finite
values that the target's storage dtype would turn into inf (by the same rounding as the
conversion: just past the max rounds back to it). Quantized storage is exempt: its per-row
scale takes the range. Messages name the tensor, the file and the first bad index.
"""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dtypeforge.codegen.dtypes import max_finite, overflow_threshold, round_to, storage_holds, to_storage
from dtypeforge.codegen.plan import all_targets
from dtypeforge.codegen.specs import load_specs
from dtypeforge.runtime.loader import NonFiniteWeightError, WeightOverflowError, pack_weights
from dtypeforge.session import policies_holding
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import LoadError, find_target, load_target

UP = "model.layers.0.mlp.up_proj.weight"          # [intermediate 128, hidden 64] in the tiny shape
F16_MAX_BELOW_LIMIT = float(np.nextafter(np.float32(65520), np.float32(0)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("weights") / "tiny", "tiny")


@pytest.fixture
def model(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "model")


@pytest.fixture(scope="module")
def holds():
    return policies_holding(load_specs(), "reference", "llama")


def target(policy: str, layout: str = "fused"):
    return load_target(find_target("reference", policy, layout))


def plant(model_dir, name: str, index: tuple[int, ...], value: float) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def poke(model_dir, name: str, flat: int, bits: int) -> None:
    """Overwrite one element's raw bytes in place (for BF16 files, which numpy cannot hand to save_file)."""
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))[name]
        size = {"F32": 4, "F16": 2, "BF16": 2}[h["dtype"]]
        f.seek(8 + n + h["data_offsets"][0] + flat * size)
        f.write(int(bits).to_bytes(size, "little"))


def refused(exc, model_dir, policy="f16", **kw) -> str:
    with pytest.raises(exc) as e:
        pack_weights(target(policy), model_dir, progress=False, **kw)
    message = str(e.value)
    assert isinstance(e.value, LoadError) and "\n" not in message
    return message


def test_nan_names_tensor_file_and_index(model):
    plant(model, UP, (3, 17), np.nan)
    assert refused(NonFiniteWeightError, model) == (
        f"tensor {UP} in model.safetensors has NaN at [3, 17] (flat index {3 * 64 + 17}); weights must be finite")


@pytest.mark.parametrize("value, spelled", [(np.inf, "+inf"), (-np.inf, "-inf")])
def test_inf_in_a_fused_source_names_that_source(model, value, spelled):
    """k_proj is the middle part of the fused wqkv: the index is k_proj's own, not the concatenation's."""
    name = "model.layers.1.self_attn.k_proj.weight"
    plant(model, name, (31, 0), value)
    assert refused(NonFiniteWeightError, model) == (
        f"tensor {name} in model.safetensors has {spelled} at [31, 0] (flat index {31 * 64}); weights must be finite")


@pytest.mark.parametrize("policy", ["f32", "int8-weights"])
def test_non_finite_is_refused_under_every_policy(model, policy):
    plant(model, "model.norm.weight", (7,), np.nan)
    assert "tensor model.norm.weight in model.safetensors has NaN at [7] (flat index 7)" in refused(
        NonFiniteWeightError, model, policy)


def test_overflow_names_value_dtype_and_index(model):
    plant(model, UP, (3, 17), 1e5)
    assert refused(WeightOverflowError, model) == (
        f"tensor {UP} in model.safetensors has max |value| 100000, which overflows f16 (max 65504), the storage of "
        f"packed weight layers.0.wgate_up (role gate_proj); the first value that does is 100000 at [3, 17] "
        f"(flat index 209); a policy that stores role gate_proj in a wider dtype holds it "
        f"(`codegen explain` shows each policy)")


def test_overflow_lists_the_policies_that_hold_it(model, holds):
    plant(model, UP, (3, 17), -1e5)
    message = refused(WeightOverflowError, model, holds=holds)
    listed = message.split("; policies that hold it: ")[1].split(", ")
    assert {"bf16", "f32"} <= set(listed) and not {"f16", "f16-resident"} & set(listed), message
    assert listed == holds("gate_proj", 1e5) and "max |value| 100000," in message and "is -100000 at [3, 17]" in message


@pytest.mark.parametrize("policy", ["f32", "bf16", "int8-weights", "fp8-e4m3-weights"])
def test_policies_with_range_load_it(model, policy):
    """f32 and bf16 hold 1e5; quantized storage scales each row to fit."""
    plant(model, UP, (3, 17), 1e5)
    packed = pack_weights(target(policy, "separate"), model, progress=False)
    assert "layers.0.wup" in packed.arrays
    if policy == "f32":
        assert packed.arrays["layers.0.wup"][3, 17] == np.float32(1e5)


def test_just_past_the_max_rounds_back_and_is_accepted(model):
    """f16 rounds |x| < 65520 to 65504 (to_storage's RNE), so only 65520 and up overflow."""
    plant(model, UP, (0, 0), F16_MAX_BELOW_LIMIT)
    plant(model, UP, (0, 1), -F16_MAX_BELOW_LIMIT)
    packed = pack_weights(target("f16", "separate"), model, progress=False)
    assert packed.arrays["layers.0.wup"][0, :2].tolist() == [65504.0, -65504.0]
    plant(model, UP, (0, 2), 65520.0)
    assert "first value that does is 65520 at [0, 2]" in refused(WeightOverflowError, model)


def test_bf16_source(tmp_path, holds):
    """BF16 checkpoint values are checked after their exact widening: bf16 NaN / inf bit patterns,
    and a bf16 value (99840) beyond f16's range."""
    d = write_synthetic_model(tmp_path / "bf16", "tiny", dtype="bf16")
    poke(d, UP, 5, 0x7FC1)
    assert refused(NonFiniteWeightError, d).startswith(f"tensor {UP} in model.safetensors has NaN at [0, 5] (flat index 5)")
    poke(d, UP, 5, 0xFF80)
    assert "has -inf at [0, 5]" in refused(NonFiniteWeightError, d)
    big = int(to_storage(np.float32([1e5]), "bf16").view(np.uint16)[0])
    poke(d, UP, 5, big)
    message = refused(WeightOverflowError, d, holds=holds)
    assert "has max |value| 99840, which overflows f16 (max 65504)" in message
    assert message.endswith("policies that hold it: " + ", ".join(holds("gate_proj", 99840.0)))
    assert pack_weights(target("bf16"), d, progress=False).arrays["layers.0.wgate_up"].dtype.name == "bfloat16"


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_overflow_threshold_is_the_conversions(name):
    limit = np.float32(overflow_threshold(name))
    below = np.nextafter(limit, np.float32(0))
    assert np.isinf(round_to(np.array([limit, -limit], np.float32), name)).all()
    assert (np.abs(round_to(np.array([below, -below], np.float32), name)) == np.float32(max_finite(name))).all()
    assert storage_holds(float(below), name) and not storage_holds(float(limit), name)


def test_overflow_threshold_where_nothing_overflows():
    assert overflow_threshold("f32") == np.inf
    assert overflow_threshold("fp8e4m3") == np.inf        # saturating, and only ever stored with a scale
    assert max_finite("fp8e4m3") == 448.0 and max_finite("int8") == 127.0
    # quantized: the per-row scale max/127 (or /448) must stay finite in the scale dtype
    assert storage_holds(65504.0 * 127, "int8", "f16") and not storage_holds(65520.0 * 127, "int8", "f16")
    assert storage_holds(3e38, "fp8e4m3", "f32")
    with pytest.raises(ValueError, match="scale"):
        storage_holds(1.0, "int8")


def test_policies_holding_follows_the_device(holds):
    specs = load_specs()
    assert holds("up_proj", 1.0) == sorted({t.policy for t in all_targets(specs) if t.device == "reference"})
    assert "f16" in holds("up_proj", 65504.0) and "f16" not in holds("up_proj", 65520.0)
    # a device that runs only some policies lists only those
    m40 = policies_holding(specs, "m40", "llama")("up_proj", 1e5)
    assert set(m40) <= set(holds("up_proj", 1e5)) and "f32" in m40
