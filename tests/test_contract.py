"""The schema between generator and runtime (codegen/contract.py): codegen writes it, the runtime reads it
only as typed records, and refuses anything else by name before binding or packing."""
from __future__ import annotations

import dataclasses
import json
import shutil
import types
import typing

import pytest
from conftest import as_json

from dtypeforge.codegen import contract
from dtypeforge.runtime.target import GENERATED, LoadError, load_target

TARGETS = sorted(p for p in GENERATED.iterdir() if p.is_dir())


def _typed(value, hint, path: str) -> None:
    """Assert ``value`` is what ``hint`` declares, all the way down: records, not the dicts they came from."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is not None:
            _typed(value, next(a for a in args if a is not type(None)), path)
    elif dataclasses.is_dataclass(hint):
        assert type(value) is hint, f"{path} is {type(value).__name__}, not {hint.__name__}"
        hints = typing.get_type_hints(hint, include_extras=True)
        for f in dataclasses.fields(hint):
            _typed(getattr(value, f.name), hints[f.name], f"{path}.{f.name}")
    elif origin is tuple:
        assert type(value) is tuple, f"{path} is {type(value).__name__}, not a tuple"
        for i, v in enumerate(value):
            _typed(v, args[0], f"{path}[{i}]")
    elif origin is dict:
        assert type(value) is dict, f"{path} is {type(value).__name__}, not a dict"
        for k, v in value.items():
            _typed(v, args[1], f"{path}.{k}")
    elif origin is typing.Annotated:                    # Expr
        assert type(value) in typing.get_args(args[0]), f"{path} is {value!r}"
    elif hint is not typing.Any:
        assert type(value) is hint, f"{path} is {value!r}, not {hint.__name__}"


def _set(obj):
    """A parsed JSON value without the keys that hold null: an optional field left out and one set to
    null read the same."""
    if isinstance(obj, dict):
        return {k: _set(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_set(v) for v in obj]
    return obj


def test_every_generated_target_loads_into_the_typed_records():
    assert len(TARGETS) == 162
    for t in TARGETS:
        target = load_target(t)
        for name, record, cls in (("manifest.json", target.manifest, contract.Manifest),
                                  ("packing.json", target.packing, contract.Packing)):
            assert record.schema == contract.SCHEMA
            _typed(record, cls, f"{t.name}/{name}")
            # every field of the file is in the record, with its value
            assert _set(as_json(record)) == _set(json.loads((t / name).read_text())), f"{t.name}/{name}"


def test_a_record_written_as_json_loads_back_identical():
    for t in TARGETS:
        target = load_target(t)
        assert contract.load_manifest(as_json(target.manifest), "m") == target.manifest, t.name
        assert contract.load_packing(as_json(target.packing), "p") == target.packing, t.name


def test_a_record_is_frozen():
    m = load_target(GENERATED / "llama.h100.f16.fused").manifest
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.decode_step[0].args[0].dtype = "f32"


def _manifest() -> dict:
    return json.loads((GENERATED / "llama.h100.int8-weights.fused" / "manifest.json").read_text())


def _packing() -> dict:
    return json.loads((GENERATED / "llama.h100.int8-weights.fused" / "packing.json").read_text())


def _attention(m: dict) -> dict:
    return next(l for l in m["decode_step"] if "variants" in l)


@pytest.mark.parametrize("load,obj,change,says", [
    # a wrong type
    ("manifest", _manifest, lambda m: m["decode_step"][0]["args"][0].update(shape="hidden"),
     "w.decode_step[0].args[0].shape is str; the schema wants a list"),
    ("manifest", _manifest, lambda m: _attention(m)["variants"][0]["at_most"].update(max_seq="512"),
     "w.decode_step[2].variants[0].at_most.max_seq is '512'; the schema wants int"),
    ("manifest", _manifest, lambda m: m["prefill_step"][0].update(grid=True), "w.prefill_step[0].grid is True; the schema wants expr"),
    ("manifest", _manifest, lambda m: m["roles"]["q_proj"].update(scale=4), "w.roles.q_proj.scale is 4; the schema wants str"),
    ("manifest", _manifest, lambda m: m.update(rope=["rope_theta"]), "w.rope is list; the schema wants a mapping"),
    ("packing", _packing, lambda p: p["weights"][8].update(tied_to="embed"), "w.weights[8].tied_to is str; the schema wants a mapping"),
    ("packing", _packing, lambda p: p["weights"][2]["scale"].update(shape=[None]), "w.weights[2].scale.shape[0] is None; the schema wants expr"),
    # a required field missing, or null
    ("manifest", _manifest, lambda m: m["kernels"][3]["params"][0].pop("kind"), "w.kernels[3].params[0] lacks kind"),
    ("manifest", _manifest, lambda m: m["config"]["hidden"].pop("default"), "w.config.hidden lacks default"),
    ("manifest", _manifest, lambda m: m["decode_step"][1].update(args=None), "w.decode_step[1].args is NoneType; the schema wants a list"),
    ("packing", _packing, lambda p: p["weights"][0]["transforms"][0].pop("op"), "w.weights[0].transforms[0] lacks op"),
    # an unknown field
    ("manifest", _manifest, lambda m: m["gate"]["hidden_act"].update(default="silu"),
     "w.gate.hidden_act.default is not in the schema (fields: values, or_at_least)"),
    ("manifest", _manifest, lambda m: m.update(decode_steps=[]), "w.decode_steps is not in the schema"),
    ("packing", _packing, lambda p: p["weights"][2]["transforms"][1].update(rounding="nearest"),
     "w.weights[2].transforms[1].rounding is not in the schema (fields: op, parts, scheme, dtype, scale_dtype)"),
])
def test_off_schema_fields_are_refused_by_path(load, obj, change, says):
    data = obj()
    change(data)
    with pytest.raises(contract.ContractError) as e:
        {"manifest": contract.load_manifest, "packing": contract.load_packing}[load](data, "w")
    assert says in str(e.value)


def test_an_optional_field_may_be_absent_or_null():
    m = _manifest()
    attention = _attention(m)
    assert contract.load_manifest(m, "w").decode_step[2].variants[0].at_most == {"max_seq": 512}
    for absent in (lambda l: l.pop("variants"), lambda l: l.update(variants=None)):
        absent(attention)
        assert contract.load_manifest(m, "w").decode_step[2].variants is None


def _edit(tmp_path, name, change):
    t = shutil.copytree(GENERATED / "llama.h100.f16.fused", tmp_path / "t")
    data = json.loads((t / name).read_text())
    change(data)
    (t / name).write_text(json.dumps(data))
    return t


@pytest.mark.parametrize("name,change,says", [
    ("manifest.json", lambda m: m.update(schema=1), "has schema 1, this dtypeforge reads schema 3"),
    ("manifest.json", lambda m: m.pop("schema"), "has schema None"),
    ("manifest.json", lambda m: m["kernels"][0]["params"][0].update(dtype=16), "kernels[0].params[0].dtype is 16; the schema wants str"),
    ("manifest.json", lambda m: m["decode_step"][1].update(grid_stride="yes"), "decode_step[1].grid_stride is 'yes'; the schema wants bool"),
    ("manifest.json", lambda m: m["decode_step"][0]["args"][0].update(offset=3), "decode_step[0].args[0].offset is not in the schema"),
    ("manifest.json", lambda m: m["buffers"][0].pop("shape"), "buffers[0] lacks shape"),
    ("manifest.json", lambda m: m.update(config=[1]), "config is list; the schema wants a mapping"),
    ("packing.json", lambda p: p["weights"][0]["sources"][0].update(shape="hidden"), "weights[0].sources[0].shape is str; the schema wants a list"),
    ("packing.json", lambda p: p.pop("ignored_tensors"), "lacks ignored_tensors"),
])
def test_a_target_off_the_schema_is_refused_by_field(tmp_path, name, change, says):
    with pytest.raises(LoadError, match=r"\b" + name.replace(".", r"\.") + r"\b.*") as e:
        load_target(_edit(tmp_path, name, change))
    assert says in str(e.value)
