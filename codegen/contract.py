"""The contract between the generator and the runtime: manifest.json and packing.json as typed records.

Every record of the two files is a frozen dataclass below, and those dataclasses are the schema: a
field's type says what JSON it holds (``tuple[X, ...]`` a list, ``dict[str, X]`` a mapping from names
to X, ``Expr`` a shape or launch expression, ``Any`` any JSON value), and a field with a default
(``X | None = None``) is optional: absent or null. JSON field names are attribute names.

``load_manifest`` and ``load_packing`` check a parsed file against those fields and build the records;
a wrong type, a missing field or an unknown one is refused by its path (``decode_step[3].args[0].dtype``).
codegen checks each file it writes through them (so it cannot write off-schema), and the runtime reads
a target only as these records (so a target from another version, or one edited by hand, is refused by
name before anything is bound or packed). Both stamp and compare ``SCHEMA``: a change to what a file
means bumps it, and a runtime refuses a target of another schema rather than misreading it.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

SCHEMA = 3

# A shape, grid or argument expression over symbols (codegen/expr.py), or a literal number.
Expr = Annotated[Union[str, int, float], "expr"]

# every record: immutable, built by keyword (the JSON field names), no per-instance __dict__
_record = dataclass(frozen=True, slots=True, kw_only=True)


class ContractError(ValueError):
    """A manifest.json or packing.json that does not follow the schema; the message names the field."""


@_record
class Header:
    """The fields both files start with: which target, generated from which inputs, under which schema."""
    schema: int
    generated: str
    inputs: str                 # hash of the specs and templates; manifest and packing must share it
    target: str
    model: str
    device: str
    arch: str | None = None     # sm_XX for a CUDA device, null for the reference device
    policy: str
    layout: str
    programmatic_dependent_launch: bool


# ---------------------------------------------------------------------------------------- manifest.json

@_record
class ConfigKey:
    """A config symbol: the config.json keys that hold it (first present wins), its type and its default."""
    hf: tuple[str, ...]
    type: str                   # int, float or bool
    default: Any                # a literal, an expression over int symbols, or null (the key is required)
    per_run: bool | None = None  # the runtime may change it per run (max_seq), so no kernel compiles it in


@_record
class RopeSpec:
    """Where config.json keeps RoPE's base and scaling, and the parameters of each scaling type the spec runs."""
    theta: str
    keys: tuple[str, ...]
    types: dict[str, tuple[str, ...]]


@_record
class GateRule:
    """The values of a config.json key the spec computes (null: absent), or any int of at least a symbol."""
    values: tuple[Any, ...]
    or_at_least: str | None = None


@_record
class RoleDTypes:
    """One tensor role's dtypes under the target's policy."""
    storage: str
    compute: str | None = None
    accumulate: str | None = None
    output: str | None = None
    quant: str | None = None
    scale: str | None = None


@_record
class Buffer:
    """An activation, cache or index buffer the runtime allocates."""
    name: str
    dtype: str
    shape: tuple[Expr, ...]


@_record
class WeightDecl:
    """A packed weight as the kernels see it (packing.json says how it is packed)."""
    name: str
    role: str
    dtype: str
    shape: tuple[Expr, ...]
    per_layer: bool
    scale: str | None = None    # the per-output-channel scale buffer of a quantized weight
    scale_dtype: str | None = None


@_record
class KernelParam:
    """A kernel parameter; pointer parameters carry the dtype of what they point at."""
    name: str
    kind: str
    dtype: str | None = None


@_record
class KernelDecl:
    """A kernel instance of kernels.cu: its template, parameters and the dtypes of its role fields."""
    name: str
    template: str
    params: tuple[KernelParam, ...]
    roles: dict[str, str]


@_record
class LaunchArg:
    """One argument of a launch: a buffer or weight (buffer, dtype, shape), a value, or the kernel's scratch."""
    param: str
    kind: str
    buffer: str | None = None   # may hold {i}, the layer index
    dtype: str | None = None
    shape: tuple[Expr, ...] | None = None
    weight: bool | None = None
    layer_slice: bool | None = None  # the buffer holds every layer; the launch gets layer i's slice
    value: Expr | None = None
    macro: str | None = None    # the -D name that fixes this int argument in the shaped entry point


@_record
class Variant:
    """Another entry point of a launch's kernel, launched instead when every at_most bound holds."""
    kernel: str
    shaped_kernel: str
    at_most: dict[str, int]
    grid: Expr


