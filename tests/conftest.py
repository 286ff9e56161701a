"""Shared fixtures: the real SmolLM2-135M-Instruct model, imported from its GGUF once per checkout.

The import takes ~15 s, so it is cached in `<repo>/.cache/smollm2-<sha256[:12] of the GGUF>/`
(git-ignored); a new GGUF version gets a new directory. `import_gguf` renames a finished
directory into place, so a directory that exists with every file is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dtypeforge.runtime.gguf_import import default_gguf_path, import_gguf

REPO = Path(__file__).resolve().parents[1]


def golden_script(name: str):
    """A script of tests/goldens/ (run by hand with transformers) as a module, for the parts tests share
    with it (its prompts, its layouts, how it measures) without transformers installed."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "goldens" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_json(record) -> dict:
    """A manifest or packing record (codegen.contract) as its file parses: a test edits it as a stale or
    hand-edited file would differ, then loads it back through the contract."""
    return json.loads(json.dumps(dataclasses.asdict(record)))


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    gguf = default_gguf_path()
    out = REPO / ".cache" / f"smollm2-{_sha256(gguf)[:12]}"
    if not all((out / name).is_file() for name in MODEL_FILES):
        import_gguf(gguf, out, progress=False, force=True)     # the cache's own folder, maybe incomplete
    return out


@pytest.fixture(scope="session")
def smollm2_goldens() -> dict:
    """Greedy decoding, prompt ids and a weight fingerprint recorded by transformers (make_goldens.py)."""
    return json.loads((Path(__file__).resolve().parent / "goldens" / "smollm2_f32_greedy.json").read_text(encoding="utf-8"))


def write_gguf(path: Path, kv: dict, tokens: list[str], types: list[int], merges: list[str],
               tensors: dict[str, np.ndarray]) -> Path:
    """A llama GGUF with gguf-py's writer; `kv` values typed by their Python type."""
    from gguf import GGUFWriter
    writer = GGUFWriter(path, "llama")
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
