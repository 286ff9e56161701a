"""Find a generated target and turn a checkpoint's config.json into its symbol values.

A target directory (``generated/<model>.<device>.<policy>.<layout>/``) is everything the runtime
knows about dtypes: ``manifest.json`` (config symbols, buffers, kernels, decode step) and
``packing.json`` (what the loader packs). Both keep shapes as expressions over config
symbols so one target serves every model size; ``model_env`` supplies the values for one
checkpoint, evaluating each symbol the way the model spec declares it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dtypeforge.codegen import contract, expr
from dtypeforge.codegen.contract import ConfigKey, Manifest, Packing

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def cache_root() -> Path:
    """Where compiled cubins and targets rendered from a user's specs are kept, keyed by content
    (the DTYPEFORGE_CACHE environment variable moves it)."""
    return Path(os.environ.get("DTYPEFORGE_CACHE", Path.home() / ".cache" / "dtypeforge"))

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,)}   # JSON types accepted per symbol type


class LoadError(ValueError):
    """A target, checkpoint or config cannot be used; the message says which file and why."""


class TargetNotFound(LoadError):
    pass


class ConfigError(LoadError):
    """config.json lacks a key, has the wrong type, or describes a model the target cannot run."""


@dataclass(frozen=True)
class Target:
    """A generated target folder, its two files read as the contract's records."""
    path: Path
    manifest: Manifest
    packing: Packing

    @property
    def name(self) -> str:
        return self.manifest.target


def find_target(device: str, policy: str, layout: str = "separate", generated: Path = GENERATED,
                model: str | None = None) -> Path:
    """The directory of one generated target (``<model>.<device>.<policy>.<layout>``; without ``model``, the
    one such target of any model spec); a missing one lists what ``device`` does have, since a typo in
    the policy or layout is the usual cause."""
    generated = Path(generated)
    pattern = f"{model or '*'}.{device}.{policy}.{layout}"
    hits = sorted(p for p in generated.glob(pattern) if (p / "manifest.json").is_file())
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise TargetNotFound(f"{len(hits)} targets match {pattern} in {generated} ({', '.join(p.name for p in hits)}); "
                             "name the model spec")
    have = sorted(p.name for p in generated.glob(f"*.{device}.*.*") if (p / "manifest.json").is_file())
    if have:
        hint = f"targets for device {device!r}: {', '.join(have)}"
    else:
        devices = sorted({p.name.split(".")[1] for p in generated.glob("*.*.*.*") if (p / "manifest.json").is_file()})
        hint = f"no targets for device {device!r}; devices with targets: {', '.join(devices) or 'none'}"
    raise TargetNotFound(f"no generated target {pattern} in {generated}; {hint} (run `codegen build` to regenerate)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TargetNotFound(f"{path} is missing; run `codegen build`") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON ({e}); run `codegen build`") from None


def load_target(path: Path | str) -> Target:
    """Read a target's manifest and packing table. They must come from the same codegen run
    (same target and inputs hash): the loader packs from one and the kernels are launched
    from the other, so a stale half would silently disagree on dtypes."""
    path = Path(path)
    try:
        manifest = contract.load_manifest(_read_json(path / "manifest.json"), str(path / "manifest.json"))
        packing = contract.load_packing(_read_json(path / "packing.json"), str(path / "packing.json"))
    except contract.ContractError as e:
        raise LoadError(str(e)) from None
    for key, ours, theirs in (("target", manifest.target, packing.target), ("inputs", manifest.inputs, packing.inputs)):
        if ours != theirs:
            raise LoadError(f"{path}: manifest.json has {key} {ours!r} but packing.json has "
                            f"{theirs!r}; regenerate both with `codegen build`")
    return Target(path, manifest, packing)


