"""The real SmolLM2-135M-Instruct as transformers 5 saves it in bf16 generates transformers' tokens.

transformers 5 writes no top-level rope_theta (SmolLM2's 100000 lives in rope_parameters; read as
the default 10000 the text changes from the third token on), puts the chat template in
chat_template.jinja, and stores bf16 tensors. goldens/make_smollm2_bf16.py recorded what transformers
saved and generated; here the same checkpoint is rebuilt from the f32 import (rounding to nearest
even, proved bit for bit against the tensor hashes transformers' file had), laid out as transformers
saved it, and run through the CLI on the reference backend with the f32 policy.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dtypeforge.runtime.tokenizer import HFTokenizer

GOLDEN = json.loads((Path(__file__).resolve().parent / "goldens" / "smollm2_bf16_t5.json").read_text())


@pytest.fixture(scope="module")
def bf16_dir(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-bf16")
    tensors = {n: a.astype(ml_dtypes.bfloat16) for n, a in load_file(smollm2_dir / "model.safetensors").items()
               if n in GOLDEN["tensor_sha256_bf16"]}
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(GOLDEN["config_json"]))
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (out / "chat_template.jinja").write_text(config.pop("chat_template"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out, tensors


def test_the_rebuilt_checkpoint_is_transformers_bit_for_bit(bf16_dir):
    _, tensors = bf16_dir
    assert sorted(tensors) == sorted(GOLDEN["tensor_sha256_bf16"])
    for name, a in tensors.items():
        assert hashlib.sha256(a.view(np.uint16).tobytes()).hexdigest() == GOLDEN["tensor_sha256_bf16"][name], name
    assert "rope_theta" not in GOLDEN["config_json"] and GOLDEN["config_json"]["rope_parameters"]["rope_theta"] == 100000.0


@pytest.mark.parametrize("i", range(len(GOLDEN["prompts"])))
def test_generates_transformers_tokens(bf16_dir, i):
    model, _ = bf16_dir
    p = GOLDEN["prompts"][i]
    tok = HFTokenizer(model)
    assert tok.encode_chat([{"role": "user", "content": p["text"]}]) == p["prompt_ids"]
    r = subprocess.run([sys.executable, "-m", "dtypeforge.cli", "generate", "--model", str(model), "--backend", "cpu",
                        "--policy", "f32", "--layout", "fused", "--chat", "--prompt", p["text"], "--json",
                        "--max-new-tokens", str(GOLDEN["new_tokens"])], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == p["prompt_ids"]
    assert out["new_ids"] == p["new_ids"][:len(out["new_ids"])]     # the CLI stops at EOS; transformers ran on
    assert len(out["new_ids"]) == GOLDEN["new_tokens"] or out["new_ids"][-1] in (2,)
