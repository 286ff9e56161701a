"""Synthetic Llama checkpoints: real HF directory layout, random weights, byte tokenizer.

Tests and benchmarks need checkpoints of real shapes (SmolLM2-135M, Llama-3.2-1B) without
downloading any; a tiny one makes loader and decoder tests run in milliseconds. Weights
are random but shaped so a decode stays numerically tame over many layers (unit-variance
embedding, 1/sqrt(fan_in) projections, residual-branch outputs scaled by 1/sqrt(2 n_layers)
so the residual stream's variance only about doubles over the whole stack), which keeps
greedy decoding's top-1 margins clear of dtype rounding noise.

Everything is a pure function of (shape, seed, dtype): each tensor draws from its own
generator seeded by the seed and the tensor's name, in fixed-size row chunks, so the bytes
do not depend on write order, and no more than one float32 chunk exists beside the stored
tensors (the 1B model needs about its stored size in RAM, not a float32 copy of it).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from dtypeforge.codegen.dtypes import DTYPES, to_storage

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0),
    # rows that are not whole 16-byte vectors (fp8 rows of 72 B, a 100-column down projection), a
    # head_dim (24) below attention's vector path and an odd vocabulary (the lm_head's last row pair
    # has one row): the kernels' general paths, for GPU op checks
    "ragged": dict(hidden_size=72, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                   intermediate_size=100, vocab_size=301, max_position_embeddings=1024, rope_theta=10000.0),
    # the hidden size of Llama-3.2-1B (2048) in two cheap layers and a context long enough for several
    # attention splits, for GPU op checks
    "wide": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                 intermediate_size=256, vocab_size=512, max_position_embeddings=4096, rope_theta=500000.0),
    # GEMV rows of many 16-byte-load batches (the down projection's 8800 columns: 5 batches of f16, 9 of
    # f32, the last one partial), where the device spec may rotate each warp's first batch, for GPU op checks
    "long_rows": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      intermediate_size=8800, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
}
STORED = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}   # dtype -> config.json torch_dtype
BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257                                            # right after the 256 byte tokens
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
_CHUNK = 1 << 22            # float32 elements generated at a time (16 MiB)
_NORM_NOISE = 0.05


def hf_config(shape: str, dtype: str = "f32") -> dict:
    """config.json of a synthetic model: LlamaForCausalLM, untied lm_head (see write_synthetic_model), no rope scaling."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape],
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "torch_dtype": STORED[dtype]}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map, the alphabet of tokenizers' ByteLevel."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level tokenizer: id b < 256 is byte b, then BOS/EOS, then reserved tokens up to
    ``vocab_size`` so every id a random model can emit decodes to something. Encoding adds
    BOS, like Llama's tokenizers."""
    if vocab_size < EOS_ID + 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for 256 byte tokens + BOS/EOS")
    vocab = {c: b for b, c in enumerate(_bytes_to_unicode())}
    vocab |= {BOS: BOS_ID, EOS: EOS_ID}
    vocab |= {f"<|reserved_{i - EOS_ID - 1}|>": i for i in range(EOS_ID + 1, vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    return tok


def _tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, int] | tuple[int], str, float]]:
    """(HF name, shape, kind, std): kind 'normal' draws N(0, std), 'norm' draws 1 + N(0, std)."""
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    branch = 1 / np.sqrt(2 * L)
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "normal", 1.0)]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm", _NORM_NOISE),
            (p + "self_attn.q_proj.weight", (q, h), "normal", 1 / np.sqrt(h)),
            (p + "self_attn.k_proj.weight", (kv, h), "normal", 1 / np.sqrt(h)),
            (p + "self_attn.v_proj.weight", (kv, h), "normal", 1 / np.sqrt(h)),
            (p + "self_attn.o_proj.weight", (h, q), "normal", branch / np.sqrt(q)),
            (p + "post_attention_layernorm.weight", (h,), "norm", _NORM_NOISE),
            (p + "mlp.gate_proj.weight", (inter, h), "normal", 1 / np.sqrt(h)),
            (p + "mlp.up_proj.weight", (inter, h), "normal", 1 / np.sqrt(h)),
            (p + "mlp.down_proj.weight", (h, inter), "normal", branch / np.sqrt(inter)),
        ]
    specs.append(("model.norm.weight", (h,), "norm", _NORM_NOISE))
    return specs


def _random_tensor(name: str, shape: tuple, kind: str, std: float, seed: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    cols = shape[-1]
    flat = np.empty((int(np.prod(shape[:-1], dtype=np.int64)), cols), dtype=DTYPES[dtype].np_dtype)
    step = max(1, _CHUNK // cols)
    for r in range(0, flat.shape[0], step):
        x = rng.standard_normal((min(step, flat.shape[0] - r), cols), dtype=np.float32)
        x *= np.float32(std)
        if kind == "norm":
            x += np.float32(1)
        flat[r:r + step] = to_storage(x, dtype)
    return flat.reshape(shape)


def write_synthetic_model(out_dir: Path | str, shape: str = "tiny", seed: int = 0, dtype: str = "f32",
                          tied: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json of a
    random Llama of ``shape`` (one of ``SHAPES``) to ``out_dir``, tensors stored as ``dtype``
    (f32 / f16 / bf16). Same arguments, same bytes. ``tied`` writes no lm_head and ties it to the
    embedding (as SmolLM2 does); greedy decoding then repeats the last token, which suits loader
    tests but not decoding tests."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if dtype not in STORED:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(STORED)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape, dtype)
    tensors = {name: _random_tensor(name, shp, kind, std, seed, dtype) for name, shp, kind, std in _tensor_specs(cfg)}
    # Untied lm_head = a seeded row permutation of the embedding. The final hidden state stays close
    # to the current token's embedding, so its logit row peaks, by a wide margin, at the token the
    # permutation maps it to: greedy decoding walks a random permutation (varied tokens) whose top-1
    # margins stay far above any policy's rounding noise.
    if not tied:
        perm = np.random.default_rng([seed, zlib.crc32(b"lm_head.perm")]).permutation(cfg["vocab_size"])
        tensors["lm_head.weight"] = np.ascontiguousarray(tensors["model.embed_tokens.weight"][perm])
    cfg["tie_word_embeddings"] = tied
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    build_tokenizer(cfg["vocab_size"]).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
        "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return out
