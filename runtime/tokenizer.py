"""Text <-> token ids for a Hugging Face model directory, without transformers.

Why: the runtime must tokenize prompts, render chat prompts and stream generated text the way
transformers does for the same model, but transformers (and torch) are far too heavy to be a
runtime dependency. `tokenizer.json` carries the whole tokenization pipeline for the
`tokenizers` library; `tokenizer_config.json` adds the BOS/EOS conventions and the Jinja chat
template, which is rendered here the way transformers renders it (sandboxed, trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that keeps non-ASCII and `<`).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' override: Jinja's own tojson HTML-escapes, which would change tool-call prompts."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class HFTokenizer:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json for stop ids) of a model dir."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self._id(self.bos_token)
        self.add_bos = bool(config.get("add_bos_token", False))
        self.eos_ids = self._stop_ids(model_dir, self._id(self.eos_token))
        template = config.get("chat_template")
        self._chat_template = None if template is None else self._jinja().from_string(template)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @staticmethod
    def _stop_ids(model_dir: Path, eos_id: int | None) -> frozenset[int]:
        """Generation stops on the tokenizer's EOS and on every eos_token_id generation_config lists."""
        ids = {eos_id} - {None}
        generation = model_dir / "generation_config.json"
        if generation.is_file():
            listed = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")
            ids |= set(listed if isinstance(listed, list) else [listed]) - {None}
        return frozenset(ids)

    @staticmethod
    def _jinja() -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        return env

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) stay whole.

        `add_bos=None` follows the model's `add_bos_token`.
        """
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); extra kwargs reach the template."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat_template in its tokenizer_config.json")
        return self._chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )


class StreamDecoder:
    """Text pieces for ids that arrive one at a time, for streaming output.

    Why not decode each id alone: one character can span several byte-level tokens, and some
    decoders treat the first token of a sequence specially. So the text is the difference between
    decoding a short window of recent ids with and without the new ones; a window ending in an
    incomplete UTF-8 sequence (U+FFFD) is held back until later ids complete it, or `flush()`.
    """

    def __init__(self, tokenizer: HFTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window already emitted as context
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is still held back, replacement characters included."""
        return self._advance(self._decode(self._ids[self._prefix :]))

    def _advance(self, text: str) -> str:
        new = text[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)
