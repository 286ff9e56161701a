"""The Plan: one resolved target (model x device x policy x layout), the only source of dtypes.

Everything downstream reads dtypes from here: the templates render kernels from
``Plan.kernels``, ``manifest.json`` lists the kernels, buffers and launch sequence, and
``packing.json`` tells the loader what to pack. Because kernel signatures and packed buffers
are both derived from the same ``Plan.weights`` entries, they cannot disagree on a dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from . import expr
from .contract import RoleDTypes   # a role's dtypes: the record the manifest carries
from .dtypes import DTYPES, DType
from .kernels import C_DECL, FAMILIES, tuned_sizes, INDEX_KINDS, PREFETCH, PTR_KINDS, WORKSPACE, KernelFamily, field_short
from .specs import GEMM_TILE_DEFAULT, Device, ModelSpec, Policy, Specs, check_runs_on
from .yamlsrc import SpecError

INDEX = "index"


@dataclass
class PackedWeight:
    """One buffer the loader packs and a kernel reads (``{i}`` in the name for per-layer ones)."""
    name: str
    role: str
    sources: list[str]            # HF tensor names, rows concatenated in this order
    source_shapes: list[list[str]]
    shape: list[str]
    per_layer: bool
    storage: str
    quant: str | None
    scale: str | None             # name of the packed scale buffer
    scale_dtype: str | None
    tied_to: dict | None          # {"source": hf name, "when": config symbol} for tied tensors
    computed: str | None = None   # made by the loader from config.json (the model spec section), not read


@dataclass
class Buffer:
    name: str
    dtype: str                    # a DTYPES key or "index"
    shape: list[str]


@dataclass
class KernelInstance:
    name: str
    family: KernelFamily
    dtypes: dict[str, str]        # pointer param or role field ("compute", "norm.output", ...) -> dtype name
    early_dependents: bool = False  # lets the next launch start as it starts (the op's `dependents: early`)
    launches: list[Launch] = field(default_factory=list)   # the ops that launch it: one shaped entry point each

    def t(self) -> dict[str, DType]:
        return {k: DTYPES[v] for k, v in self.dtypes.items()}

    def params(self) -> list:
        """The C parameters in order: the family's, less a scale the weight does not have (manifest.json's)."""
        return [p for p in self.family.params if p.scale_of is None or p.name in self.dtypes]

    def param_names(self) -> list[str]:
        return [p.name for p in self.params()]

    def signature(self, width: int = 110) -> str:
        """The C parameter list every entry point and the body share, from ``params()`` and the dtypes
        bound to them (kernels.C_DECL), wrapped at ``width`` columns."""
        decls = [C_DECL[p.kind].format(t=DTYPES[self.dtypes[p.name]].ctype if p.name in self.dtypes else "", n=p.name)
                 for p in self.params()]
        lines = [""]
        for d in decls:
            if lines[-1] and len(lines[-1]) + len(d) + 2 > width:
                lines[-1] += ","
                lines.append("    ")
            lines[-1] += (", " if lines[-1].strip() else "") + d
        return "\n".join(lines)


@dataclass
class Launch:
    op: str
    kernel: str
    per_layer: bool
    args: list[dict]              # ordered like the kernel's parameters
    grid: str
    block: str
    smem: str                     # dynamic shared memory bytes (expression)
    grid_stride: bool             # any grid up to `grid` is correct (the runtime may use one wave)
    workspace: str = "0"          # bytes of the kernel's scratch (its WORKSPACE parameter), expression
    limits: tuple[tuple[str, int], ...] = ()   # the CUDA template's bounds on int arguments (KernelFamily.limits)
    variants: tuple = ()          # KernelFamily.variants: entry points launched instead when their bounds hold
    final: bool = False           # prefill: only after a prompt's last chunk

    def shaped(self, entry: str) -> str:
        """The entry point compiled for this launch's shapes (with -DDTF_SHAPED): `entry` (the kernel or one
        of its variants) with every int argument that has a `macro` replaced by that compile-time constant."""
        return f"{entry}__{self.op}"

    def shaped_args(self) -> list[str]:
        """What the shaped entry passes its body: each argument's compile-time constant, or the argument."""
        return [a.get("macro", a["param"]) for a in self.args]


@dataclass
class Plan:
    target: str
    model: ModelSpec
    device: Device
    policy: Policy
    layout: str
    roles: dict[str, RoleDTypes]
    weights: dict[str, PackedWeight] = field(default_factory=dict)
    buffers: dict[str, Buffer] = field(default_factory=dict)
    kernels: dict[str, KernelInstance] = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)          # the decode step
    prefill: list[Launch] = field(default_factory=list)           # the prefill step (a block of prompt tokens)

    def role_dtype(self, ref: str) -> str:
        """'<role>.<field>' -> dtype name, or 'index'."""
        if ref == INDEX:
            return INDEX
        role, _, fld = ref.partition(".")
        return getattr(self.roles[role], fld)


