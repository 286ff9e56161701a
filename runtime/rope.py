"""RoPE's per-pair inverse frequencies, as a checkpoint's config.json declares them.

Every RoPE op (the GPU kernels and the reference backend alike) reads one table, ``inv_freq[j]`` for
the pair (j, j + head_dim/2), and turns it by ``pos * inv_freq[j]``. Scaling therefore lives here,
once, as data: the model spec's ``rope`` section says which config keys hold it and which types
run; this module holds the formulas, written as transformers writes them
(``modeling_rope_utils``), in float32 step by step as transformers evaluates them.

The config spells the same thing several ways: transformers 4 writes ``rope_theta`` at the top and
``rope_scaling: {rope_type | type, factor, ...}`` (or null); transformers 5 writes
``rope_parameters: {rope_theta, rope_type, ...}``. Both are read; a type the spec does not list,
or a parameter it does not know, is refused by name rather than silently dropped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from dtypeforge.codegen.contract import RopeSpec

from .target import ConfigError

# keys a scaling mapping may hold besides the type's own parameters
_COMMON = ("rope_type", "type", "rope_theta")


def scaling(rope: RopeSpec, config: Mapping, where: str) -> tuple[str, dict]:
    """(rope_type, its parameters) from the first of the spec's keys that holds a mapping."""
    for key in rope.keys:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} is {value!r}; expected a mapping {{rope_type, ...}} or null")
        kind = value.get("rope_type", value.get("type", "default"))
        types = rope.types
        if kind not in types:
            raise ConfigError(f"{where}: {key}.rope_type is {kind!r}; supported RoPE types: {', '.join(types)}")
        params = {}
        for p in types[kind]:
            v = value.get(p)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{where}: {key}.{p} is {v!r}; RoPE type {kind} needs a positive number there")
            params[p] = float(v)
        extra = sorted(set(value) - set(types[kind]) - set(_COMMON))
        if extra:
            raise ConfigError(f"{where}: {key}.{extra[0]} ({value[extra[0]]!r}) is not a parameter of RoPE type {kind}, "
                              f"whose parameters are: {', '.join(types[kind]) or 'none'}")
        return kind, params
    return "default", {}


def inv_freq(rope: RopeSpec, config: Mapping, env: Mapping, n_pairs: int, where: str) -> np.ndarray:
    """float32[n_pairs]: the inverse frequency of each rotary pair, scaled as the config says.

    Each step is the float32 operation transformers performs, in its order (numpy's float32 arithmetic
    with Python scalars rounds as torch's does), so the table is transformers' bit for bit; only the
    power is taken in float64 and rounded once, the best estimate of a float32 pow."""
    theta = float(env[rope.theta])
    if not math.isfinite(theta) or theta <= 1.0:
        raise ConfigError(f"{where}: rope_theta is {theta!r}; RoPE needs a base greater than 1")
    kind, p = scaling(rope, config, where)
    dim = 2 * n_pairs
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.float32(1.0) / np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)
    if kind == "default":
        return base
    if kind == "linear":
        return base / np.float32(p["factor"])
    if kind == "llama3":
        old, lo, hi, factor = (np.float32(p[k]) for k in ("original_max_position_embeddings", "low_freq_factor",
                                                          "high_freq_factor", "factor"))
        if hi <= lo:
            raise ConfigError(f"{where}: llama3 RoPE needs high_freq_factor ({hi}) > low_freq_factor ({lo})")
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = np.float32(2 * math.pi) / base
        scaled = np.where(wavelen > low_wavelen, base / factor, base)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (np.float32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    # the spec validated the type against ROPE_TYPES; a new one needs its formula here
    raise ConfigError(f"{where}: RoPE type {kind} has no formula in this runtime")
