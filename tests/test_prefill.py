"""Batched prefill on the reference backend: the prefill step (the model spec's prefill_step) must give,
row for row, the decode step's numbers. Each policy and layout prefills a prompt (in one chunk and in
several) and its logits, the cache it leaves and the tokens decoded after it are compared with feeding
the same prompt through the decode step one token at a time. (Against transformers, the goldens tests
run generate, which prefills this way.)"""
from __future__ import annotations

import numpy as np
import pytest

from dtypeforge.codegen.specs import DEFAULT_SPECS, load_specs
from dtypeforge.runtime.binding import BindError, bind
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.session import target_from_specs

SPECS = load_specs(DEFAULT_SPECS)
POLICIES = sorted(SPECS.policies["llama"])
PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 512, size=150)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny"), "tiny")


def _backend(model, policy, layout, max_seq=256):
    target = target_from_specs(SPECS, "reference", policy, layout, "llama")
    return ReferenceBackend(target.manifest, pack_weights(target, model, max_seq=max_seq, progress=False))


def _decode_prompt(be, prompt):
    be.reset()
    for pos, tok in enumerate(prompt):
        logits = be.step(tok, pos)
    return logits


@pytest.mark.parametrize("layout", ["fused", "separate"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", [1, 13, 150])   # one row; one partial chunk; chunks of 64, 64 and 22
def test_prefill_matches_token_by_token_decode(model, policy, layout, n):
    be = _backend(model, policy, layout)
    assert be.env["chunk"] == 64
    prompt = PROMPT[:n]
    want = _decode_prompt(be, prompt)
    caches = {b: be.arrays[b][:, :n].copy() for b in ("k_cache", "v_cache")}
    want_next = [be.step(int(np.argmax(want)), n)]
    be.reset()
    got = be.prefill(prompt, 0)
    # the same sums in another order (float64 matrix products, exact to far below an f32 ulp): equal
    # but for a rare last-bit tie, and the same token
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert np.argmax(got) == np.argmax(want)
    for b, c in caches.items():
        np.testing.assert_allclose(be.arrays[b][:, :n], c, rtol=1e-6, atol=1e-6)
        assert not be.arrays[b][:, n:].any(), f"{b}: prefill wrote rows beyond the prompt"
    got_next = [be.step(int(np.argmax(got)), n)]
    np.testing.assert_allclose(got_next, want_next, rtol=1e-5, atol=1e-5 * np.abs(want_next).max())


def test_prefill_continues_a_context(model):
    """A second prefill at pos > 0 (a chat turn appended) attends over the first one's cache."""
    be = _backend(model, "f16", "fused")
    want = _decode_prompt(be, PROMPT[:100])
    be.reset()
    be.prefill(PROMPT[:30], 0)
    got = be.prefill(PROMPT[30:100], 30)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_prefill_launch_size_is_bounded_by_the_chunk(model):
    be = _backend(model, "f32", "fused")
    for tokens in (0, 65):
        with pytest.raises(BindError, match="1 to 64 tokens"):
            bind(be.manifest, be.env, be.table, "prefill_step", tokens)


def test_chunk_is_capped_by_the_context(model):
    assert _backend(model, "f32", "fused", max_seq=40).env["chunk"] == 40