class TargetKey(NamedTuple):
    """What a target is: a model spec on a device under a policy in a layout (generated/<name>/)."""
    model: str
    device: str
    policy: str
    layout: str

    @property
    def name(self) -> str:
        return target_name(self.device, self.policy, self.layout, self.model)


def target_name(device: str, policy: str, layout: str, model: str) -> str:
    return f"{model}.{device}.{policy}.{layout}"


def resolve(specs: Specs, device: str, policy: str, layout: str, model: str | None = None) -> Plan:
    model = specs.model_name(model)
    m = specs.models[model]
    dev = specs.devices[device]
    pol = specs.policies[model][policy]
    check_runs_on(pol, dev)
    roles = {r: RoleDTypes(**pol.roles[r]) for r in m.roles}
    plan = Plan(target_name(device, policy, layout, model), m, dev, pol, layout, roles)
    _resolve_weights(plan)
    _resolve_buffers(plan)
    _resolve_launches(plan, m.decode_step, plan.launches, "decode_step")
    _resolve_launches(plan, m.prefill_step, plan.prefill, "prefill_step")
    used = {a["buffer"] for l in plan.launches + plan.prefill for a in l.args if "buffer" in a}
    plan.buffers = {n: b for n, b in plan.buffers.items() if n in used}
    return plan


def _in_layout(item_layout: str | None, layout: str) -> bool:
    return item_layout is None or item_layout == layout


def _resolve_weights(plan: Plan) -> None:
    m = plan.model
    for w in m.weights.values():
        if not _in_layout(w.layout, plan.layout):
            continue
        dts = {plan.roles[r] for r in w.roles}
        if len(dts) > 1:
            r0, r1 = w.roles[0], next(r for r in w.roles if plan.roles[r] != plan.roles[w.roles[0]])
            diff = next(f for f in ("storage", "compute", "accumulate", "output", "quant", "scale")
                        if getattr(plan.roles[r0], f) != getattr(plan.roles[r1], f))
            raise plan.policy.error(r1, diff if (r1, diff) in plan.policy.origin else "storage",
                                    getattr(plan.roles[r1], diff),
                                    f"layout {plan.layout} fuses {', '.join(w.roles)} into one weight {w.name}, so they must "
                                    f"share dtypes; {r0}.{diff} is {getattr(plan.roles[r0], diff)}")
        rd = plan.roles[w.roles[0]]
        tensors = [m.tensors[t] for t in w.sources]
        per_layer = tensors[0].per_layer
        rows = " + ".join(f"({t.shape[0]})" if len(w.sources) > 1 else t.shape[0] for t in tensors)
        shape = [rows] + list(tensors[0].shape[1:])
        name = f"layers.{{i}}.{w.name}" if per_layer else w.name
        tied = None
        if len(tensors) == 1 and tensors[0].tied_to:
            tied = {"source": m.tensors[tensors[0].tied_to].hf, "when": tensors[0].tied_when}
        plan.weights[w.name] = PackedWeight(
            name=name, role=w.roles[0], sources=[t.hf for t in tensors], source_shapes=[list(t.shape) for t in tensors],
            shape=shape, per_layer=per_layer, storage=rd.storage, quant=rd.quant,
            scale=f"{name}.scale" if rd.quant else None, scale_dtype=rd.scale, tied_to=tied,
            computed=tensors[0].computed)


def _resolve_buffers(plan: Plan) -> None:
    for b in plan.model.buffers.values():
        if not _in_layout(b.layout, plan.layout):
            continue
        plan.buffers[b.name] = Buffer(b.name, plan.role_dtype(b.dtype), list(b.shape))


