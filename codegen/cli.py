"""`codegen`: build, check, list, explain and compile targets (and run models, see runtime/).

Every command takes ``--specs DIR`` so users can keep their own spec folder. Spec errors are
printed as one line naming file:line, key, what was found and what is allowed, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build as B
from .plan import Plan, all_targets, resolve
from .specs import DEFAULT_SPECS, load_specs
from .yamlsrc import SpecError


def _specs(args):
    return load_specs(Path(args.specs))


def _policy(specs, args) -> str:
    dev = specs.devices.get(args.device)
    if dev is None:
        raise SystemExit(f"unknown device {args.device!r}; known: {', '.join(sorted(specs.devices))}")
    return args.policy or dev.default_policy


def cmd_build(args) -> int:
    specs = _specs(args)
    targets = B.select_targets(specs, args.device, args.policy, args.layout)
    full = not (args.device or args.policy or args.layout)
    out = Path(args.out)
    rendered = B.render_targets(specs, targets)
    if args.check:
        problems = B.stale(rendered, out, full)
        if problems:
            print("generated/ is stale; run `codegen build`:", file=sys.stderr)
            for p in problems:
                print("  " + p, file=sys.stderr)
            return 1
        print(f"generated/ is up to date ({len(rendered)} targets)")
        return 0
    changed = B.write(rendered, out, prune=full)
    print(f"built {len(rendered)} targets into {out} ({len(changed)} files changed)")
    return 0


def cmd_list(args) -> int:
    specs = _specs(args)
    print("devices:")
    for d in sorted(specs.devices.values(), key=lambda d: d.name):
        print(f"  {d.name:10s} {d.kind:4s} {d.arch or '-':7s} default policy: {d.default_policy}")
    print("policies:")
    for p in sorted(specs.policies["llama"].values(), key=lambda p: p.name):
        base = f" (extends {p.extends})" if p.extends else ""
        print(f"  {p.name:24s} {p.description}{base}")
    print("layouts:")
    for name, doc in specs.models["llama"].layouts.items():
        print(f"  {name:10s} {doc}")
    print("targets (device.policy.layout):")
    for t in all_targets(specs):
        print("  " + ".".join(t))
    return 0


def _explain_rows(plan: Plan) -> list[tuple[str, ...]]:
    rows = []
    for role, rd in plan.roles.items():
        q = f"{rd.quant}/{rd.scale}" if rd.quant else "-"
        rows.append((role, rd.storage, rd.compute or "-", rd.accumulate or "-", rd.output or "-", q))
    return rows


def cmd_explain(args) -> int:
    specs = _specs(args)
    policy = _policy(specs, args)
    plan = resolve(specs, args.device, policy, args.layout)
    head = ("role", "storage", "compute", "accumulate", "output", "quant/scale")
    rows = _explain_rows(plan)
    dev = plan.device
    print(f"device {dev.name} ({dev.arch or dev.kind}), policy {policy}: {plan.policy.description}")
    if args.diff:
        other = resolve(specs, args.device, args.diff, args.layout)
        orows = {r[0]: r for r in _explain_rows(other)}
        print(f"differences from policy {args.diff} ({policy} <- {args.diff}):")
        changed = 0
        for r in rows:
            o = orows[r[0]]
            cells = [r[0]] + [a if a == b else f"{a} <- {b}" for a, b in zip(r[1:], o[1:])]
            if r != o:
                changed += 1
                _table([head, tuple(cells)] if changed == 1 else [tuple(cells)], widths=_widths([head] + rows, extra=10))
        if not changed:
            print("  (none: the two policies resolve to the same dtypes)")
        return 0
    _table([head] + rows)
    print(f"\nkernels ({len(plan.kernels)}): " + ", ".join(sorted(plan.kernels)))
    return 0


def _widths(rows, extra=0):
    return [max(len(r[i]) for r in rows) + extra for i in range(len(rows[0]))]


def _table(rows, widths=None):
    widths = widths or _widths(rows)
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_compile(args) -> int:
    from .compile import ToolchainError, compile_cubin
    specs = _specs(args)
    policy = _policy(specs, args)
    dev = specs.devices[args.device]
    if dev.kind != "cuda":
        raise SystemExit(f"device {dev.name} is a {dev.kind} device: it has no kernels to compile")
    plan = resolve(specs, args.device, policy, args.layout)
    src = Path(args.out) / plan.target / "kernels.cu"
    rendered = B.render_targets(specs, [(args.device, policy, args.layout)])
    if not src.exists() or src.read_text() != rendered[plan.target]["kernels.cu"]:
        raise SystemExit(f"{src} is missing or stale; run `codegen build` first")
    cubin = Path(args.cubin) if args.cubin else Path(".cache/cubin") / f"{plan.target}.{dev.arch}.cubin"
    B.progress(f"compiling {src} for {dev.arch} ...")
    try:
        compile_cubin(src, dev.arch, cubin)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{cubin} ({cubin.stat().st_size} bytes, {dev.arch})")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="codegen", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--specs", default=str(DEFAULT_SPECS), help="spec folder (models/, policies/, devices/)")
        p.set_defaults(fn=fn)
        return p

    p = add("build", cmd_build, "render generated/<target>/ for all targets or a selection")
    p.add_argument("--device"), p.add_argument("--policy"), p.add_argument("--layout")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 listing stale files")
    p.add_argument("--out", default=str(B.GENERATED))
    add("list", cmd_list, "list devices, policies, layouts and targets")
    p = add("explain", cmd_explain, "table of every role's storage/compute/accumulate/output dtype")
    p.add_argument("--device", required=True), p.add_argument("--policy"), p.add_argument("--layout", default="separate")
    p.add_argument("--diff", metavar="OTHER_POLICY", help="show what changes relative to another policy")
    p = add("compile", cmd_compile, "compile a target's kernels.cu to a cubin for its arch")
    p.add_argument("--device", required=True), p.add_argument("--policy"), p.add_argument("--layout", default="separate")
    p.add_argument("--out", default=str(B.GENERATED), help="generated/ folder")
    p.add_argument("--cubin", help="output path (default .cache/cubin/<target>.<arch>.cubin)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"spec error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
