"""Pack a Hugging Face Llama checkpoint into the buffers one generated target's kernels read.

``packing.json`` says, per packed weight, which checkpoint tensors feed it, how (row
concatenation for fused q/k/v and gate/up, a cast or a per-output-channel quantization)
and the dtype and shape the kernels were generated for. This module applies that table
and nothing else: dtypes come only from the table, conversions only from
``codegen.dtypes`` (the same rounding the reference decoder uses).

Everything that can be checked without converting data (config, tensor presence, shapes,
source dtypes, the table's own transforms) is checked for every weight before the first
conversion, so a bad checkpoint fails in seconds, and a failure never leaves a half-packed
model behind: ``pack_weights`` either returns every buffer or raises a ``LoadError``.
"""
from __future__ import annotations

import difflib
import json
import struct
import sys
from collections.abc import Callable
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from dtypeforge.codegen.contract import Manifest, PackedWeight, Transform
from dtypeforge.codegen.dtypes import (DTYPES, from_storage, max_finite, overflow_threshold, quantize_per_output_channel,
                                       to_storage)
from dtypeforge.codegen.expr import evaluate

from .rope import inv_freq, scaling as rope_scaling
from .target import ConfigError, LoadError, Target, model_env

# safetensors dtype -> the storage dtype whose exact decoder turns it into float32
# (None: already float32). Wider or integer sources would need a rounding decision.
SOURCE_DTYPES = {"F32": None, "F16": "f16", "BF16": "bf16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class MissingFileError(LoadError):
    pass


class CorruptCheckpointError(LoadError):
    pass


class MissingTensorError(LoadError):
    pass


class ShapeMismatchError(LoadError):
    pass


class SourceDTypeError(LoadError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str                  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    data_offset: int            # absolute byte offset of the data in ``file``


@dataclass
class Checkpoint:
    """An HF model directory: its parsed config.json and where each tensor lives.
    Tensors are read one at a time, on demand (``read``)."""
    dir: Path
    config: dict
    config_path: Path
    tensors: dict[str, TensorInfo]
    computed: dict[str, np.ndarray] = field(default_factory=dict)   # tables made from config.json (RoPE's)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, converted exactly from F16/BF16.

        safetensors' numpy framework can only build BF16 arrays when ml_dtypes happens to
        have registered the name "bfloat16" with numpy, so BF16 data is read as raw uint16
        at the header's offset and decoded with the shared bf16 table instead."""
        if name in self.computed:
            return self.computed[name]
        info = self.tensors[name]
        source = SOURCE_DTYPES[info.dtype]
        if info.dtype == "BF16":
            count = int(np.prod(info.shape))
            bits = np.fromfile(info.file, dtype="<u2", count=count, offset=info.data_offset)
            return from_storage(bits.view(DTYPES["bf16"].np_dtype).reshape(info.shape), "bf16")
        with safe_open(info.file, framework="numpy") as f:
            arr = f.get_tensor(name)
        return arr if source is None else from_storage(arr, source)


def read_config(model_dir: Path) -> tuple[dict, Path]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{model_dir} has no config.json; expected a Hugging Face model directory "
                               f"(config.json + {SINGLE_FILE} or {INDEX_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config, path


def check_config(manifest: Manifest, config: dict, config_path: Path, env: dict) -> None:
    """Every config.json key that changes the math is one the model spec computes, or the run is
    refused by name: the architecture, the gate's keys (biases, activation, sliding window) and the
    RoPE scaling (runtime/rope.py reads it)."""
    archs, known = config.get("architectures"), manifest.architectures
    if not (isinstance(archs, list) and archs and all(a in known for a in archs)):
        raise ConfigError(f"{config_path}: architectures is {archs!r}; the {manifest.model} spec computes "
                          f"{', '.join(known)}")
    for key, rule in manifest.gate.items():
        value = config.get(key)
        if any(value == v and type(value) is type(v) for v in rule.values):   # 0 is not false
            continue
        floor = rule.or_at_least
        if floor and isinstance(value, int) and not isinstance(value, bool) and value >= env[floor]:
            continue
        allowed = " or ".join("absent" if v is None else json.dumps(v) for v in rule.values)
        if floor:
            allowed += f", or at least {floor} ({env[floor]} for this run)"
        raise ConfigError(f"{config_path}: {key} is {json.dumps(value)}; the {manifest.model} spec computes {allowed}")
    rope_scaling(manifest.rope, config, str(config_path))


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The safetensors files of the checkpoint, and the index's weight map if sharded."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index_path}: not a safetensors index with a weight_map ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise CorruptCheckpointError(f"{index_path}: weight_map must map tensor names to shard file names, "
                                         f"found {json.dumps(weight_map)[:80]}")
        bad = next((f for f in weight_map.values() if Path(f).name != f), None)
        if bad is not None:
            raise CorruptCheckpointError(f"{index_path}: weight_map names shard {bad!r}; shards are files in {model_dir}")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                needs = sorted(t for t, f in weight_map.items() if f == name)
                raise MissingFileError(f"{index_path} maps {len(needs)} tensors (e.g. {needs[0]}) to shard {name}, "
                                       f"which is not in {model_dir}")
        return [model_dir / f for f in files], weight_map, index_path
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None, None
    raise MissingFileError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor metadata of one safetensors file. safetensors itself validates the file first
    (header well-formed, data offsets contiguous and covering the file exactly, so a
    truncated download is caught here); only then is the header parsed for offsets."""
    try:
        with safe_open(path, framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpointError(f"{path} ({path.stat().st_size} bytes) is not a valid safetensors file: {e} "
                                     "(truncated or corrupt; download it again)") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: TensorInfo(path, h["dtype"], tuple(h["shape"]), 8 + n + h["data_offsets"][0])
            for name, h in header.items()}


def load_checkpoint(model_dir: Path | str) -> Checkpoint:
    """Open an HF Llama directory: config.json plus model.safetensors, or the shards that
    model.safetensors.index.json names. Reads headers only; tensor data stays on disk."""
    model_dir = Path(model_dir)
    config, config_path = read_config(model_dir)
    files, weight_map, index_path = _shard_files(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in _read_header(path).items():
            if name in tensors:
                raise CorruptCheckpointError(f"tensor {name} is in both {tensors[name].file.name} and {path.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file.name != file:
                found = f"it is in {tensors[name].file.name}" if name in tensors else "no shard has it"
                raise CorruptCheckpointError(f"{index_path} maps {name} to {file}, but {found}")
    return Checkpoint(model_dir, config, config_path, tensors)


def check_llama_config(env: dict, config: dict, config_path: Path) -> None:
    """What the Llama decoder assumes of a config beyond each symbol being a positive int:
    grouped-query attention needs whole groups, RoPE an even head_dim, and a derived head_dim an exact split."""
    if env["n_heads"] % env["n_kv_heads"]:
        raise ConfigError(f"{config_path}: num_attention_heads ({env['n_heads']}) is not a multiple of "
                          f"num_key_value_heads ({env['n_kv_heads']}); grouped-query attention needs whole groups")
    if env["head_dim"] % 2:
        raise ConfigError(f"{config_path}: head_dim is {env['head_dim']}; RoPE rotates pairs of dims, so it must be even")
    if config.get("head_dim") is None and env["hidden"] % env["n_heads"]:
        raise ConfigError(f"{config_path}: hidden_size ({env['hidden']}) is not divisible by num_attention_heads "
                          f"({env['n_heads']}) and no head_dim is given, so head_dim = hidden // n_heads "
                          f"({env['head_dim']}) would not cover hidden_size")


@dataclass
class PackedModel:
    env: dict[str, int | float | bool]
    arrays: dict[str, np.ndarray]      # concrete packed names (layers.0.wq, layers.0.wq.scale, ...) -> host array


@dataclass(frozen=True)
class _Job:
    """One concrete packed weight: entry with {i} filled in and tied sources resolved."""
    entry: PackedWeight
    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    scale_name: str | None
    scale_shape: tuple[int, ...] | None


def _in_layer(i: int | None, name: str) -> str:
    return name if i is None else name.replace("{i}", str(i))


def _shape(exprs: tuple[str, ...], env: dict) -> tuple[int, ...]:
    return tuple(evaluate(e, env) for e in exprs)


def _check_transforms(entry: PackedWeight) -> None:
    """The table's transform list must be one this loader implements: an optional
    concat_rows of all sources, then exactly one cast or per_output_channel quantize to the
    entry's dtype. Anything else (a newer codegen) must fail rather than be half-applied."""
    concat = (Transform(op="concat_rows", parts=len(entry.sources)),) if len(entry.sources) > 1 else ()
    allowed = [concat + (Transform(op="cast", dtype=entry.dtype),)]
    if entry.scale:
        allowed.append(concat + (Transform(op="quantize", scheme="per_output_channel", dtype=entry.dtype,
                                           scale_dtype=entry.scale.dtype),))
    if entry.transforms not in allowed:
        raise LoadError(f"packing.json entry {entry.name}: transforms {_spell(entry.transforms)} are not supported by "
                        f"this loader (expected {' or '.join(map(_spell, allowed))})")


def _spell(transforms: tuple[Transform, ...]) -> str:
    """Transforms as packing.json writes them: each one's fields that are set."""
    return str([{f.name: getattr(t, f.name) for f in fields(t) if getattr(t, f.name) is not None} for t in transforms])


def _plan(target: Target, ckpt: Checkpoint, env: dict) -> list[_Job]:
    """Expand per-layer entries, resolve ties, and check every source tensor's presence,
    dtype and shape, and that the sources make up the declared packed shape, before
    anything is converted."""
    jobs = []
    for entry in target.packing.weights:
        _check_transforms(entry)
        tied, scale = entry.tied_to, entry.scale
        for i in range(env["n_layers"]) if entry.per_layer else [None]:
            name = _in_layer(i, entry.name)
            sources = [_in_layer(i, s.name) for s in entry.sources]
            why = f"packed weight {name}"
            if tied and env[tied.when]:
                sources = [_in_layer(i, tied.source)]
                why += f" (tied to {sources[0]} because {tied.when} is true)"
            elif tied:
                why += f" ({tied.when} is false, so it is not tied to {tied.source})"
            shapes = [_check_source(ckpt, src, spec.shape, env, why) for src, spec in zip(sources, entry.sources)]
            job = _Job(entry, name, tuple(sources), _shape(entry.shape, env),
                       _in_layer(i, scale.name) if scale else None,
                       _shape(scale.shape, env) if scale else None)
            packs_to = (sum(s[0] for s in shapes),) + shapes[0][1:]
            if job.shape != packs_to or job.scale_shape not in (None, packs_to[:1]):
                raise LoadError(f"packing.json entry {entry.name}: sources {sources} pack to {list(packs_to)}, but the "
                                f"entry declares shape {list(job.shape)}"
                                + (f" and scale shape {list(job.scale_shape)}" if job.scale_shape else "")
                                + "; regenerate the target with `codegen build`")
            jobs.append(job)
    return jobs


def _check_source(ckpt: Checkpoint, name: str, shape_exprs: tuple[str, ...], env: dict, why: str) -> tuple[int, ...]:
    if name in ckpt.computed:
        want = _shape(shape_exprs, env)
        if ckpt.computed[name].shape != want:
            raise LoadError(f"{why}: {name}, computed from {ckpt.config_path}, has shape {list(ckpt.computed[name].shape)}, "
                            f"not {list(want)}")
        return want
    info = ckpt.tensors.get(name)
    if info is None:
        close = difflib.get_close_matches(name, ckpt.tensors, n=1, cutoff=0.5)
        hint = f"; closest present: {close[0]}" if close else ""
        raise MissingTensorError(f"checkpoint {ckpt.dir} has no tensor {name}, needed by {why}{hint}")
    if info.dtype not in SOURCE_DTYPES:
        raise SourceDTypeError(f"tensor {name} in {info.file.name} has dtype {info.dtype}; "
                               f"allowed source dtypes: {', '.join(SOURCE_DTYPES)}")
    want = _shape(shape_exprs, env)
    if info.shape != want:
        spelled = ", ".join(f"{e} = {v}" if e != str(v) else e for e, v in zip(shape_exprs, want))
        raise ShapeMismatchError(f"tensor {name} in {info.file.name} has shape {list(info.shape)}; {why} expects "
                                 f"{list(want)} ([{spelled}] with the config.json values)")
    return want


def _computed(target: Target, ckpt: Checkpoint, env: dict) -> dict[str, np.ndarray]:
    """The tensors the packing table marks as computed from config.json, by the section that makes them."""
    out = {}
    for entry in target.packing.weights:
        for src in entry.sources:
            if src.computed == "rope":
                (n_pairs,) = _shape(src.shape, env)
                out[src.name] = inv_freq(target.manifest.rope, ckpt.config, env, n_pairs, str(ckpt.config_path))
            elif src.computed is not None:
                raise LoadError(f"packing.json source {src.name}: computed by {src.computed!r}, which this loader "
                                "does not know; regenerate the target with `codegen build`")
    return out


def _layer_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"(\d+)") + "$")


