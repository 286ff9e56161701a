"""runtime.tokenizer against transformers: chat template location and precedence, one BOS in chat
prompts, BOS in plain prompts, and one-line errors for missing or malformed tokenizer files and
prompts that are not UTF-8.

The ids are transformers 5's (goldens/tokenizer_ids.json, written by goldens/make_tokenizer_goldens.py),
so these tests need neither transformers nor torch. The synthetic tokenizer's folder layouts are
rebuilt here with the script's own `make_layout`, so both sides load the same files.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import golden_script

from dtypeforge.session import encode_prompt
from dtypeforge.runtime.synth import BOS_ID, write_synthetic_model
from dtypeforge.runtime.target import LoadError
from dtypeforge.runtime.tokenizer import HFTokenizer, TokenizerError

GOLDENS_DIR = Path(__file__).resolve().parent / "goldens"
GOLDENS = json.loads((GOLDENS_DIR / "tokenizer_ids.json").read_text(encoding="utf-8"))


MAKER = golden_script("make_tokenizer_goldens")
LAYOUTS = MAKER.layouts()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("synth") / "tiny", "tiny")


def _layout(synth_dir: Path, tmp_path: Path, name: str) -> Path:
    return MAKER.make_layout(synth_dir, tmp_path / name, LAYOUTS[name])


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, LoadError) and "\n" not in message, message
    return message


def test_goldens_cover_every_layout():
    assert GOLDENS["conversations"] == MAKER.CONVERSATIONS and GOLDENS["plain"] == MAKER.PLAIN
    assert sorted(GOLDENS["synthetic"]["layouts"]) == sorted(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_synthetic_layout_matches_transformers(synth_dir, tmp_path, name):
    golden = GOLDENS["synthetic"]["layouts"][name]
    tok = HFTokenizer(_layout(synth_dir, tmp_path, name))
    assert [tok.encode(text) for text in GOLDENS["plain"]] == golden["plain_ids"]
    if "error" in golden:      # transformers refuses to render: so must we, in one line
        with pytest.raises(TokenizerError) as e:
            encode_prompt(tok, "Hi", chat=True)
        _one_line_error(e)
        return
    for messages, text, ids in zip(GOLDENS["conversations"], golden["text"], golden["ids"]):
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == text
        assert tok.encode_chat(messages) == ids
    assert encode_prompt(tok, "Hi", chat=True) == golden["ids"][0]


def test_transformers5_saves_the_template_as_chat_template_jinja(synth_dir, tmp_path):
    """The "jinja" layout is what save_pretrained writes; ids from it equal those of the saved folder."""
    saved = GOLDENS["synthetic"]["saved_by_transformers"]
    assert saved["files"] == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert saved["config_has_chat_template"] is False
    folder = _layout(synth_dir, tmp_path, "jinja")
    assert sorted(p.name for p in folder.iterdir()) == saved["files"]
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    tok = HFTokenizer(folder)
    assert [tok.encode_chat(m) for m in GOLDENS["conversations"]] == saved["ids"]


def test_chat_prompt_has_one_bos(synth_dir):
    """The synthetic template writes {{ bos_token }} and tokenizer.json's post-processor adds BOS too;
    a chat prompt must carry it once, as transformers' apply_chat_template does."""
    tok = HFTokenizer(synth_dir)
    assert tok.add_bos
    ids = encode_prompt(tok, "Hi", chat=True)
    assert ids == GOLDENS["synthetic"]["layouts"]["config"]["ids"][0]
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    assert encode_prompt(tok, "Hi", chat=False) == [BOS_ID, ord("H"), ord("i")]