def lookup(config: Mapping, key: str):
    """config.json's value at ``key``, a dotted path into nested mappings (rope_parameters.rope_theta);
    None when any step is absent or null, as transformers treats a null key."""
    value = config
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def materialize(name: str, files: Mapping[str, str], root: Path | None = None) -> Path:
    """A rendered target's files in a folder of the cache named by their content, written once (all
    files appear together: a folder is renamed into place) and shared by every later run. The folder
    a run reads is therefore exactly what its specs render to: never a stale generated/ target."""
    digest = hashlib.sha256(b"".join(f"{n}\0{t}\0".encode() for n, t in sorted(files.items()))).hexdigest()[:16]
    root = Path(root) if root is not None else cache_root() / "targets"
    out = root / f"{name}.{digest}"
    if all((out / n).is_file() for n in files):
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for n, text in files.items():
            (tmp / n).write_text(text, encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:            # another process put the same content there first
            if not all((out / n).is_file() for n in files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_value(sym: str, key: str, spec: ConfigKey, value, where: str):
    """``value`` typed as the symbol declares (ints stay int, floats become float)."""
    if isinstance(value, bool) and spec.type != "bool" or not isinstance(value, _TYPES[spec.type]):
        raise ConfigError(f"{where}: {key} (symbol {sym}) must be {spec.type}, found {value!r}")
    if spec.type == "int" and value <= 0:
        raise ConfigError(f"{where}: {key} (symbol {sym}) must be a positive int, found {value!r}")
    if spec.type == "float" and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} (symbol {sym}) must be a finite number, found {value!r}")
    return float(value) if spec.type == "float" else value


def model_env(manifest: Manifest, hf_config: Mapping, config_path: Path | str, *,
              max_seq: int | None = None) -> dict[str, int | float | bool]:
    """Every config symbol of ``manifest`` evaluated for the checkpoint whose config.json
    (at ``config_path``, named in errors) parsed to ``hf_config``.

    A key set to null counts as absent, as in transformers (e.g. ``"head_dim": null`` means
    "derive it"). Absent keys take the spec's default, a literal or an expression over other
    int symbols, evaluated once those are known. ``max_seq`` lets the runtime cap the KV
    cache below max_position_embeddings (a 128k-position model rarely needs a 128k cache).
    """
    where = str(config_path)
    specs = manifest.config
    env: dict[str, int | float | bool] = {}
    pending: dict[str, str] = {}
    for sym, spec in specs.items():
        key = next((k for k in spec.hf if lookup(hf_config, k) is not None), None)
        if key is not None:
            env[sym] = _check_value(sym, key, spec, lookup(hf_config, key), where)
        elif isinstance(spec.default, str):
            pending[sym] = spec.default
        elif spec.default is not None:
            env[sym] = spec.default
        else:
            raise ConfigError(f"{where}: missing key {' or '.join(spec.hf)} (symbol {sym}, {spec.type}), which has no default")
    while pending:
        ready = [s for s, e in pending.items() if expr.symbols_of(e) <= env.keys()]
        if not ready:
            raise ConfigError(f"{where}: cannot derive {', '.join(sorted(pending))}: their defaults "
                              f"({'; '.join(f'{s} = {e}' for s, e in pending.items())}) depend on each other")
        for sym in ready:
            value = expr.evaluate(pending.pop(sym), env)
            if value <= 0:
                raise ConfigError(f"{where}: {specs[sym].hf[0]} is absent and its default {specs[sym].default} "
                                  f"gives {value}; symbol {sym} must be a positive int")
            env[sym] = value
    if max_seq is not None:
        if "max_seq" not in env:
            raise ConfigError("a max_seq cap was given but this target's config has no max_seq symbol")
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq <= 0:
            raise ConfigError(f"max_seq cap must be a positive int, found {max_seq!r}")
        env["max_seq"] = min(max_seq, env["max_seq"])
    # the rows the prefill buffers hold: the device's prefill chunk, no more than the context
    env["chunk"] = min(manifest.prefill_chunk, env.get("max_seq", manifest.prefill_chunk))
    return env