def _check_consumed(target: Target, ckpt: Checkpoint, env: dict, jobs: list[_Job]) -> None:
    """Every checkpoint tensor is packed, replaced by a tie, or one the spec ignores: a tensor nothing
    reads is math the spec does not have (a bias, an extra norm) or layers beyond num_hidden_layers."""
    used = {s for job in jobs for s in job.sources}
    for entry in target.packing.weights:          # a tied tensor's own copy may be present, unread
        if entry.tied_to and env[entry.tied_to.when]:
            used |= {s.name for s in entry.sources}
    ignored = [_layer_pattern(t) for t in target.packing.ignored_tensors]
    extra = sorted(t for t in ckpt.tensors if t not in used and not any(p.match(t) for p in ignored))
    if not extra:
        return
    per_layer = [_layer_pattern(s.name) for e in target.packing.weights if e.per_layer for s in e.sources]
    beyond = [t for t in extra for p in per_layer if (m := p.match(t)) and int(m.group(1)) >= env["n_layers"]]
    n_layers_key = target.manifest.config["n_layers"].hf[0]
    if beyond:
        layers = 1 + max(int(m.group(1)) for t in beyond for p in per_layer if (m := p.match(t)))
        raise LoadError(f"{ckpt.config_path}: {n_layers_key} is {env['n_layers']}, but the checkpoint in {ckpt.dir} has "
                        f"tensors of {layers} layers (e.g. {beyond[0]}); they must agree")
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    raise LoadError(f"checkpoint {ckpt.dir} has tensor {extra[0]}{more}, which the {target.manifest.model} spec does "
                    f"not use: math it does not compute (a bias, another norm), so it cannot run this model")


