"""Write (or check) generated/<target>/ for a set of targets.

``check`` renders everything in memory and lists every file that differs, is missing, or
is left over from a target that no longer exists, so CI fails when generated/ is stale.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .plan import all_targets, resolve
from .render import render
from .specs import Specs

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def select_targets(specs: Specs, device: str | None, policy: str | None, layout: str | None) -> list[tuple[str, str, str]]:
    if device and device not in specs.devices:
        raise SystemExit(f"unknown device {device!r}; known: {', '.join(sorted(specs.devices))}")
    if policy and policy not in specs.policies["llama"]:
        raise SystemExit(f"unknown policy {policy!r}; known: {', '.join(sorted(specs.policies['llama']))}")
    if device and policy:
        layouts = [layout] if layout else list(specs.models["llama"].layouts)
        return [(device, policy, lay) for lay in layouts]
    return [t for t in all_targets(specs)
            if (device is None or t[0] == device) and (policy is None or t[1] == policy) and (layout is None or t[2] == layout)]


def render_targets(specs: Specs, targets) -> dict[str, dict[str, str]]:
    out = {}
    for dev, pol, lay in targets:
        plan = resolve(specs, dev, pol, lay)
        out[plan.target] = render(plan)
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write(rendered: dict[str, dict[str, str]], out_dir: Path, prune: bool) -> list[Path]:
    """Write changed files; with ``prune`` (a full build) remove targets no longer produced."""
    changed = []
    for target, files in rendered.items():
        for name, text in files.items():
            p = out_dir / target / name
            if not p.exists() or p.read_text(encoding="utf-8") != text:
                _write_atomic(p, text)
                changed.append(p)
    if prune and out_dir.exists():
        for d in sorted(out_dir.iterdir()):
            if d.is_dir() and d.name not in rendered:
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
                changed.append(d)
    return changed


def stale(rendered: dict[str, dict[str, str]], out_dir: Path, full: bool) -> list[str]:
    problems = []
    for target, files in rendered.items():
        for name, text in files.items():
            p = out_dir / target / name
            if not p.exists():
                problems.append(f"missing: {p}")
            elif p.read_text(encoding="utf-8") != text:
                problems.append(f"stale:   {p}")
        d = out_dir / target
        if d.exists():
            problems += [f"extra:   {f}" for f in sorted(d.iterdir()) if f.name not in files]
    if full and out_dir.exists():
        problems += [f"extra:   {d}" for d in sorted(out_dir.iterdir()) if d.is_dir() and d.name not in rendered]
    return problems


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