@_record
class StepOp:
    """One launch of decode_step or prefill_step (per_layer ones run once per layer)."""
    op: str
    kernel: str
    shaped_kernel: str | None = None  # CUDA targets: the entry point compiled with the model's shapes
    per_layer: bool
    grid: Expr
    block: Expr
    smem: Expr
    grid_stride: bool
    workspace: Expr | None = None    # bytes of the kernel's own scratch
    limits: dict[str, int] | None = None  # CUDA targets: upper bounds on int arguments
    variants: tuple[Variant, ...] | None = None
    final: bool | None = None         # prefill: runs after a prompt's last chunk only
    args: tuple[LaunchArg, ...]


@_record
class Manifest(Header):
    """manifest.json: config symbols, buffers, weights and kernels, and the decode and prefill steps."""
    config: dict[str, ConfigKey]
    architectures: tuple[str, ...]
    rope: RopeSpec
    gate: dict[str, GateRule]
    roles: dict[str, RoleDTypes]
    buffers: tuple[Buffer, ...]
    weights: tuple[WeightDecl, ...]
    kernels: tuple[KernelDecl, ...]
    decode_step: tuple[StepOp, ...]
    prefill_chunk: int
    prefill_step: tuple[StepOp, ...]


# ----------------------------------------------------------------------------------------- packing.json

@_record
class Source:
    """A checkpoint tensor a packed weight reads, or one the loader computes from config.json."""
    name: str
    shape: tuple[Expr, ...]
    computed: str | None = None  # the section that computes it (rope)


@_record
class Tie:
    """Pack from another tensor instead when a bool config symbol is true (tied embeddings)."""
    source: str
    when: str


@_record
class Transform:
    """One packing step: concat_rows of the sources, then a cast or a quantize to the storage dtype."""
    op: str
    parts: int | None = None
    scheme: str | None = None
    dtype: str | None = None
    scale_dtype: str | None = None


@_record
class ScaleDecl:
    """The per-output-channel scale buffer a quantized weight packs beside itself."""
    name: str
    dtype: str
    shape: tuple[Expr, ...]


@_record
class PackedWeight:
    """One weight the loader packs: its sources, how, and the dtype and shape it packs to."""
    name: str
    role: str
    per_layer: bool
    sources: tuple[Source, ...]
    tied_to: Tie | None = None
    transforms: tuple[Transform, ...]
    dtype: str
    shape: tuple[Expr, ...]
    scale: ScaleDecl | None = None


@_record
class Packing(Header):
    """packing.json: the weights to pack and the checkpoint tensors the model spec reads none of."""
    weights: tuple[PackedWeight, ...]
    ignored_tensors: tuple[str, ...]


# ------------------------------------------------------------------------------------------ the loader

@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """A record's fields in order: name -> (type, required)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], f.default is dataclasses.MISSING) for f in dataclasses.fields(cls)}


def _build(hint, value, path: str):
    """``value`` (parsed JSON at ``path``) as type ``hint``, or a ContractError naming ``path``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:       # X | None
        if value is None:
            return None
        (hint,) = (a for a in args if a is not type(None))
        return _build(hint, value, path)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ContractError(f"{path} is {type(value).__name__}; the schema wants a mapping")
        fields = _fields(hint)
        for k in value:
            if k not in fields:
                raise ContractError(f"{path}.{k} is not in the schema (fields: {', '.join(fields)})")
        out = {}
        for k, (h, required) in fields.items():
            if k in value:
                out[k] = _build(h, value[k], f"{path}.{k}")
            elif required:
                raise ContractError(f"{path} lacks {k}")
        return hint(**out)
    if origin is tuple:
        if not isinstance(value, list):
            raise ContractError(f"{path} is {type(value).__name__}; the schema wants a list")
        return tuple(_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{path} is {type(value).__name__}; the schema wants a mapping")
        return {k: _build(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is Annotated:                     # Expr: a union of scalars, named for the messages
        kinds, name = typing.get_args(args[0]), args[1]
    else:
        kinds, name = (hint,), hint.__name__
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ContractError(f"{path} is {value!r}; the schema wants {name}")
    return value


def _load(cls: type, kind: str, obj, where: str):
    if not isinstance(obj, dict):
        raise ContractError(f"{where} is a {type(obj).__name__}; a {kind} is a JSON object")
    if obj.get("schema") != SCHEMA:
        raise ContractError(f"{where} has schema {obj.get('schema')!r}, this dtypeforge reads schema {SCHEMA}; "
                            "regenerate it with this version (`codegen build`)")
    return _build(cls, obj, where)


def load_manifest(obj, where: str) -> Manifest:
    """``obj`` (a parsed manifest.json) as a Manifest if it follows the schema of this version, else a
    ContractError naming ``where`` and the field."""
    return _load(Manifest, "manifest", obj, where)


def load_packing(obj, where: str) -> Packing:
    """``obj`` (a parsed packing.json) as a Packing if it follows the schema of this version, else a
    ContractError naming ``where`` and the field."""
    return _load(Packing, "packing", obj, where)
