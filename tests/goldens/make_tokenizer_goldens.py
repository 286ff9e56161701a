"""Token ids that transformers' AutoTokenizer gives for chat and plain prompts, for tests/test_tokenizer_chat.py.

Not run by CI: it needs transformers (and torch), which dtypeforge never depends on. With the
throwaway virtualenv make_goldens.py describes, from the repo root:

    /tmp/hfvenv/bin/python tests/goldens/make_tokenizer_goldens.py [SMOLLM2_DIR]

SMOLLM2_DIR defaults to .cache/models/smollm2-135m-instruct (`codegen import-gguf --out ...`); the
SmolLM2 section is left out when it is absent. It writes tokenizer_ids.json next to itself:

  conversations, plain       the inputs: message lists (apply_chat_template(..., add_generation_prompt=True,
                             tokenize=True)) and plain strings (tokenizer(text)["input_ids"])
  synthetic.layouts          per folder layout (`make_layout`: where the chat template lives, whether
                             tokenizer.json has a post-processor) of runtime.synth's tokenizer: the
                             rendered text and ids of every conversation, or the error transformers raised
  synthetic.saved_by_transformers
                             which files save_pretrained writes and whether tokenizer_config.json keeps
                             chat_template (it does not: transformers 5 moves it to chat_template.jinja)
  smollm2                    rendered text, chat ids and plain ids of the real model
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE / "tokenizer_ids.json"
DEFAULT_SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m-instruct"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me about Zürich 🙂"}],
    [{"role": "user", "content": "literal <s> and </s> and <|im_start|> inside"}],
]
PLAIN = ["Hello world", "", "Zürich 日本語 🙂", "<s>already</s>", "  two spaces\n\nand newlines", "123 4567"]

# A second template, told apart from dtypeforge.runtime.synth.CHAT_TEMPLATE by its output (and it writes no BOS).
ALT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")


def layouts() -> dict[str, dict]:
    """Folder layouts of the synthetic tokenizer. config_chat_template: "keep" (as runtime.synth
    writes it), null (key removed) or a value to store; jinja: chat_template.jinja's text or null;
    extra: additional_chat_templates/<name>.jinja; post_processor: keep tokenizer.json's."""
    from dtypeforge.runtime.synth import CHAT_TEMPLATE

    base = {"config_chat_template": "keep", "jinja": None, "extra": {}, "post_processor": True}
    return {
        "config": base,
        # what transformers 5's save_pretrained writes (see saved_by_transformers)
        "jinja": {**base, "config_chat_template": None, "jinja": CHAT_TEMPLATE},
        "jinja_and_config": {**base, "config_chat_template": ALT_TEMPLATE, "jinja": CHAT_TEMPLATE},
        "jinja_and_extra_dir": {**base, "config_chat_template": ALT_TEMPLATE, "jinja": CHAT_TEMPLATE,
                                "extra": {"tool_use": ALT_TEMPLATE}},
        "extra_dir_only": {**base, "extra": {"tool_use": ALT_TEMPLATE}},
        "config_list": {**base, "config_chat_template": [{"name": "tool_use", "template": ALT_TEMPLATE},
                                                          {"name": "default", "template": CHAT_TEMPLATE}]},
        "config_list_no_default": {**base, "config_chat_template": [{"name": "tool_use", "template": ALT_TEMPLATE}]},
        "no_template": {**base, "config_chat_template": None},
        # tokenizer_config.json still says add_bos_token: true
        "no_post_processor": {**base, "post_processor": False},
    }


def make_layout(synth_dir: Path, out: Path, layout: dict) -> Path:
    """A tokenizer-only model folder in ``out`` from dtypeforge.runtime.synth's files in ``synth_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((synth_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if not layout["post_processor"]:
        tokenizer["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((synth_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if layout["config_chat_template"] is None:
        config.pop("chat_template")
    elif layout["config_chat_template"] != "keep":
        config["chat_template"] = layout["config_chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if layout["jinja"] is not None:
        (out / "chat_template.jinja").write_text(layout["jinja"], encoding="utf-8")
    for name, text in layout["extra"].items():
        (out / "additional_chat_templates").mkdir(exist_ok=True)
        (out / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")
    return out


def _record(tok) -> dict:
    chats = {"text": [], "ids": []}
    for messages in CONVERSATIONS:
        chats["text"].append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        chats["ids"].append(list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)))
    return chats


def _plain(tok) -> list[list[int]]:
    return [list(tok(text)["input_ids"]) for text in PLAIN]


def main() -> None:
    from transformers import AutoTokenizer

    from dtypeforge.runtime.synth import write_synthetic_model

    smollm2 = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SMOLLM2
    result = {"versions": {p: importlib.metadata.version(p) for p in ("transformers", "tokenizers", "jinja2")},
              "conversations": CONVERSATIONS, "plain": PLAIN, "synthetic": {"layouts": {}}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = write_synthetic_model(tmp / "synth", "tiny")
        tok = AutoTokenizer.from_pretrained(str(synth))
        saved = tmp / "saved"
        tok.save_pretrained(str(saved))
        result["synthetic"]["saved_by_transformers"] = {
            "files": sorted(p.name for p in saved.iterdir()),
            "config_has_chat_template": "chat_template" in json.loads((saved / "tokenizer_config.json").read_text()),
            "ids": _record(AutoTokenizer.from_pretrained(str(saved)))["ids"],
        }
        for name, layout in layouts().items():
            folder = make_layout(synth, tmp / name, layout)
            tok = AutoTokenizer.from_pretrained(str(folder))
            entry = {"plain_ids": _plain(tok)}
            try:
                entry |= _record(tok)
            except Exception as e:  # what transformers refuses, recorded rather than hidden
                entry["error"] = f"{type(e).__name__}: {e}"
            result["synthetic"]["layouts"][name] = entry
            shutil.rmtree(folder)
    if (smollm2 / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(smollm2))
        result["smollm2"] = {**_record(tok), "plain_ids": _plain(tok)}
    else:
        print(f"{smollm2} is absent: no smollm2 section", file=sys.stderr)
    OUT.write_text(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