def test_add_bos_token_without_post_processor_adds_nothing(synth_dir, tmp_path):
    """transformers 5 ignores tokenizer_config.json's add_bos_token when tokenizer.json exists."""
    tok = HFTokenizer(_layout(synth_dir, tmp_path, "no_post_processor"))
    assert json.loads((tmp_path / "no_post_processor" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert not tok.add_bos and tok.encode("Hi") == [ord("H"), ord("i")]
    assert tok.encode("Hi", add_bos=True) == [BOS_ID, ord("H"), ord("i")]


def test_smollm2_matches_transformers(smollm2_dir):
    golden = GOLDENS.get("smollm2")
    if golden is None:
        pytest.skip("goldens/tokenizer_ids.json has no smollm2 section (its maker found no SmolLM2 folder)")
    tok = HFTokenizer(smollm2_dir)
    assert not tok.add_bos
    for messages, text, ids in zip(GOLDENS["conversations"], golden["text"], golden["ids"]):
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == text
        assert tok.encode_chat(messages) == ids
    assert [tok.encode(text) for text in GOLDENS["plain"]] == golden["plain_ids"]
    assert encode_prompt(tok, GOLDENS["conversations"][0][0]["content"], chat=True) == golden["ids"][0]


def test_no_template_names_folder_and_both_places(synth_dir, tmp_path):
    folder = _layout(synth_dir, tmp_path, "no_template")
    with pytest.raises(TokenizerError) as e:
        encode_prompt(HFTokenizer(folder), "Hi", chat=True)
    message = _one_line_error(e)
    assert str(folder) in message and "tokenizer_config.json" in message and "chat_template.jinja" in message


def test_template_object_picks_default(synth_dir, tmp_path):
    """transformers also takes a {name: template} object in tokenizer_config.json, and uses "default"."""
    (tmp_path / "tokenizer.json").write_bytes((synth_dir / "tokenizer.json").read_bytes())
    config = json.loads((synth_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = {"tool_use": "T", "default": "D{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert HFTokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "Dhi"


def test_template_list_without_default_is_refused(synth_dir, tmp_path):
    with pytest.raises(TokenizerError) as e:
        HFTokenizer(_layout(synth_dir, tmp_path, "config_list_no_default")).encode_chat([{"role": "user", "content": "x"}])
    message = _one_line_error(e)
    assert "tokenizer_config.json" in message and "['tool_use']" in message and "'default'" in message
    with pytest.raises(TokenizerError) as e:
        HFTokenizer(_layout(synth_dir, tmp_path, "extra_dir_only")).encode_chat([{"role": "user", "content": "x"}])
    assert "additional_chat_templates" in _one_line_error(e)


@pytest.mark.parametrize("template, found", [
    ([{"name": "default"}], "chat_template[0]"),
    ({"default": 1}, "chat_template['default'] is a int"),
    (42, "chat_template is a int"),
    ("{% for m in messages %}", "does not parse"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_bad_templates_are_one_line(synth_dir, tmp_path, template, found):
    (tmp_path / "tokenizer.json").write_bytes((synth_dir / "tokenizer.json").read_bytes())
    config = json.loads((synth_dir / "tokenizer_config.json").read_text()) | {"chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(tmp_path)
    assert tok.encode("Hi") == [BOS_ID, ord("H"), ord("i")]     # plain prompts do not need the template
    with pytest.raises(TokenizerError) as e:
        encode_prompt(tok, "Hi", chat=True)
    message = _one_line_error(e)
    assert found in message and "tokenizer_config.json" in message


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_tokenizer_file(synth_dir, tmp_path, missing):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name != missing:
            (tmp_path / name).write_bytes((synth_dir / name).read_bytes())
    with pytest.raises(TokenizerError) as e:
        HFTokenizer(tmp_path)
    message = _one_line_error(e)
    assert message.startswith(f"{tmp_path} has no {missing};")


@pytest.mark.parametrize("name, content, found", [
    ("tokenizer.json", b"not json", "is not a tokenizers file: expected ident at line 1 column 2"),
    ("tokenizer.json", b'{"version": "1.0"}', "is not a tokenizers file"),
    ("tokenizer.json", b"\xff\xfe{}", "is not UTF-8 text"),
    ("tokenizer_config.json", b"{bos_token: 1}", "is not valid JSON: Expecting property name"),
    ("tokenizer_config.json", b"[]", "must hold a JSON object, found list"),
    ("generation_config.json", b"{", "is not valid JSON"),
])
def test_malformed_tokenizer_file(synth_dir, tmp_path, name, content, found):
    for good in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / good).write_bytes((synth_dir / good).read_bytes())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        HFTokenizer(tmp_path)
    message = _one_line_error(e)
    assert message.startswith(str(tmp_path / name)) and found in message, message


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_that_is_not_utf8(synth_dir, chat):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates (U+DC80 + byte)."""
    prompt = b"caf\xc3\xa9 \xff!".decode("utf-8", "surrogateescape")
    with pytest.raises(TokenizerError) as e:
        encode_prompt(HFTokenizer(synth_dir), prompt, chat=chat)
    assert _one_line_error(e) == ("prompt is not valid UTF-8: byte 0xff at character 5 (after 'café '); "
                                  "pass the text in UTF-8")
    with pytest.raises(TokenizerError, match=r"text is not valid UTF-8: lone surrogate U\+D800 at character 1"):
        HFTokenizer(synth_dir).encode("a\ud800")


def test_cli_refuses_non_utf8_prompt_and_missing_template(synth_dir, tmp_path):
    """Through `codegen generate`: `error: ...`, exit 1, no traceback, nothing packed."""
    model = write_synthetic_model(tmp_path / "m", "tiny")
    args = [sys.executable, "-m", "dtypeforge.cli", "generate", "--model", str(model), "--backend", "cpu",
            "--device", "reference"]
    r = subprocess.run([*args, "--prompt", b"hi \xff"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "packing" not in r.stderr, r.stderr
    assert "error: prompt is not valid UTF-8: byte 0xff at character 3" in r.stderr
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    r = subprocess.run([*args, "--prompt", "hi", "--chat"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "packing" not in r.stderr, r.stderr
    assert f"error: {model} has no chat template" in r.stderr
