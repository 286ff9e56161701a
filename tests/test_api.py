"""The Python API (`dtypeforge.load`): the engine the CLI runs on, with tokens streamed as produced."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dtypeforge
from dtypeforge.runtime.synth import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", seed=4)


def test_streamed_tokens_are_the_clis_tokens(tiny, tmp_path):
    with dtypeforge.load(tiny, device="reference", policy="bf16") as engine:
        streamed = [t for t, _ in engine.generate("Hello there", max_new_tokens=12) if t is not None]
    r = subprocess.run([sys.executable, "-m", "dtypeforge.cli", "generate", "--model", str(tiny), "--backend",
                        "cpu", "--policy", "bf16", "--prompt", "Hello there", "--max-new-tokens", "12", "--json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert streamed == json.loads(r.stdout)["new_ids"]


def test_generate_yields_each_token_before_computing_the_next(tiny):
    engine = dtypeforge.load(tiny, device="reference")
    steps, prefills = [], []
    step, prefill = engine.backend.step, engine.backend.prefill
    engine.backend.step = lambda tok, pos: (steps.append(pos), step(tok, pos))[1]
    engine.backend.prefill = lambda toks, pos: (prefills.append((list(toks), pos)), prefill(toks, pos))[1]
    prompt_ids = engine.encode("Hi")
    gen = engine.generate("Hi", max_new_tokens=5)
    next(gen)
    assert prefills == [(prompt_ids, 0)] and steps == []   # the prompt only: the first token costs no decode step
    next(gen)
    assert steps == [len(prompt_ids)]


def test_user_errors_are_one_catchable_family(tiny):
    with pytest.raises(dtypeforge.UserError, match="--policy 'f17'"):
        dtypeforge.load(tiny, device="reference", policy="f17")
    with dtypeforge.load(tiny, device="reference", max_seq=8) as engine:
        with pytest.raises(dtypeforge.UserError, match="exceeds the model's context of 8"):
            list(engine.generate("Hello there, how are you", max_new_tokens=8))
