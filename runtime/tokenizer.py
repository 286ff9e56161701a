"""Text <-> token ids for a Hugging Face model directory, without transformers.

Why: the runtime must tokenize prompts, render chat prompts and stream generated text the way
transformers does for the same model, but transformers (and torch) are far too heavy to be a
runtime dependency. `tokenizer.json` carries the whole tokenization pipeline for the
`tokenizers` library; `tokenizer_config.json` adds the BOS/EOS conventions and the Jinja chat
template, which is rendered here the way transformers renders it (sandboxed, trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that keeps non-ASCII and `<`).
transformers 5 saves that template as `chat_template.jinja` beside the config instead; it is
found in either place, with transformers' precedence (see `_chat_template_source`).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .target import LoadError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# Where transformers 5 saves chat templates: the default one in its own file, named extra ones
# in a folder. Either replaces tokenizer_config.json's entry.
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"


class TokenizerError(LoadError):
    """A model folder's tokenizer files are missing or malformed, its chat template is missing
    or refuses the conversation, or the text to encode is not valid Unicode."""


def check_text(text: str, what: str = "text") -> None:
    """Refuse text holding lone surrogates, with where they are.

    Python turns command-line bytes that are not UTF-8 into lone surrogates U+DC80..U+DCFF
    (one per byte); no tokenizer can encode those, and the tokenizers library's own error does
    not say which input or where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        bad = (f"byte 0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
               else f"lone surrogate U+{ord(c):04X}")
        before = text[max(0, e.start - 20):e.start]     # all valid: e.start is the first bad character
        raise TokenizerError(f"{what} is not valid UTF-8: {bad} at character {e.start} (after {before!r}); "
                             "pass the text in UTF-8") from None


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _read_text(path: Path, model_dir: Path, what: str) -> str:
    if not path.is_file():
        raise TokenizerError(f"{model_dir} has no {path.name}; {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_json_object(path: Path, model_dir: Path, what: str) -> dict:
    try:
        value = json.loads(_read_text(path, model_dir, what))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _chat_template_source(model_dir: Path, config: dict) -> tuple[str | None, str]:
    """(template text or None, where it came from), chosen as transformers 5 does.

    transformers reads `chat_template.jinja` (as template "default") and every
    `additional_chat_templates/<name>.jinja`; if any exist they replace tokenizer_config.json's
    `chat_template` altogether. Several templates (or a config list of {name, template}, or a
    config object of name: template) mean "default" is used, and none named so is an error."""
    config_path = model_dir / CONFIG_FILE
    files = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        files["default"] = model_dir / TEMPLATE_FILE
    if (model_dir / TEMPLATE_DIR).is_dir():
        files |= {f.name.removesuffix(".jinja"): f for f in sorted((model_dir / TEMPLATE_DIR).glob("*.jinja"))}
    if files:
        if "default" not in files:
            raise TokenizerError(f"{model_dir}: {TEMPLATE_DIR}/ has templates {sorted(files)} but there is no "
                                 f"{TEMPLATE_FILE}, so no default chat template (transformers ignores "
                                 f"{CONFIG_FILE}'s chat_template when these files exist)")
        return _read_text(files["default"], model_dir, ""), str(files["default"])
    template = config.get("chat_template")
    where = f"{config_path} chat_template"
    if template is None or isinstance(template, str):
        return template, where
    if isinstance(template, (list, dict)):
        named = template if isinstance(template, dict) else {}
        for i, item in enumerate(template if isinstance(template, list) else []):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise TokenizerError(f"{config_path}: chat_template[{i}] is {_one_line(repr(item))[:80]}; a list of "
                                     "chat templates must hold objects with string keys name and template")
            named[item["name"]] = item["template"]
        bad = next((name for name, text in named.items() if not isinstance(text, str)), None)
        if bad is not None:
            raise TokenizerError(f"{config_path}: chat_template[{bad!r}] is a {type(named[bad]).__name__}; "
                                 "a template must be a string")
        if "default" not in named:
            raise TokenizerError(f"{config_path}: chat_template lists templates {sorted(named)} but none is named "
                                 "'default', the one a chat prompt uses")
        return named["default"], f"{where} 'default'"
    raise TokenizerError(f"{config_path}: chat_template is a {type(template).__name__}; allowed: a string, a "
                         "list of {name, template} objects, or an object of name: template")


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
        self.model_dir = model_dir
        needs = f"a model folder needs {TOKENIZER_FILE} and {CONFIG_FILE} (Hugging Face layout)"
        path = model_dir / TOKENIZER_FILE
        text = _read_text(path, model_dir, needs)
        try:
            self._tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises bare Exception for every parse error
            raise TokenizerError(f"{path} is not a tokenizers file: {_one_line(e)}") from None
        config = _read_json_object(model_dir / CONFIG_FILE, model_dir, needs)
        # Every *_token string is a template variable in transformers (bos_token, eos_token,
        # unk_token, pad_token, model-specific ones).
        self._special_tokens = {k: _token_text(v) for k, v in config.items()
                                if k.endswith("_token") and isinstance(_token_text(v), str)}
        self.bos_token = self._special_tokens.get("bos_token")
        self.eos_token = self._special_tokens.get("eos_token")
        self.bos_id = self._id(self.bos_token)
        # transformers 5 drops tokenizer_config.json's add_bos_token when tokenizer.json exists:
        # whether plain text starts with BOS is up to tokenizer.json's post-processor alone.
        with_special, bare = self._tokenizer.encode("a").ids, self._tokenizer.encode("a", add_special_tokens=False).ids
        self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and bare[:1] != [self.bos_id]
        self.eos_ids = self._stop_ids(model_dir, self._id(self.eos_token))
        # A bad or missing template only matters to chat prompts, so it is reported when one is asked for.
        try:
            self._template_text, self._template_source = _chat_template_source(model_dir, config)
            self._template_problem = None
        except TokenizerError as e:
            self._template_text, self._template_source, self._template_problem = None, None, e
        self._chat_template = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @staticmethod
    def _stop_ids(model_dir: Path, eos_id: int | None) -> frozenset[int]:
        """Generation stops on the tokenizer's EOS and on every eos_token_id generation_config lists."""
        ids = {eos_id} - {None}
        generation = model_dir / "generation_config.json"
        if generation.is_file():
            listed = _read_json_object(generation, model_dir, "").get("eos_token_id")
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

        `add_bos=None` is transformers' `tokenizer(text)`: tokenizer.json's post-processor adds
        what it adds (BOS for most Llamas). True / False: the bare encoding, with / without BOS
        in front; rendered chat prompts use False, as transformers' apply_chat_template
        (add_special_tokens=False), since templates write their own BOS.
        """
        check_text(text)
        if add_bos is None:
            return self._tokenizer.encode(text).ids
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """transformers' apply_chat_template(messages, tokenize=True): render, then encode with
        no special tokens added, so a template that writes bos_token gives exactly one BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_bos=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); extra kwargs reach the template."""
        if self._template_problem is not None:
            raise self._template_problem
        if self._template_text is None:
            raise TokenizerError(f"{self.model_dir} has no chat template: no chat_template key in {CONFIG_FILE} and "
                                 f"no {TEMPLATE_FILE} file; drop --chat to use the prompt as it is, or add a template")
        if self._chat_template is None:     # compiled on first use: a plain prompt never needs it
            try:
                self._chat_template = self._jinja().from_string(self._template_text)
            except TemplateSyntaxError as e:
                raise TokenizerError(f"chat template in {self._template_source} does not parse: line {e.lineno}: "
                                     f"{_one_line(e.message)}") from None
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **{**self._special_tokens, **kwargs},
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template in {self._template_source} refused the conversation: "
                                 f"{_one_line(e)}") from None


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