class NonFiniteWeightError(LoadError):
    """A checkpoint tensor holds NaN or inf."""


class WeightOverflowError(LoadError):
    """A checkpoint tensor holds values that the target's storage dtype turns into inf."""


# (role, max |value|) -> names of the policies whose storage for that role holds it
Holds = Callable[[str, float], list[str]]


def _index(shape: tuple[int, ...], flat: int) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _check_values(ckpt: Checkpoint, name: str, a: np.ndarray, job: _Job, holds: Holds | None) -> None:
    """Refuse NaN / inf in source tensor ``name`` (values ``a``), and finite values that the
    entry's storage dtype turns into inf. Quantized entries are range-free: their per-row scale
    absorbs the magnitude (quantize_per_output_channel refuses a scale that overflows).

    A max and a min find both with no temporary array (NaN propagates through either, an inf is
    one of them); only a tensor that fails is searched for its first bad element."""
    where = (f"computed from {ckpt.config_path.name}" if name in ckpt.computed
             else f"in {ckpt.tensors[name].file.name}")
    hi, lo = (float(a.max()), float(a.min())) if a.size else (0.0, 0.0)
    if not (np.isfinite(hi) and np.isfinite(lo)):
        flat = int(np.argmax(~np.isfinite(a.reshape(-1))))
        v = float(a.reshape(-1)[flat])
        what = "NaN" if np.isnan(v) else ("+inf" if v > 0 else "-inf")
        raise NonFiniteWeightError(f"tensor {name} {where} has {what} at {_index(a.shape, flat)} (flat index {flat}); "
                                   "weights must be finite")
    entry = job.entry
    if entry.scale:
        return
    storage, amax = entry.dtype, max(hi, -lo)
    limit = overflow_threshold(storage)
    if amax < limit:
        return
    flat = int(np.argmax(np.abs(a.reshape(-1)) >= limit))
    role = entry.role
    if holds is None:
        fix = f"a policy that stores role {role} in a wider dtype holds it (`codegen explain` shows each policy)"
    else:
        fix = f"policies that hold it: {', '.join(holds(role, amax)) or 'none for this device'}"
    raise WeightOverflowError(
        f"tensor {name} {where} has max |value| {amax:.9g}, which overflows {storage} (max {max_finite(storage):.9g}), "
        f"the storage of packed weight {job.name} (role {role}); the first value that does is "
        f"{float(a.reshape(-1)[flat]):.9g} at {_index(a.shape, flat)} (flat index {flat}); {fix}")


