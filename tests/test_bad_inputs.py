"""Bad inputs through the real CLI: each gives one `error:` line, the right exit code, and loses nothing.

One table of cases. Each runs `codegen` in a subprocess (as a user would, argv bytes and all) inside
a scratch folder that also holds files the command does not own, and asserts:
  * the exit code: 2 for usage and spec errors, 1 for errors found at run time;
  * stderr ends with exactly one error line, starting `error:`, containing every expected fragment
    (the file, key or tensor, what was found and what is allowed); only progress lines come before it;
  * no traceback;
  * every file in the scratch folder, and the repository's specs/ and generated/, is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dtypeforge.runtime.synth import write_synthetic_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@dataclass
class Case:
    name: str
    argv: list                        # str or bytes; "{model}", "{work}" and "{specs}" are filled in
    code: int
    says: tuple[str, ...]             # fragments the one error line must contain
    setup: Callable[[Path], None] | None = None     # prepares the scratch folder (work/model is a copy of tiny)
    specs: Callable[[Path], None] | None = None     # edits a copy of specs/ at work/specs
    env: dict = field(default_factory=dict)


def _config(**changes):
    def edit(work: Path):
        path = work / "model" / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
    return edit


def _tensors(mutate):
    def edit(work: Path):
        path = work / "model" / "model.safetensors"
        t = load_file(path)
        mutate(t)
        save_file(t, path)
    return edit


def _write(rel: str, text: str | bytes):
    def edit(work: Path):
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def _spec_text(rel: str, old: str, new: str):
    def edit(specs: Path):
        p = specs / rel
        text = p.read_text()
        assert old in text, (rel, old)
        p.write_text(text.replace(old, new, 1))
    return edit


def _plant(name, value):
    def mutate(t):
        a = t[name].copy()
        a.reshape(-1)[5] = value
        t[name] = a
    return mutate


GEN = ["generate", "--model", "{model}", "--backend", "cpu", "--prompt", "hi", "--max-new-tokens", "4"]
UP = "model.layers.1.mlp.up_proj.weight"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

CASES = [
    # ---- command-line values
    Case("max-new-tokens 0", GEN[:-1] + ["0"], 2, ("--max-new-tokens", "found 0", ">= 1")),
    Case("max-new-tokens -1", GEN[:-1] + ["-1"], 2, ("--max-new-tokens", "found -1")),
    Case("temperature -1", GEN + ["--temperature", "-1"], 2, ("--temperature", "found -1", ">= 0")),
    Case("temperature nan", GEN + ["--temperature", "nan"], 2, ("--temperature", "nan")),
    Case("top-p 0", GEN + ["--top-p", "0"], 2, ("--top-p", "found 0", "(0, 1]")),
    Case("top-k -5", GEN + ["--top-k", "-5"], 2, ("--top-k", "found -5")),
    Case("prompt not UTF-8", GEN[:6] + [b"caf\xe9"] + GEN[7:], 1, ("prompt", "UTF-8")),
    Case("unknown device", GEN + ["--device", "h1000"], 2, ("--device 'h1000'", "allowed:", "h100")),
    Case("unknown policy", GEN + ["--policy", "f17"], 2, ("--policy 'f17'", "allowed:", "f16")),
    Case("layout outside the spec", GEN + ["--layout", "../x"], 2, ("--layout '../x'", "allowed: fused, separate")),
    Case("explain unknown policy", ["explain", "--device", "h100", "--policy", "nope"], 2, ("--policy 'nope'", "allowed:")),
    Case("explain unknown diff", ["explain", "--device", "h100", "--diff", "nope"], 2, ("--policy 'nope'", "allowed:")),
    Case("compile unknown policy", ["compile", "--device", "h100", "--policy", "nope"], 2, ("--policy 'nope'",)),
    Case("compile the reference device", ["compile", "--device", "reference"], 2, ("reference", "no kernels")),
    Case("bench --tokens 0", ["bench", "--model", "{model}", "--backend", "cpu", "--tokens", "0"], 2, ("--tokens", "found 0")),
    Case("bench --tokens -5", ["bench", "--model", "{model}", "--backend", "cpu", "--tokens", "-5"], 2, ("--tokens", "found -5")),
    Case("build layout escaping --out", ["build", "--layout", "../../x", "--out", "{work}/gen"], 2, ("--layout '../../x'",)),
    Case("build layout with a newline", ["build", "--layout", "fused\nint x;", "--out", "{work}/gen"], 2, ("--layout",)),
    Case("build layout in another case", ["build", "--layout", "Fused", "--out", "{work}/gen"], 2, ("--layout 'Fused'",)),
    # ---- outputs that hold someone else's files
    Case("build into a folder of other things", ["build", "--device", "m40", "--out", "{work}/keep"], 2, ("keep",)),
    Case("import-gguf over a non-empty folder", ["import-gguf", "{work}/x.gguf", "--out", "{work}/keep"], 1, ("keep", "--force")),
    Case("synth-model over a non-empty folder", ["synth-model", "--out", "{work}/keep"], 1, ("keep", "--force")),
    Case("synth-model seed -1", ["synth-model", "--out", "{work}/new", "--seed", "-1"], 2, ("--seed", "found -1")),
    Case("import-gguf over a file", ["import-gguf", "{work}/x.gguf", "--out", "{work}/keep/notes.txt"], 1, ("notes.txt",)),
    # ---- checkpoints
    Case("config.json not JSON", GEN, 1, ("config.json", "not valid JSON"), _write("model/config.json", "{nope")),
    Case("config.json a list", GEN, 1, ("config.json", "JSON object", "list"), _write("model/config.json", "[1, 2]")),
    Case("config.json not UTF-8", GEN, 1, ("config.json",), _write("model/config.json", b"{\"a\": \"\xff\"}")),
    Case("weight_map not a mapping", GEN, 1, ("model.safetensors.index.json", "weight_map"),
         _write("model/model.safetensors.index.json", json.dumps({"weight_map": ["model.safetensors"]}))),
    Case("no tokenizer.json", GEN, 1, ("tokenizer.json",), lambda w: (w / "model" / "tokenizer.json").unlink()),
    Case("attention bias", GEN, 1, ("attention_bias is true", "absent or false"), _config(attention_bias=True)),
    Case("mlp bias", GEN, 1, ("mlp_bias is true",), _config(mlp_bias=True)),
    Case("gelu", GEN, 1, ('hidden_act is "gelu"', '"silu"'), _config(hidden_act="gelu")),
    Case("sliding window", GEN, 1, ("sliding_window is 2", "at least max_seq"),
         _config(architectures=["MistralForCausalLM"], sliding_window=2)),
    Case("yarn", GEN, 1, ("rope_scaling.rope_type is 'yarn'", "default, linear, llama3"),
         _config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    Case("another architecture", GEN, 1, ("architectures", "Qwen2ForCausalLM", "LlamaForCausalLM"),
         _config(architectures=["Qwen2ForCausalLM"])),
    Case("one layer of two", GEN, 1, ("num_hidden_layers is 1", "2 layers"), _config(num_hidden_layers=1)),
    Case("a bias tensor", GEN, 1, ("model.layers.0.self_attn.q_proj.bias", "does not use"),
         _tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))),
    Case("NaN weight", GEN, 1, (UP, "NaN"), _tensors(_plant(UP, np.nan))),
    Case("infinite weight", GEN, 1, (UP, "inf"), _tensors(_plant(UP, np.inf))),
    Case("weight beyond f16", GEN + ["--policy", "f16"], 1, (UP, "100000", "f16", "bf16"), _tensors(_plant(UP, 1e5))),
    # ---- specs
    Case("alias bomb", ["list", "--specs", "{specs}"], 2, ("bomb.yaml",), specs=lambda s: (s / "policies" / "bomb.yaml").write_text(BOMB)),
    Case("negative memory", ["list", "--specs", "{specs}"], 2, ("h100.yaml", "memory_gb", "-80"),
         specs=_spec_text("devices/h100.yaml", "memory_gb: 80", "memory_gb: -80")),
    Case("empty shape", ["list", "--specs", "{specs}"], 2, ("llama.yaml", "shape"),
         specs=_spec_text("models/llama.yaml", "shape: [hidden], per_layer: true}", "shape: [hidden - hidden], per_layer: true}")),
    Case("spec is /dev/zero", ["list", "--specs", "{specs}"], 2, ("zero.yaml", "regular YAML file"),
         specs=lambda s: (s / "devices" / "zero.yaml").symlink_to("/dev/zero")),
    Case("spec is a FIFO", ["list", "--specs", "{specs}"], 2, ("fifo.yaml", "regular YAML file"),
         specs=lambda s: os.mkfifo(s / "devices" / "fifo.yaml")),
]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_fifo():
            out[str(p.relative_to(root))] = "special"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


@pytest.fixture(scope="module")
def repo_before():
    return {d: _snapshot(REPO / d) for d in ("specs", "generated")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, tiny, tmp_path, repo_before):
    work = tmp_path / "work"
    shutil.copytree(tiny, work / "model")
    _write("keep/notes.txt", "a user's own file\n")(work)
    _write("keep/sub/data.bin", b"\x00\x01")(work)
    _write("x.gguf", b"GGUF")(work)
    if case.setup:
        case.setup(work)
    if case.specs:
        shutil.copytree(REPO / "specs", work / "specs")
        case.specs(work / "specs")
    before = _snapshot(work)

    def fill(a):
        if isinstance(a, bytes):
            return a
        return a.format(model=work / "model", work=work, specs=work / "specs")
    argv = [fill(a) for a in case.argv]
    r = subprocess.run([sys.executable, "-m", "dtypeforge.cli", *argv], cwd=work, capture_output=True, timeout=120,
                       env={**os.environ, "DTYPEFORGE_CACHE": str(tmp_path / "cache"), **case.env})
    err = r.stderr.decode("utf-8", "replace")
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err, err
    assert r.returncode == case.code, (r.returncode, err)
    # progress lines may come first (a run's target, a packing bar); the error is one line, and the last
    errors = [l for l in lines if "error" in l.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    for s in case.says:
        assert s in errors[0], (s, errors[0])
    assert _snapshot(work) == before
    assert not list(tmp_path.glob("**/*.tmp*")), "a temporary survived"


def test_no_case_touched_the_repository(repo_before):
    """Runs after the cases (file order): specs/ and generated/ are as they were."""
    assert {d: _snapshot(REPO / d) for d in ("specs", "generated")} == repo_before
