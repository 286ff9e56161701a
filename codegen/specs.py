"""Load and validate the spec folder: models/, policies/, devices/.

Every check that can fail raises a SpecError naming the file, the line, the key, what was
found and what is allowed. After ``load_specs`` returns, every name that can reach
generated C is a C identifier (or a dtype from the closed set), every expression parses
with known symbols, every policy is complete, and every device's default policy runs on it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import expr
from .dtypes import ARITH_DTYPES, DTYPES, QUANT_SCHEMES, SCALE_DTYPES, STORAGE_DTYPES
from .kernels import FAMILIES, GEMM_SPLITS, GEMM_TILES, GEMM_WIDE_TILES, INDEX_KINDS, PREFETCH, PTR_KINDS, gemm_smem_bytes
from .yamlsrc import Source, SpecError, load

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")          # policy / device / model names (file stems)
ARCH = re.compile(r"^sm_[0-9]{2,3}[a-z]?$")
HF_NAME = re.compile(r"^[A-Za-z0-9_.]+(\{i\}[A-Za-z0-9_.]*)?$")

POLICY_FIELDS = ("storage", "compute", "accumulate", "output", "quant", "scale")
FIELD_ALLOWED = {"storage": STORAGE_DTYPES, "compute": ARITH_DTYPES, "accumulate": ARITH_DTYPES,
                 "output": ARITH_DTYPES, "quant": QUANT_SCHEMES, "scale": SCALE_DTYPES}
CAPABILITIES = {"native_f16_arith": bool, "native_bf16_arith": bool, "fp8_convert": bool,
                "tensor_cores": bool, "programmatic_dependent_launch": bool, "smem_per_block": int}
# Optional capabilities (false when absent). wgmma: Hopper's warpgroup MMA, which the prefill GEMMs use
# for f16/bf16 compute; it exists only on the arch-specific sm_90a target.
OPTIONAL_CAPABILITIES = {"wgmma": bool}
WGMMA_ARCH = "sm_90a"
# Launch-tuning knobs a device spec may set under `tuning:`; they shape the generated code and its
# launches, never the numerics. name -> (default, allowed values).
#   gemv_loads: 16-byte weight loads per lane per batch in the GEMV kernels (two batches in flight)
#   l2_prefetch_kib: KiB of the next GEMV's weight that attention asks the L2 to fetch (0: none; sm_90+)
#   attn_threads: threads per decode-attention block (one block per head and split; 128 registers each)
#   gemv_rotate_batches: a GEMV warp whose rows take at least this many batches starts each row at the
#     batch its warp index selects (rotated), not at the row's first (0: never); the same products and
#     sums, added in another order
#   prefill_chunk: prompt tokens one prefill launch takes at most (longer prompts go in chunks); the
#     prefill buffers hold this many rows
TUNING = {"gemv_loads": (8, (2, 4, 8, 16)), "l2_prefetch_kib": (0, (0, 1024, 2048, 4096, 8192, 16384, 32768)),
          "attn_threads": (512, (128, 256, 512)), "gemv_rotate_batches": (0, (0, 2, 3, 4, 8, 16)),
          "prefill_chunk": (1024, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))}
# `gemm_tiles:` {family: "BMxBN" or "BMxBN/S"}: the block tile (token rows x output channels) of each
# prefill GEMM family (dtf/gemm.cuh) and how many blocks split its K (S, a thread-block cluster; wgmma
# devices); a family the spec does not name gets GEMM_TILE_DEFAULT, (BM, BN, S).
GEMM_TILE_DEFAULT = (128, 64, 1)
# Symbols of a run that no config.json holds, usable in the model spec's expressions: `chunk`, the rows
# the prefill buffers hold (the device's prefill_chunk, capped to the run's context), in buffer shapes;
# `tokens`, the prompt rows one prefill launch processes (1..chunk), in prefill_step arguments.
CHUNK, TOKENS = "chunk", "tokens"
PREFETCH_MIN_ARCH = 90   # cp.async.bulk.prefetch.L2
CONFIG_TYPES = {"int": int, "float": float, "bool": bool}


def _allowed(xs) -> str:
    return "allowed: " + ", ".join(map(str, xs))


def _mapping(src: Source, path: tuple, value: Any, required: dict, optional: dict = {}) -> dict:
    """Check ``value`` is a mapping with exactly the required keys and some optional ones.

    ``required``/``optional`` map key -> type (or tuple of types) that the value must have.
    """
    if not isinstance(value, dict):
        raise src.error(path, value, "expected a mapping")
    known = {**required, **optional}
    for k, v in value.items():
        if k not in known:
            raise src.error(path + (k,), k, f"unknown key; {_allowed(known)}")
        if known[k] is not None and not isinstance(v, known[k]) or (known[k] in (int, float) and isinstance(v, bool)):
            want = known[k].__name__ if isinstance(known[k], type) else " or ".join(t.__name__ for t in known[k])
            raise src.error(path + (k,), v, f"expected {want}")
    for k in required:
        if k not in value:
            raise src.error(path, f"<no '{k}'>", f"'{k}' is required")
    return value


def _ident(src: Source, path: tuple, name: Any, pattern=IDENT, what="a C identifier") -> str:
    if not isinstance(name, str) or not pattern.match(name):
        raise src.error(path, name, f"must be {what} ({pattern.pattern})")
    return name


def _expr(src: Source, path: tuple, text: Any, symbols) -> str:
    try:
        return expr.parse(text, symbols)
    except expr.ExprError as e:
        raise src.error(path, text, str(e)) from None


def _sample_envs(ints) -> list[dict[str, int]]:
    """Positive values for the int symbols: all equal, and distinct powers of two both ways round,
    so a difference of two symbols is positive under at least one of them when it can be."""
    names = sorted(ints)
    return [{s: 64 for s in names}, {s: 2 << i for i, s in enumerate(names)},
            {s: 2 << (len(names) - 1 - i) for i, s in enumerate(names)}]


def _shape_dim(src: Source, path: tuple, text: Any, ints) -> str:
    """``_expr`` for one dimension of a shape, which must also be positive for some positive config:
    a dimension that is zero or negative whatever the checkpoint says (``0``, ``n - n``, ``1 // dim``)
    would give empty or negative allocations far from the spec line that caused them."""
    canon = _expr(src, path, text, ints)
    values = []
    for env in _sample_envs(ints):
        try:
            values.append(expr.evaluate(canon, env))
        except ZeroDivisionError:
            values.append("a division by zero")
    if not any(isinstance(v, (int, float)) and v > 0 for v in values):
        shown = ", ".join(map(str, dict.fromkeys(values)))
        raise src.error(path, text, f"a dimension must be positive, but this is {shown} for every positive config tried "
                        f"(all int symbols 64, or distinct powers of two)")
    return canon


# ----------------------------------------------------------------------------- model

@dataclass
class ConfigSym:
    name: str
    hf: tuple[str, ...]        # config.json keys, first present wins; a dotted key reads inside a mapping
    type: str
    default: Any = None        # literal, or an expression over other int symbols
    # The runtime may change it from run to run (max_seq is capped to the prompt plus the new tokens),
    # so no kernel is compiled with it as a constant; every other int symbol is fixed by the checkpoint.
    per_run: bool = False


@dataclass
class Tensor:
    name: str
    hf: str                    # the checkpoint's name, or for a computed tensor the spec's own name
    shape: tuple[str, ...]
    per_layer: bool
    tied_to: str | None
    tied_when: str | None
    computed: str | None = None   # not in the checkpoint: made from config.json by this section ("rope")


@dataclass
class RopeSpec:
    """Where config.json declares RoPE and which of its types this spec computes (runtime/rope.py)."""
    theta: str                           # the float config symbol holding the base
    keys: tuple[str, ...]                # config keys that may hold the scaling mapping, first present wins
    types: dict[str, tuple[str, ...]]    # rope_type -> the parameters it needs


@dataclass
class GateRule:
    """A config.json key that changes the math: the values this spec computes."""
    values: tuple                        # allowed values; None means the key may be absent or null
    or_at_least: str | None = None       # or a number at least this int symbol's value for the run


COMPUTED = ("rope",)                     # sections of a model spec that can make a tensor
ROPE_TYPES = ("default", "linear", "llama3")   # the formulas runtime/rope.py implements


@dataclass
class WeightDef:
    name: str
    roles: tuple[str, ...]
    sources: tuple[str, ...]
    layout: str | None


@dataclass
class BufferDef:
    name: str
    dtype: str                          # "index" or "<role>.<field>"
    shape: tuple[str, ...]
    layout: str | None


# When an op lets the next launch start (sm_90+ programmatic dependent launch; elsewhere nothing):
# "after_wait", once all its blocks have waited for their own predecessor (so at most one kernel runs
# ahead, streaming its weights), or "early", as the op starts (for an op whose successor needs a
# longer head start than this op's time after its wait). docs/benchmarks.md has the measurements.
DEPENDENTS = ("after_wait", "early")


@dataclass
class OpDef:
    op: str
    kernel: str
    roles: dict[str, str]        # role slot ("" = the op's main role, "norm", "rope", ...) -> role
    per_layer: bool
    layout: str | None
    args: dict[str, str]
    dependents: str = DEPENDENTS[0]   # when the next launch may start (programmatic dependent launch)
    final: bool = False               # prefill: runs only after a prompt's last chunk (its last token's logits)


@dataclass
class ModelSpec:
    name: str
    src: Source
    architectures: tuple[str, ...]
    rope: RopeSpec
    gate: dict[str, GateRule]
    ignored_tensors: tuple[str, ...]
    config: dict[str, ConfigSym]
    roles: dict[str, tuple[str, ...]]
    tensors: dict[str, Tensor]
    layouts: dict[str, str]
    weights: dict[str, WeightDef]
    buffers: dict[str, BufferDef]
    decode_step: list[OpDef]
    prefill_step: list[OpDef] = field(default_factory=list)


def load_model(path: Path) -> ModelSpec:
    src = load(path)
    d = _mapping(src, (), src.data, {"name": str, "architectures": list, "config": dict, "rope": dict, "gate": dict,
                                     "roles": dict, "tensors": dict, "layouts": dict, "weights": dict, "buffers": dict,
                                     "decode_step": list}, {"ignored_tensors": list, "prefill_step": list})
    _ident(src, ("name",), d["name"], NAME, "a lowercase name")
    if d["name"] != path.stem:
        raise src.error(("name",), d["name"], f"must equal the file name '{path.stem}'")

    config: dict[str, ConfigSym] = {}
    for s, c in d["config"].items():
        p = ("config", s)
        _ident(src, p, s)
        if s in (CHUNK, TOKENS):
            raise src.error(p, s, f"{CHUNK} and {TOKENS} are the run's prefill symbols; name the config symbol otherwise")
        _mapping(src, p, c, {"hf": (str, list), "type": str}, {"default": (int, float, bool, str), "per_run": bool})
        hf = (c["hf"],) if isinstance(c["hf"], str) else tuple(c["hf"])
        for i, k in enumerate(hf):
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k):
                raise src.error(p + ("hf",) + ((i,) if isinstance(c["hf"], list) else ()), k,
                                "a config.json key, or a dotted path into a mapping (rope_parameters.rope_theta)")
        if not hf:
            raise src.error(p + ("hf",), c["hf"], "at least one config.json key")
        if c["type"] not in CONFIG_TYPES:
            raise src.error(p + ("type",), c["type"], _allowed(CONFIG_TYPES))
        if c.get("per_run") and c["type"] != "int":
            raise src.error(p + ("per_run",), c["per_run"], "only int symbols are compiled into kernels, so only they may be per_run")
        config[s] = ConfigSym(s, hf, c["type"], c.get("default"), c.get("per_run", False))
    ints = [s for s, c in config.items() if c.type == "int"]
    floats = [s for s, c in config.items() if c.type == "float"]
    for s, c in config.items():
        if isinstance(c.default, str):
            if c.type != "int":
                raise src.error(("config", s, "default"), c.default, "only int symbols may default to an expression")
            c.default = _expr(src, ("config", s, "default"), c.default, [x for x in ints if x != s])

    for i, a in enumerate(d["architectures"]):
        _ident(src, ("architectures", i), a, what="a transformers architecture name")
    if not d["architectures"]:
        raise src.error(("architectures",), [], "at least one architecture (config.json's architectures)")

    rd = _mapping(src, ("rope",), d["rope"], {"theta": str, "keys": list, "types": dict})
    if config.get(rd["theta"], ConfigSym("", (), "")).type != "float":
        raise src.error(("rope", "theta"), rd["theta"], "must name a float config symbol: " + ", ".join(floats))
    for i, k in enumerate(rd["keys"]):
        _ident(src, ("rope", "keys", i), k, what="a config.json key")
    rope_types = {}
    for t, params in rd["types"].items():
        if t not in ROPE_TYPES:
            raise src.error(("rope", "types", t), t, f"a RoPE type runtime/rope.py implements; {_allowed(ROPE_TYPES)}")
        if not isinstance(params, list) or not all(isinstance(x, str) for x in params):
            raise src.error(("rope", "types", t), params, "a list of the parameter keys the type needs")
        rope_types[t] = tuple(params)
    if "default" not in rope_types:
        raise src.error(("rope", "types"), list(rope_types), "'default' (no scaling) must be among the types")
    rope = RopeSpec(rd["theta"], tuple(rd["keys"]), rope_types)

    gate = {}
    for k, g in d["gate"].items():
        p = ("gate", k)
        _ident(src, p, k, what="a config.json key")
        _mapping(src, p, g, {"values": list}, {"or_at_least": str})
        if g.get("or_at_least") is not None and g["or_at_least"] not in ints:
            raise src.error(p + ("or_at_least",), g["or_at_least"], "must name an int config symbol: " + ", ".join(ints))
        gate[k] = GateRule(tuple(g["values"]), g.get("or_at_least"))

    ignored = d.get("ignored_tensors", [])
    for i, t in enumerate(ignored):
        _ident(src, ("ignored_tensors", i), t, HF_NAME, "a checkpoint tensor name ({i} marks the layer)")

    roles = {}
    for r, rd in d["roles"].items():
        p = ("roles", r)
        _ident(src, p, r)
        _mapping(src, p, rd, {"fields": list}, {"doc": str})
        for i, f in enumerate(rd["fields"]):
            if f not in POLICY_FIELDS:
                raise src.error(p + ("fields", i), f, _allowed(POLICY_FIELDS))
        if "storage" not in rd["fields"]:
            raise src.error(p + ("fields",), rd["fields"], "every role has a 'storage' field")
        roles[r] = tuple(rd["fields"])

    layouts = {}
    for lname, ld in d["layouts"].items():
        _ident(src, ("layouts", lname), lname)
        _mapping(src, ("layouts", lname), ld, {}, {"doc": str})
        layouts[lname] = ld.get("doc", "")

    def layout_ref(path, v):
        if v is not None and v not in layouts:
            raise src.error(path, v, _allowed(layouts))
        return v

    tensors = {}
    for t, td in d["tensors"].items():
        p = ("tensors", t)
        _ident(src, p, t)
        _mapping(src, p, td, {"shape": list}, {"hf": str, "computed": str, "per_layer": bool, "tied_to": str, "tied_when": str})
        per_layer = td.get("per_layer", False)
        if ("hf" in td) == ("computed" in td):
            raise src.error(p, f"<{'both' if 'hf' in td else 'neither'} 'hf' and 'computed'>",
                            "a tensor is either in the checkpoint (hf: name) or computed from config.json (computed: section)")
        if "computed" in td:
            if td["computed"] not in COMPUTED:
                raise src.error(p + ("computed",), td["computed"], _allowed(COMPUTED))
            if per_layer or "tied_to" in td:
                raise src.error(p + ("computed",), td["computed"], "a computed tensor is one table, neither per_layer nor tied")
            shape = tuple(_shape_dim(src, p + ("shape", i), e, ints) for i, e in enumerate(td["shape"]))
            tensors[t] = Tensor(t, t, shape, False, None, None, td["computed"])
            continue
        _ident(src, p + ("hf",), td["hf"], HF_NAME, "a checkpoint tensor name ({i} marks the layer)")
        if per_layer != ("{i}" in td["hf"]):
            raise src.error(p + ("hf",), td["hf"], "per_layer tensors name their layer with {i}, others must not")
        shape = tuple(_shape_dim(src, p + ("shape", i), e, ints) for i, e in enumerate(td["shape"]))
        tensors[t] = Tensor(t, td["hf"], shape, per_layer, td.get("tied_to"), td.get("tied_when"))
    for t in tensors.values():
        p = ("tensors", t.name)
        if t.tied_to is not None:
            if t.tied_to not in tensors:
                raise src.error(p + ("tied_to",), t.tied_to, _allowed(tensors))
            if tensors[t.tied_to].shape != t.shape:
                raise src.error(p + ("tied_to",), t.tied_to, f"a tied tensor must have the same shape {list(t.shape)}")
            if t.tied_when is None or config.get(t.tied_when, ConfigSym("", "", "")).type != "bool":
                raise src.error(p + ("tied_when",), t.tied_when, "must name a bool config symbol: " +
                                ", ".join(s for s, c in config.items() if c.type == "bool"))

    weights = {}
    for w, wd in d["weights"].items():
        p = ("weights", w)
        _ident(src, p, w)
        _mapping(src, p, wd, {"role": (str, list), "from": list}, {"layout": str})
        wroles = tuple(wd["role"]) if isinstance(wd["role"], list) else (wd["role"],) * len(wd["from"])
        if len(wroles) != len(wd["from"]):
            raise src.error(p + ("role",), wd["role"], f"one role per source tensor ({len(wd['from'])})")
        for i, r in enumerate(wroles):
            if r not in roles:
                raise src.error(p + ("role",), r, _allowed(roles))
        for i, t in enumerate(wd["from"]):
            if t not in tensors:
                raise src.error(p + ("from", i), t, _allowed(tensors))
        srcs = [tensors[t] for t in wd["from"]]
        if len({s.per_layer for s in srcs}) > 1 or len({s.shape[1:] for s in srcs}) > 1:
            raise src.error(p + ("from",), wd["from"], "fused tensors must agree on per_layer and on every dim but the first")
        weights[w] = WeightDef(w, wroles, tuple(wd["from"]), layout_ref(p + ("layout",), wd.get("layout")))

    buffers = {}
    for b, bd in d["buffers"].items():
        p = ("buffers", b)
        _ident(src, p, b)
        _mapping(src, p, bd, {"dtype": str, "shape": list}, {"layout": str})
        if bd["dtype"] != "index":
            role, _, fld = bd["dtype"].partition(".")
            if role not in roles or fld not in roles[role]:
                raise src.error(p + ("dtype",), bd["dtype"], "must be 'index' or <role>.<field> with a field the role has")
        shape = tuple(_shape_dim(src, p + ("shape", i), e, ints + [CHUNK]) for i, e in enumerate(bd["shape"]))
        buffers[b] = BufferDef(b, bd["dtype"], shape, layout_ref(p + ("layout",), bd.get("layout")))

    def load_step(key: str, syms: list[str]) -> list[OpDef]:
        return [_load_op(src, (key, n), od, key == "prefill_step", roles, buffers, weights, syms, floats, layout_ref)
                for n, od in enumerate(d.get(key, []))]

    decode_step = load_step("decode_step", ints)
    prefill_step = load_step("prefill_step", ints + [CHUNK, TOKENS])
    # an op's name is its kernels' entry name (<kernel>__<op>), so one name serves one op of a target
    seen: dict[str, tuple[str, str | None]] = {}
    for key, step in (("decode_step", decode_step), ("prefill_step", prefill_step)):
        for n, op in enumerate(step):
            if op.op in seen and (seen[op.op][1] is None or op.layout is None or seen[op.op][1] == op.layout):
                raise src.error((key, n, "op"), op.op, f"an op name is its kernel's entry name in a target, so it "
                                f"may appear once per layout (it is already in {seen[op.op][0]})")
            seen[op.op] = (key, op.layout)
    return ModelSpec(d["name"], src, tuple(d["architectures"]), rope, gate, tuple(ignored), config, roles, tensors,
                     layouts, weights, buffers, decode_step, prefill_step)


def _load_op(src: Source, p: tuple, od: Any, prefill: bool, roles, buffers, weights, ints: list[str], floats: list[str],
             layout_ref) -> OpDef:
    """One op of a step (decode_step, or prefill_step, whose ops may also be `final`)."""
    if not isinstance(od, dict):
        raise src.error(p, od, "expected a mapping {op, kernel, args, ...}")
    fam = FAMILIES.get(od.get("kernel"))
    if fam is None:
        raise src.error(p + ("kernel",), od.get("kernel", "<no 'kernel'>"), _allowed(FAMILIES))
    slot_keys = {f"{slot}_role" if slot else "role": str for slot in fam.slots}
    _mapping(src, p, od, {"op": str, "kernel": str, "args": dict}, {"per_layer": bool, "layout": str, "dependents": str, **({"final": bool} if prefill else {}), **slot_keys})
    _ident(src, p + ("op",), od["op"])
    op_roles = {}
    for slot, fields in fam.slots.items():
        key = f"{slot}_role" if slot else "role"
        role = od.get(key)
        if role not in roles:
            raise src.error(p + (key,), role if role is not None else f"<no '{key}'>",
                            f"kernel {fam.template} computes in the dtypes of a role given by '{key}'; {_allowed(roles)}")
        missing = [f for f in fields if f not in roles[role]]
        if missing:
            raise src.error(p + (key,), role, f"kernel {fam.template} needs {key} to have fields {list(fields)}")
        op_roles[slot] = role
    dependents = od.get("dependents", DEPENDENTS[0])
    if dependents not in DEPENDENTS:
        raise src.error(p + ("dependents",), dependents, _allowed(DEPENDENTS))
    args = {}
    names = [q.name for q in fam.spec_params]
    for a, v in od["args"].items():
        if a not in names:
            raise src.error(p + ("args", a), a, f"kernel {fam.template} takes {', '.join(names)}")
    for prm in fam.spec_params:
        ap = p + ("args", prm.name)
        if prm.name not in od["args"]:
            raise src.error(p + ("args",), f"<no '{prm.name}'>", f"kernel {fam.template} takes {', '.join(names)}")
        v = od["args"][prm.name]
        if prm.kind in PTR_KINDS or prm.kind in INDEX_KINDS:
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(\[i\])?", str(v))
            target = m and m.group(1)
            if not m or (target not in buffers and target not in weights):
                raise src.error(ap, v, "must name a buffer or weight (optionally `cache[i]` for layer i's slice); "
                                + _allowed(list(buffers) + list(weights)))
            if (target in weights) and prm.kind != "in":
                raise src.error(ap, v, f"weights are read-only; parameter {prm.name} is {prm.kind}")
            is_index = target in buffers and buffers[target].dtype == "index"
            if is_index != (prm.kind in INDEX_KINDS):
                raise src.error(ap, v, f"parameter {prm.name} wants {'an index' if prm.kind in INDEX_KINDS else 'a dtype-policy'} buffer")
            if m.group(2) and not od.get("per_layer"):
                raise src.error(ap, v, "[i] slices only make sense in per_layer ops")
            args[prm.name] = str(v)
        elif prm.kind == PREFETCH:
            if not isinstance(v, str) or v not in weights:
                raise src.error(ap, v, f"parameter {prm.name} names a packed weight the kernel prefetches to L2; "
                                + _allowed(list(weights)))
            args[prm.name] = v
        else:
            syms = ints + floats if prm.kind == "float" else ints
            args[prm.name] = _expr(src, ap, v, syms)
    if od.get("final") and od.get("per_layer"):
        raise src.error(p + ("final",), True, "a final op runs once after the last layer; it cannot be per_layer")
    return OpDef(od["op"], od["kernel"], op_roles, od.get("per_layer", False),
                 layout_ref(p + ("layout",), od.get("layout")), args, dependents, od.get("final", False))


# ----------------------------------------------------------------------------- policies

@dataclass
class Policy:
    name: str
    description: str
    extends: str | None
    roles: dict[str, dict[str, str]]                  # resolved: role -> field -> value
    origin: dict[tuple[str, str], tuple[Source, tuple]] = field(default_factory=dict)

    def error(self, role: str, fld: str, found: Any, allowed: str) -> SpecError:
        src, path = self.origin[(role, fld)]
        return src.error(path, found, allowed)


def _load_policy_file(path: Path, model: ModelSpec) -> tuple[Source, dict]:
    src = load(path)
    d = _mapping(src, (), src.data, {"name": str, "roles": dict}, {"extends": str, "description": str})
    _ident(src, ("name",), d["name"], NAME, "a lowercase name")
    if d["name"] != path.stem:
        raise src.error(("name",), d["name"], f"must equal the file name '{path.stem}'")
    for r, rd in d["roles"].items():
        p = ("roles", r)
        if r not in model.roles:
            raise src.error(p, r, f"unknown role for model {model.name}; {_allowed(model.roles)}")
        if not isinstance(rd, dict):
            raise src.error(p, rd, "expected a mapping of field: value")
        for f, v in rd.items():
            if f not in model.roles[r]:
                raise src.error(p + (f,), f, f"role {r} has no field '{f}'; {_allowed(model.roles[r])}")
            if v not in FIELD_ALLOWED[f]:
                raise src.error(p + (f,), v, _allowed(FIELD_ALLOWED[f]))
    return src, d


def load_policies(folder: Path, model: ModelSpec) -> dict[str, Policy]:
    files = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    raw = {name: _load_policy_file(p, model) for name, p in files.items()}
    resolved: dict[str, Policy] = {}

    def resolve(name: str, chain: list[str]) -> Policy:
        if name in resolved:
            return resolved[name]
        src, d = raw[name]
        parent = d.get("extends")
        roles: dict[str, dict[str, str]] = {}
        origin: dict = {}
        if parent is not None:
            if parent not in raw:
                raise src.error(("extends",), parent, f"no such policy in {folder}; {_allowed(raw)}")
            if parent in chain + [name]:
                full = chain + [name]
                cycle = " -> ".join(full[full.index(parent):] + [parent])
                raise src.error(("extends",), parent, f"extends must not form a cycle ({cycle})")
            base = resolve(parent, chain + [name])
            roles = {r: dict(f) for r, f in base.roles.items()}
            origin = dict(base.origin)
        for r, rd in d["roles"].items():
            roles.setdefault(r, {}).update(rd)
            for f in rd:
                origin[(r, f)] = (src, ("roles", r, f))
        pol = Policy(name, d.get("description", ""), parent, roles, origin)
        resolved[name] = pol
        return pol

    for name in raw:
        resolve(name, [])
    for pol in resolved.values():
        _check_complete(pol, raw[pol.name][0], model)
    return resolved


def _check_complete(pol: Policy, src: Source, model: ModelSpec) -> None:
    """After extends: every role present with every field it needs; quant/scale iff quantized storage."""
    for r, fields in model.roles.items():
        have = pol.roles.get(r)
        if have is None:
            raise src.error(("roles",), f"<no role '{r}'>", f"policy {pol.name} must set every role of model "
                            f"{model.name} (directly or via extends); missing {r}")
        storage = have.get("storage")
        quantized = storage is not None and DTYPES[storage].quantized
        if quantized and "quant" not in fields:
            raise pol.error(r, "storage", storage, f"{storage} needs a quantization scale, which role {r} cannot have "
                            f"(its fields: {', '.join(fields)}); allowed: {', '.join(d for d in STORAGE_DTYPES if not DTYPES[d].quantized)}")
        for f in fields:
            needed = f not in ("quant", "scale") or quantized
            if needed and f not in have:
                where = ("roles", r) if ("roles", r) in src.lines else ("roles",)
                why = f" (storage {storage} is quantized: it needs quant and scale)" if f in ("quant", "scale") else ""
                raise src.error(where, f"<no '{f}' for role {r}>", f"role {r} needs {f}{why}")
            if not needed and f in have:
                raise pol.error(r, f, have[f], f"role {r} stores {storage}, which is not quantized: remove {f}")


# ----------------------------------------------------------------------------- devices

@dataclass
class Device:
    name: str
    kind: str
    arch: str | None
    default_policy: str
    capabilities: dict[str, Any]
    memory_gb: float | None
    bandwidth_gbs: float | None
    gpu_names: list[str]          # substrings of the CUDA device name that select this spec
    tuning: dict[str, int]        # every TUNING knob, the spec's value or the default
    src: Source


def load_device(path: Path) -> Device:
    src = load(path)
    d = _mapping(src, (), src.data, {"name": str, "kind": str, "default_policy": str, "capabilities": dict},
                 {"arch": str, "memory_gb": (int, float), "bandwidth_gbs": (int, float), "gpu_names": list,
                  "tuning": dict})
    _ident(src, ("name",), d["name"], NAME, "a lowercase name")
    if d["name"] != path.stem:
        raise src.error(("name",), d["name"], f"must equal the file name '{path.stem}'")
    if d["kind"] not in ("cuda", "cpu"):
        raise src.error(("kind",), d["kind"], _allowed(("cuda", "cpu")))
    if d["kind"] == "cuda":
        if "arch" not in d:
            raise src.error((), "<no 'arch'>", "a cuda device needs arch: sm_XX")
        _ident(src, ("arch",), d["arch"], ARCH, "an SM architecture such as sm_90")
    elif "arch" in d:
        raise src.error(("arch",), d["arch"], "a cpu device has no arch")
    _mapping(src, ("capabilities",), d["capabilities"], CAPABILITIES, OPTIONAL_CAPABILITIES)
    if d["capabilities"].get("wgmma") and d.get("arch") != WGMMA_ARCH:
        raise src.error(("capabilities", "wgmma"), True, f"wgmma needs arch {WGMMA_ARCH}; this device has arch "
                        f"{d.get('arch', '<none>')} (set wgmma: false, or arch: {WGMMA_ARCH} for a Hopper GPU)")
    # Sizes and rates divide and bound what the runtime does (weights that fit, the roofline), so a
    # zero, negative or infinite one would pass here and mislead there.
    for k in ("memory_gb", "bandwidth_gbs"):
        if k in d and not (0 < d[k] < math.inf):
            raise src.error((k,), d[k], "must be a positive finite number")
    smem = d["capabilities"]["smem_per_block"]
    if smem < 0 or (d["kind"] == "cuda" and smem == 0):
        raise src.error(("capabilities", "smem_per_block"), smem,
                        "bytes of shared memory a block may use: positive for a cuda device (0 only for a cpu one)")
    for i, g in enumerate(d.get("gpu_names", [])):
        if not isinstance(g, str) or not g.strip():
            raise src.error(("gpu_names", i), g, "a non-empty part of the CUDA device name, e.g. 'H100'")
    tuning = _mapping(src, ("tuning",), d.get("tuning", {}), {}, {**{k: int for k in TUNING}, "gemm_tiles": dict})
    for k, v in tuning.items():
        if k in TUNING and v not in TUNING[k][1]:
            raise src.error(("tuning", k), v, _allowed(TUNING[k][1]))
    tiles = _gemm_tiles(src, d, tuning.get("gemm_tiles", {}))
    if tuning.get("l2_prefetch_kib", 0) and (d["kind"] != "cuda" or int(re.match(r"sm_(\d+)", d["arch"]).group(1)) < PREFETCH_MIN_ARCH):
        raise src.error(("tuning", "l2_prefetch_kib"), tuning["l2_prefetch_kib"],
                        f"L2 prefetch (cp.async.bulk.prefetch) needs sm_{PREFETCH_MIN_ARCH} or newer; "
                        f"{d.get('arch', 'a cpu device')} allows only 0")
    return Device(d["name"], d["kind"], d.get("arch"), d["default_policy"], d["capabilities"],
                  d.get("memory_gb"), d.get("bandwidth_gbs"), d.get("gpu_names", []),
                  {**{k: tuning.get(k, default) for k, (default, _) in TUNING.items()}, "gemm_tiles": tiles}, src)


def _gemm_tiles(src: Source, d: dict, given: dict) -> dict[str, tuple[int, int, int]]:
    """Every prefill GEMM family's (BM, BN, S): the spec's (a "BMxBN" tile that dtf/gemm.cuh implements,
    whose stages fit the device's shared memory, 128x256 only on the wgmma path; "/S" splits K over a
    cluster of S blocks, wgmma devices only) or the default."""
    families = [f.template for f in FAMILIES.values() if f.smem_bytes == "{gemm_smem}"]
    wgmma = bool(d["capabilities"].get("wgmma"))
    implemented = GEMM_TILES + (GEMM_WIDE_TILES if wgmma else ())
    splits = GEMM_SPLITS if wgmma else (1,)
    out = {}
    for fam in families:
        text = given.get(fam, "%dx%d" % GEMM_TILE_DEFAULT[:2])
        m = re.fullmatch(r"(\d+)x(\d+)(?:/(\d+))?", text) if isinstance(text, str) else None
        tile = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)) if m else None
        if tile is None or tile[:2] not in implemented or tile[2] not in splits:
            wide = "" if wgmma else f" ({', '.join(f'{a}x{b}' for a, b in GEMM_WIDE_TILES)} and a /S split on a wgmma device)"
            raise src.error(("tuning", "gemm_tiles", fam), text,
                            "a tile BMxBN that dtf/gemm.cuh implements: " + ", ".join(f"{a}x{b}" for a, b in implemented)
                            + (", optionally /S splitting K over S blocks, S in " + ", ".join(map(str, splits[1:])) if wgmma else "")
                            + wide)
        need = max(gemm_smem_bytes(c, *tile[:2], wgmma) for c in (2, 4))
        if d["kind"] == "cuda" and need > d["capabilities"]["smem_per_block"]:
            raise src.error(("tuning", "gemm_tiles", fam), text, f"its stages take {need} bytes of shared memory, more than "
                            f"capabilities.smem_per_block ({d['capabilities']['smem_per_block']}); choose a smaller tile")
        out[fam] = tile
    for fam in given:
        if fam not in families:
            raise src.error(("tuning", "gemm_tiles", fam), fam, "unknown GEMM family; " + _allowed(families))
    return out


# Which device capability each policy field needs for a dtype (from the dtype table).
def requirement(fld: str, dtype_name: str) -> str | None:
    dt = DTYPES.get(dtype_name)
    if dt is None:
        return None
    if fld in ("compute", "accumulate"):
        return dt.requires_as_compute or dt.requires_as_storage
    if fld in ("storage", "output", "scale"):
        return dt.requires_as_storage
    return None


def check_runs_on(pol: Policy, dev: Device) -> None:
    """Raise a SpecError at the policy line a device cannot execute."""
    for r, fields in pol.roles.items():
        for f, v in fields.items():
            need = requirement(f, v)
            if need and not dev.capabilities.get(need, False):
                cap_line = dev.src.line(("capabilities", need))
                raise pol.error(r, f, v, f"device {dev.name} ({dev.arch}, {dev.src.path}:{cap_line}) cannot run it: "
                                f"{v} as {f} needs {need}, which {dev.name} lacks")



# ----------------------------------------------------------------------------- the folder

@dataclass
class Specs:
    root: Path
    models: dict[str, ModelSpec]
    policies: dict[str, dict[str, Policy]]   # model -> policy name -> Policy
    devices: dict[str, Device]

    def model_name(self, name: str | None = None) -> str:
        """The model spec a command means: the one named, or the only one there is."""
        if name is not None:
            if name not in self.models:
                raise UsageError(f"--model-spec {name!r} is not in {self.root}; allowed: {', '.join(sorted(self.models))}")
            return name
        if len(self.models) != 1:
            raise UsageError(f"{self.root} has model specs {', '.join(sorted(self.models))}; pass --model-spec")
        return next(iter(self.models))

    def model_for(self, architectures, where) -> str:
        """The model spec that computes a checkpoint's config.json architectures (its `architectures:` list)."""
        archs = architectures if isinstance(architectures, list) else [architectures]
        hits = [m for m, spec in sorted(self.models.items()) if archs and all(a in spec.architectures for a in archs)]
        if len(hits) != 1:
            known = "; ".join(f"{m}: {', '.join(spec.architectures)}" for m, spec in sorted(self.models.items()))
            found = "no model spec" if not hits else f"model specs {', '.join(hits)} both"
            raise UsageError(f"{where}: architectures is {architectures!r}, which {found} computes "
                             f"({'the model specs in ' + str(self.root) + ' compute ' + known if not hits else 'make them distinct'})")
        return hits[0]


DEFAULT_SPECS = Path(__file__).resolve().parent.parent / "specs"


def load_specs(root: Path = DEFAULT_SPECS) -> Specs:
    root = Path(root)
    for sub in ("models", "policies", "devices"):
        if not (root / sub).is_dir():
            raise SpecError(root / sub, None, "<folder>", "<missing>", "a spec folder holds models/, policies/ and devices/")
    models = {p.stem: load_model(p) for p in sorted((root / "models").glob("*.yaml"))}
    if not models:
        raise SpecError(root / "models", None, "<folder>", "<no *.yaml>", "at least one model spec")
    policies = {m: load_policies(root / "policies", model) for m, model in models.items()}
    devices = {p.stem: load_device(p) for p in sorted((root / "devices").glob("*.yaml"))}
    for dev in devices.values():
        for m, pols in policies.items():
            if dev.default_policy not in pols:
                raise dev.src.error(("default_policy",), dev.default_policy, _allowed(pols))
            check_runs_on(pols[dev.default_policy], dev)
    return Specs(root, models, policies, devices)


class UsageError(ValueError):
    """A command-line value that names nothing in the specs, or is out of range (exit code 2)."""


def check_selection(specs: Specs, device: str | None = None, policy: str | None = None, layout: str | None = None,
                    model: str | None = None) -> None:
    """Device, policy and layout names as a user typed them, each checked against the specs before it is
    used as a key or spelled into a path (a layout such as `../x` must never reach the file system)."""
    model = specs.model_name(model)
    for what, value, known in (("device", device, specs.devices), ("policy", policy, specs.policies[model]),
                               ("layout", layout, specs.models[model].layouts)):
        if value is not None and value not in known:
            raise UsageError(f"--{what} {value!r} is not in {specs.root}; allowed: {', '.join(sorted(known))}")