def _pack(ckpt: Checkpoint, job: _Job, holds: Holds | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [ckpt.read(s) for s in job.sources]
    for name, part in zip(job.sources, parts):
        _check_values(ckpt, name, part, job, holds)
    w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    entry = job.entry
    if not entry.scale:
        return to_storage(w, entry.dtype), None
    try:
        q, scales = quantize_per_output_channel(w, entry.dtype, entry.scale.dtype)
    except ValueError as e:
        raise LoadError(f"packed weight {job.name} (from {', '.join(job.sources)}): {e}") from None
    return q, to_storage(scales, entry.scale.dtype)


def pack_weights(target: Target, model_dir: Path | str, *, max_seq: int | None = None,
                 progress: bool = True, holds: Holds | None = None, checkpoint: Checkpoint | None = None) -> PackedModel:
    """Every buffer of ``target``'s packing table, packed from the checkpoint in ``model_dir``
    (``checkpoint``: that directory already opened by ``load_checkpoint``, whose headers are not read twice).

    Arrays are read-only: packed weights that are identical by construction (same sources,
    same transforms, e.g. a tied lm_head stored like the embedding) are one shared array,
    so writing through one name must not change another."""
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(model_dir)
    env = model_env(target.manifest, ckpt.config, ckpt.config_path, max_seq=max_seq)
    check_llama_config(env, ckpt.config, ckpt.config_path)
    check_config(target.manifest, ckpt.config, ckpt.config_path, env)
    ckpt.computed.update(_computed(target, ckpt, env))
    jobs = _plan(target, ckpt, env)
    _check_consumed(target, ckpt, env, jobs)
    arrays: dict[str, np.ndarray] = {}
    done: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
    for job in tqdm(jobs, desc=f"packing {target.name}", unit="tensor", disable=not progress, file=sys.stderr):
        key = (job.sources, job.entry.transforms, job.shape)
        if key not in done:
            w, scale = _pack(ckpt, job, holds)
            for a in (w, scale):
                if a is not None:
                    a.flags.writeable = False
            done[key] = w, scale
        arrays[job.name], scale = done[key]
        if scale is not None:
            arrays[job.scale_name] = scale
    return PackedModel(env, arrays)
