"""Token generation on any backend: prefill, greedy or sampled decoding, EOS stop.

A backend offers ``reset()``, ``prefill(tokens, pos) -> logits`` (the prompt through the batched
prefill step, a chunk at a time) and ``step(token, pos) -> logits`` (one decode step), so the CPU
reference and the GPU runtime produce their tokens by one shared loop and differ only in their kernels.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax, lowest index on ties)."""
    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k filter
    top_p: float = 1.0      # 1: no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p)) + 1   # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class ContextTooLong(ValueError):
    """The prompt and the new tokens do not fit the model's context (or there is no prompt at all)."""


def check_context(n_prompt: int, max_new: int, max_seq: int) -> None:
    if n_prompt == 0:
        raise ContextTooLong("the prompt encodes to no tokens; give some text")
    if n_prompt + max_new > max_seq:
        raise ContextTooLong(f"prompt ({n_prompt} tokens) + max new tokens ({max_new}) = {n_prompt + max_new} "
                             f"exceeds the model's context of {max_seq} tokens")


def stream_tokens(backend, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                  sampling: Sampling = Sampling()) -> Iterator[int]:
    """New token ids, yielded as each is sampled (EOS included when it stops generation)."""
    rng = np.random.default_rng(sampling.seed)
    backend.reset()
    logits = backend.prefill([int(t) for t in prompt_ids], 0)
    for n in range(max_new_tokens):
        tok = sample(logits, sampling, rng)
        yield tok
        if tok in eos_ids or n == max_new_tokens - 1:
            return
        logits = backend.step(tok, len(prompt_ids) + n)


def generate(backend, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
             sampling: Sampling = Sampling(), on_token: Callable[[int], None] | None = None,
             max_seq: int | None = None) -> list[int]:
    """Return the new token ids (EOS included when it stops generation)."""
    if max_seq is not None:
        check_context(len(prompt_ids), max_new_tokens, max_seq)
    new = []
    for tok in stream_tokens(backend, prompt_ids, max_new_tokens, eos_ids, sampling):
        new.append(tok)
        if on_token:
            on_token(tok)
    return new
