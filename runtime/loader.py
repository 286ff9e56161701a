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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from codegen.dtypes import DTYPES, from_storage, quantize_per_output_channel, to_storage
from codegen.expr import evaluate

from .target import ConfigError, LoadError, Target, model_env

# safetensors dtype -> the storage dtype whose exact decoder turns it into float32
# (None: already float32). Wider or integer sources would need a rounding decision.
SOURCE_DTYPES = {"F32": None, "F16": "f16", "BF16": "bf16"}
ARCHITECTURES = ("LlamaForCausalLM",)
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

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, converted exactly from F16/BF16.

        safetensors' numpy framework can only build BF16 arrays when ml_dtypes happens to
        have registered the name "bfloat16" with numpy, so BF16 data is read as raw uint16
        at the header's offset and decoded with the shared bf16 table instead."""
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
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and all(a in ARCHITECTURES for a in archs)):
        raise ConfigError(f"{path}: architectures is {archs!r}; this runtime runs the Llama spec, "
                          f"which supports {', '.join(ARCHITECTURES)}")
    return config, path


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The safetensors files of the checkpoint, and the index's weight map if sharded."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index_path}: not a safetensors index with a weight_map ({e!r})") from None
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
    entry: dict
    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    scale_name: str | None
    scale_shape: tuple[int, ...] | None


def _in_layer(i: int | None, name: str) -> str:
    return name if i is None else name.replace("{i}", str(i))


def _shape(exprs: list[str], env: dict) -> tuple[int, ...]:
    return tuple(evaluate(e, env) for e in exprs)


def _check_transforms(entry: dict) -> None:
    """The table's transform list must be one this loader implements: an optional
    concat_rows of all sources, then exactly one cast or per_output_channel quantize to the
    entry's dtype. Anything else (a newer codegen) must fail rather than be half-applied."""
    ts = entry["transforms"]
    n = len(entry["sources"])
    concat = [{"op": "concat_rows", "parts": n}] if n > 1 else []
    last = ts[-1] if ts else {}
    ok = ts[:-1] == concat and (
        last == {"op": "cast", "dtype": entry["dtype"]}
        or (last.get("op") == "quantize" and last.get("scheme") == "per_output_channel"
            and last.get("dtype") == entry["dtype"] and "scale" in entry
            and last.get("scale_dtype") == entry["scale"]["dtype"]))
    if not ok:
        raise LoadError(f"packing.json entry {entry['name']}: transforms {ts} are not supported by this loader "
                        f"(expected {concat + [{'op': 'cast or quantize', 'dtype': entry['dtype']}]})")


def _plan(target: Target, ckpt: Checkpoint, env: dict) -> list[_Job]:
    """Expand per-layer entries, resolve ties, and check every source tensor's presence,
    dtype and shape, and that the sources make up the declared packed shape, before
    anything is converted."""
    jobs = []
    for entry in target.packing["weights"]:
        _check_transforms(entry)
        tied = entry.get("tied_to")
        for i in range(env["n_layers"]) if entry["per_layer"] else [None]:
            name = _in_layer(i, entry["name"])
            sources = [_in_layer(i, s["name"]) for s in entry["sources"]]
            why = f"packed weight {name}"
            if tied and env[tied["when"]]:
                sources = [_in_layer(i, tied["source"])]
                why += f" (tied to {sources[0]} because {tied['when']} is true)"
            elif tied:
                why += f" ({tied['when']} is false, so it is not tied to {tied['source']})"
            shapes = [_check_source(ckpt, src, spec["shape"], env, why) for src, spec in zip(sources, entry["sources"])]
            job = _Job(entry, name, tuple(sources), _shape(entry["shape"], env),
                       _in_layer(i, entry["scale"]["name"]) if "scale" in entry else None,
                       _shape(entry["scale"]["shape"], env) if "scale" in entry else None)
            packs_to = (sum(s[0] for s in shapes),) + shapes[0][1:]
            if job.shape != packs_to or job.scale_shape not in (None, packs_to[:1]):
                raise LoadError(f"packing.json entry {entry['name']}: sources {sources} pack to {list(packs_to)}, but the "
                                f"entry declares shape {list(job.shape)}"
                                + (f" and scale shape {list(job.scale_shape)}" if job.scale_shape else "")
                                + "; regenerate the target with `codegen build`")
            jobs.append(job)
    return jobs


def _check_source(ckpt: Checkpoint, name: str, shape_exprs: list[str], env: dict, why: str) -> tuple[int, ...]:
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


def _pack(ckpt: Checkpoint, job: _Job) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [ckpt.read(s) for s in job.sources]
    w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    entry = job.entry
    if "scale" not in entry:
        return to_storage(w, entry["dtype"]), None
    try:
        q, scales = quantize_per_output_channel(w, entry["dtype"], entry["scale"]["dtype"])
    except ValueError as e:
        raise LoadError(f"packed weight {job.name} (from {', '.join(job.sources)}): {e}") from None
    return q, to_storage(scales, entry["scale"]["dtype"])


def pack_weights(target: Target, model_dir: Path | str, *, max_seq: int | None = None,
                 progress: bool = True) -> PackedModel:
    """Every buffer of ``target``'s packing table, packed from the checkpoint in ``model_dir``.

    Arrays are read-only: packed weights that are identical by construction (same sources,
    same transforms, e.g. a tied lm_head stored like the embedding) are one shared array,
    so writing through one name must not change another."""
    if target.manifest["model"] != "llama":
        raise LoadError(f"target {target.name} is for model {target.manifest['model']!r}; this loader packs llama")
    ckpt = load_checkpoint(model_dir)
    env = model_env(target.manifest, ckpt.config, ckpt.config_path, max_seq=max_seq)
    check_llama_config(env, ckpt.config, ckpt.config_path)
    jobs = _plan(target, ckpt, env)
    arrays: dict[str, np.ndarray] = {}
    done: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
    for job in tqdm(jobs, desc=f"packing {target.name}", unit="tensor", disable=not progress, file=sys.stderr):
        key = (job.sources, json.dumps(job.entry["transforms"]), job.shape)
        if key not in done:
            w, scale = _pack(ckpt, job)
            for a in (w, scale):
                if a is not None:
                    a.flags.writeable = False
            done[key] = w, scale
        arrays[job.name], scale = done[key]
        if scale is not None:
            arrays[job.scale_name] = scale
    return PackedModel(env, arrays)
