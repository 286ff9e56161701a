"""The contract between the generator and the runtime: the schema of manifest.json and packing.json.

codegen writes a target's two files through ``check`` (so it cannot write off-schema) and the runtime
reads them through ``check`` (so a target from another version, or one edited by hand, is refused
by name before anything is bound or packed). Both stamp and compare ``SCHEMA``: a change to what a
file means bumps it, and a runtime refuses a target of another schema rather than misreading it.

The schema is data: each field's type, with ``?`` marking an optional field; ``[x]`` is a list of
x, ``{x}`` a mapping from names to x, ``any`` any JSON value.
"""
from __future__ import annotations

SCHEMA = 3


class ContractError(ValueError):
    """A manifest.json or packing.json that does not follow the schema; the message names the field."""


_HEADER = {"schema": "int", "generated": "str", "inputs": "str", "target": "str", "model": "str", "device": "str",
           "arch": "str?", "policy": "str", "layout": "str", "programmatic_dependent_launch": "bool"}

_ARG = {"param": "str", "kind": "str", "buffer": "str?", "dtype": "str?", "shape": "[expr]?", "weight": "bool?",
        "layer_slice": "bool?", "value": "expr?", "macro": "str?"}

_STEP_OP = {"op": "str", "kernel": "str", "shaped_kernel": "str?", "per_layer": "bool", "grid": "expr", "block": "expr",
            "smem": "expr", "grid_stride": "bool", "workspace": "expr?", "limits": {"{}": "int", "?": True},
            "variants": [{"kernel": "str", "shaped_kernel": "str", "at_most": {"{}": "int"}, "grid": "expr"}, "?"],
            "final": "bool?", "args": [_ARG]}

MANIFEST = {
    **_HEADER,
    "config": {"{}": {"hf": "[str]", "type": "str", "default": "any", "per_run": "bool?"}},
    "architectures": "[str]",
    "rope": {"theta": "str", "keys": "[str]", "types": {"{}": "[str]"}},
    "gate": {"{}": {"values": "[any]", "or_at_least": "str?"}},
    "roles": {"{}": {"{}": "str"}},
    "buffers": [{"name": "str", "dtype": "str", "shape": "[expr]"}],
    "weights": [{"name": "str", "role": "str", "dtype": "str", "shape": "[expr]", "per_layer": "bool",
                 "scale": "str?", "scale_dtype": "str?"}],
    "kernels": [{"name": "str", "template": "str", "params": [{"name": "str", "kind": "str", "dtype": "str?"}],
                 "roles": {"{}": "str"}}],
    "decode_step": [_STEP_OP],
    "prefill_chunk": "int",
    "prefill_step": [_STEP_OP],
}

PACKING = {
    **_HEADER,
    "weights": [{"name": "str", "role": "str", "per_layer": "bool",
                 "sources": [{"name": "str", "shape": "[expr]", "computed": "str?"}],
                 "tied_to": {"source": "str", "when": "str", "?": True},
                 "transforms": [{"{}": "any"}], "dtype": "str", "shape": "[expr]",
                 "scale": {"name": "str", "dtype": "str", "shape": "[expr]", "?": True}}],
    "ignored_tensors": "[str]",
}

_SCALARS = {"str": (str,), "int": (int,), "bool": (bool,), "expr": (str, int, float), "any": (object,)}


def _optional(spec) -> bool:
    if isinstance(spec, str):
        return spec.endswith("?")
    if isinstance(spec, dict):
        return bool(spec.get("?"))
    return len(spec) == 2 and spec[1] == "?"


def _check(value, spec, path: str) -> None:
    if isinstance(spec, str):
        if value is None and spec.endswith("?"):
            return
        name = spec.rstrip("?")
        if name.startswith("["):
            _check(value, [name[1:-1]], path)
            return
        if isinstance(value, bool) and name in ("int", "expr") or not isinstance(value, _SCALARS[name]):
            raise ContractError(f"{path} is {value!r}; the schema wants {name}")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ContractError(f"{path} is {type(value).__name__}; the schema wants a list")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]")
        return
    if not isinstance(value, dict):
        raise ContractError(f"{path} is {type(value).__name__}; the schema wants a mapping")
    if "{}" in spec:                          # a mapping from names to one kind of value
        for k, v in value.items():
            _check(v, spec["{}"], f"{path}.{k}")
        return
    fields = {k: s for k, s in spec.items() if k != "?"}
    for k in value:
        if k not in fields:
            raise ContractError(f"{path}.{k} is not in the schema (fields: {', '.join(fields)})")
    for k, s in fields.items():
        if k in value:
            _check(value[k], s, f"{path}.{k}")
        elif not _optional(s):
            raise ContractError(f"{path} lacks {k}")


def check(kind: str, obj, where: str) -> dict:
    """``obj`` (a parsed manifest.json or packing.json, by ``kind``) if it follows the schema of this
    version, else a ContractError naming ``where`` and the field."""
    if not isinstance(obj, dict):
        raise ContractError(f"{where} is a {type(obj).__name__}; a {kind} is a JSON object")
    if obj.get("schema") != SCHEMA:
        raise ContractError(f"{where} has schema {obj.get('schema')!r}, this dtypeforge reads schema {SCHEMA}; "
                            "regenerate it with this version (`codegen build`)")
    _check(obj, {"manifest": MANIFEST, "packing": PACKING}[kind], where)
    return obj