def _resolve_launches(plan: Plan, ops, out: list[Launch], key: str) -> None:
    m = plan.model
    # int symbols fixed by the checkpoint: compiled into a CUDA target's shaped entry points (none on the CPU)
    fixed = {s for s, c in m.config.items() if c.type == "int" and not c.per_run} if plan.device.kind == "cuda" else set()
    for op in ops:
        if not _in_layout(op.layout, plan.layout):
            continue
        fam = FAMILIES[op.kernel]
        dtypes: dict[str, str] = {}
        args: list[dict] = []
        for prm in fam.params:
            if prm.kind == WORKSPACE:
                args.append({"param": prm.name, "kind": prm.kind})
                continue
            if prm.scale_of is not None:
                w = plan.weights.get(op.args[prm.scale_of])
                if w is None or w.quant is None:
                    continue
                dtypes[prm.name] = w.scale_dtype
                args.append({"param": prm.name, "kind": prm.kind, "buffer": w.scale, "dtype": w.scale_dtype,
                             "shape": [w.shape[0]], "weight": True})
                continue
            if prm.kib_of is not None:        # whole KiB of the prefetched weight, from its packed shape
                w = plan.weights[op.args[prm.kib_of]]
                n = " * ".join(f"({s})" for s in w.shape)
                args.append({"param": prm.name, "kind": prm.kind, "value": f"{n} * {DTYPES[w.storage].itemsize} // 1024"})
                continue
            v = op.args[prm.name]
            if prm.kind == PREFETCH:            # a hint: any weight of the layout; no dtype in the signature
                if v not in plan.weights:
                    raise m.src.error((key,), v, f"op {op.op} prefetches {v}, which layout {plan.layout} lacks")
                w = plan.weights[v]
                args.append({"param": prm.name, "kind": prm.kind, "buffer": w.name, "dtype": w.storage,
                             "shape": w.shape, "weight": True})
                continue
            if prm.kind in PTR_KINDS or prm.kind in INDEX_KINDS:
                base, layer = (v[:-3], True) if v.endswith("[i]") else (v, False)
                if base in plan.weights:
                    w = plan.weights[base]
                    a = {"param": prm.name, "kind": prm.kind, "buffer": w.name, "dtype": w.storage,
                         "shape": w.shape, "weight": True}
                else:
                    if base not in plan.buffers:
                        raise m.src.error((key,), v, f"op {op.op} binds {base}, which layout {plan.layout} lacks")
                    b = plan.buffers[base]
                    a = {"param": prm.name, "kind": prm.kind, "buffer": base, "dtype": b.dtype,
                         "shape": b.shape[1:] if layer else b.shape, "weight": False}
                    if layer:
                        a["layer_slice"] = True
                if prm.kind in PTR_KINDS:
                    dtypes[prm.name] = a["dtype"]
                args.append(a)
            else:
                args.append({"param": prm.name, "kind": prm.kind, "value": v})
        for a in args:     # int arguments fixed by the checkpoint become compile-time constants of the shaped entries
            if fixed and a["kind"] == "int" and expr.symbols_of(a["value"]) <= fixed:
                a["macro"] = f"DTF_SHAPE_{op.op}_{a['param']}"
        for slot, fields in fam.slots.items():
            for f in fields:
                dtypes[f"{slot}.{f}" if slot else f] = getattr(plan.roles[op.roles[slot]], f)
        for f, want in fam.cuda_fixed if plan.device.kind == "cuda" else ():
            if dtypes[f] != want:
                raise plan.policy.error(op.roles[""], f, dtypes[f],
                                        f"the {key} op {op.op} runs kernel {fam.template}, whose CUDA template takes {f} "
                                        f"{want} only (the reference device takes any)")
        early = op.dependents == "early"
        name = instance_name(fam, dtypes) + ("_early" if early else "")
        plan.kernels.setdefault(name, KernelInstance(name, fam, dtypes, early))
        smem = fam.smem_bytes or ("0" if fam.smem_elems == "0" else f"({fam.smem_elems}) * 4")
        tuned = _tuned(plan.device, fam, {f"itemsize_{p}": DTYPES[d].itemsize for p, d in dtypes.items() if d in DTYPES})
        variants = tuple(replace(v, at_most=tuple((n, int(tuned(b))) for n, b in v.at_most), grid=tuned(v.grid))
                         for v in fam.variants)
        out.append(Launch(op.op, name, op.per_layer, args, tuned(fam.grid), tuned(fam.block), tuned(smem),
                          fam.grid_stride, tuned(fam.workspace), fam.limits, variants, op.final))
        plan.kernels[name].launches.append(out[-1])


def _tuned(device: Device, fam: KernelFamily, itemsizes: dict[str, int]):
    """Fills a family expression's ``{knob}`` placeholders (e.g. attention's ``{attn_threads}``) with
    the device spec's tuning values, the sizes derived from them, the family's GEMM tile and the device's
    capabilities (kernels.tuned_sizes) and the bytes per element of the instance's pointer dtypes
    (``{itemsize_<param>}``)."""
    tile = device.tuning["gemm_tiles"].get(fam.template, GEMM_TILE_DEFAULT)
    values = {**device.tuning, **tuned_sizes(tile, itemsizes, bool(device.capabilities.get("wgmma"))), **itemsizes}
    return lambda expr: str(expr).format_map(values)


def instance_name(fam: KernelFamily, dtypes: dict[str, str]) -> str:
    """``gemv_wf16_xf32_yf32_cf32_af32``: every operand's dtype in parameter order, then the role dtypes
    it computes in (c compute, a accumulate, o output; n.. of the norm prologue, r.. rope, e.. elementwise)."""
    parts = [f"{p.short}{dtypes[p.name]}" for p in fam.params if p.name in dtypes]
    parts += [f"{field_short(f)}{dtypes[f]}" for f in fam.role_fields]
    return "_".join([fam.template] + parts)


def all_targets(specs: Specs) -> list[TargetKey]:
    """Every (model, device, policy, layout) whose policy runs on the device, in a stable order."""
    out = []
    for model, m in sorted(specs.models.items()):
        for dname, dev in sorted(specs.devices.items()):
            for pname, pol in sorted(specs.policies[model].items()):
                try:
                    check_runs_on(pol, dev)
                except SpecError:
                    continue
                out += [TargetKey(model, dname, pname, layout) for layout in m.layouts]
    return out
