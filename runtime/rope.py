"""RoPE's per-pair inverse frequencies, as a checkpoint's config.json declares them.

Every RoPE op (the GPU kernels and the reference backend alike) reads one table, ``inv_freq[j]`` for
the pair (j, j + head_dim/2), and turns it by ``pos * inv_freq[j]``. Scaling therefore lives here,
once, as data: the model spec's ``rope`` section says which config keys hold it and which types
run; this module holds the formulas, written as transformers writes them
(``modeling_rope_utils``), evaluated in float64 and rounded once to float32.

The config spells the same thing several ways: transformers 4 writes ``rope_theta`` at the top and
``rope_scaling: {rope_type | type, factor, ...}`` (or null); transformers 5 writes
``rope_parameters: {rope_theta, rope_type, ...}``. Both are read; a type the spec does not list,
or a parameter it does not know, is refused by name rather than silently dropped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .target import ConfigError

# keys a scaling mapping may hold besides the type's own parameters
_COMMON = ("rope_type", "type", "rope_theta")


def scaling(rope: Mapping, config: Mapping, where: str) -> tuple[str, dict]:
    """(rope_type, its parameters) from the first of the spec's keys that holds a mapping."""
    for key in rope["keys"]:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} is {value!r}; expected a mapping {{rope_type, ...}} or null")
        kind = value.get("rope_type", value.get("type", "default"))
        types = rope["types"]
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


def inv_freq(rope: Mapping, config: Mapping, env: Mapping, n_pairs: int, where: str) -> np.ndarray:
    """float32[n_pairs]: the inverse frequency of each rotary pair, scaled as the config says."""
    theta = float(env[rope["theta"]])
    if not math.isfinite(theta) or theta <= 1.0:
        raise ConfigError(f"{where}: rope_theta is {theta!r}; RoPE needs a base greater than 1")
    kind, p = scaling(rope, config, where)
    dim = 2 * n_pairs
    base = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if kind == "default":
        out = base
    elif kind == "linear":
        out = base / p["factor"]
    elif kind == "llama3":
        old = p["original_max_position_embeddings"]
        lo, hi, factor = p["low_freq_factor"], p["high_freq_factor"], p["factor"]
        if hi <= lo:
            raise ConfigError(f"{where}: llama3 RoPE needs high_freq_factor ({hi}) > low_freq_factor ({lo})")
        wavelen = 2 * math.pi / base
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (1 - smooth) * base / factor + smooth * base
        out = np.where(wavelen < old / hi, base, np.where(wavelen > old / lo, base / factor, medium))
    else:   # the spec validated the type against ROPE_TYPES; a new one needs its formula here
        raise ConfigError(f"{where}: RoPE type {kind} has no formula in this runtime")
    return out.astype(np.float32)
