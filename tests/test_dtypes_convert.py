"""Exactness of the numpy dtype conversions at the bottom of codegen/dtypes.py.

The weight loader packs bytes with these helpers and the numpy reference decoder rounds
with them wherever a kernel narrows a value, so a single wrong rounding shows up later
as a kernel-vs-reference mismatch that looks like a kernel bug. Every check here is
against code we did not write (numpy's float16 casts, ml_dtypes' bfloat16 and
float8_e4m3fn) or against cases worked out by hand: exhaustively over all 16- and 8-bit
patterns, and over a float32 sample built from every rounding boundary of each format
(each midpoint between neighbours, one float32 ulp either side, subnormals, overflow).
"""
from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest

from dtypeforge.codegen.dtypes import (
    DTYPES,
    bf16_bits_to_f32,
    dequantize_per_output_channel,
    f16_bits_to_f32,
    f32_to_bf16_bits,
    f32_to_f16_bits,
    f32_to_fp8e4m3_bits,
    fp8e4m3_bits_to_f32,
    from_storage,
    quantize_per_output_channel,
    round_to,
    to_storage,
)

FLOAT_FORMATS = ("f16", "bf16", "fp8e4m3")
ENCODE = {"f16": f32_to_f16_bits, "bf16": f32_to_bf16_bits, "fp8e4m3": f32_to_fp8e4m3_bits}
DECODE = {"f16": f16_bits_to_f32, "bf16": bf16_bits_to_f32, "fp8e4m3": fp8e4m3_bits_to_f32}
BITS = {"f16": np.uint16, "bf16": np.uint16, "fp8e4m3": np.uint8}
REF_DTYPE = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "fp8e4m3": ml_dtypes.float8_e4m3fn}
SIGN = {"f16": 0x8000, "bf16": 0x8000, "fp8e4m3": 0x80}
# The value one step above the largest finite one, had the exponent range continued:
# the midpoint to it is where rounding starts to overflow (or, for fp8, to saturate).
NEXT_ABOVE_MAX = {"f16": 2.0**16, "bf16": 2.0**128, "fp8e4m3": 480.0}


def f32(hex_or_value) -> np.float32:
    v = float.fromhex(hex_or_value) if isinstance(hex_or_value, str) else float(hex_or_value)
    out = np.float32(v)
    assert np.isinf(out) or float(out) == v or np.isnan(v), f"{hex_or_value} is not a float32"
    return out


def f32_from_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def all_patterns(name: str) -> np.ndarray:
    return np.arange(1 << (8 * np.dtype(BITS[name]).itemsize), dtype=np.uint32).astype(BITS[name])


def is_nan_bits(name: str, bits: np.ndarray) -> np.ndarray:
    return np.isnan(bits.view(REF_DTYPE[name]).astype(np.float32))


def reference_encode(name: str, x: np.ndarray) -> np.ndarray:
    """Bits from the independent libraries; fp8 inputs are clamped to +-448 first because
    ml_dtypes does not saturate (a clamp commutes with RNE here: 448's mantissa is even,
    so everything up to the 464 tie rounds to it anyway)."""
    if name == "fp8e4m3":
        x = np.clip(x, np.float32(-448), np.float32(448))
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(REF_DTYPE[name]).view(BITS[name])


def assert_same_float32(ours: np.ndarray, ref: np.ndarray) -> None:
    """Bit-identical where not NaN (so -0 != +0); NaN exactly where ref is NaN, same sign."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    bad = np.flatnonzero(ours.view(np.uint32)[~nan] != ref.view(np.uint32)[~nan])
    assert bad.size == 0, (
        f"{bad.size} mismatches, first inputs {ref[~nan][bad[:5]]} -> ours {ours[~nan][bad[:5]]}")
    np.testing.assert_array_equal(np.signbit(ours[nan]), np.signbit(ref[nan]))


def assert_encodes_like_reference(name: str, x: np.ndarray) -> None:
    ours = ENCODE[name](x)
    assert ours.dtype == BITS[name] and ours.shape == x.shape
    ref = reference_encode(name, x)
    nan = np.isnan(x)
    bad = np.flatnonzero(ours[~nan] != ref[~nan])
    assert bad.size == 0, (
        f"{name}: {bad.size} mismatches, first inputs {x[~nan][bad[:5]].tolist()} "
        f"(bits {[hex(v) for v in x[~nan][bad[:5]].view(np.uint32)]}) -> ours "
        f"{[hex(v) for v in ours[~nan][bad[:5]]]}, reference {[hex(v) for v in ref[~nan][bad[:5]]]}")
    assert is_nan_bits(name, ours[nan]).all()
    np.testing.assert_array_equal(ours[nan] & SIGN[name] != 0, np.signbit(x[nan]))


def boundary_sample(name: str) -> np.ndarray:
    """Every finite value of the format, every midpoint between neighbours (including
    0-to-min-subnormal and max-to-overflow), and the float32 neighbours of all of
    these, both signs, plus +-0, +-inf, NaNs and float32 extremes."""
    pos = np.sort(DECODE[name](all_patterns(name)).astype(np.float64))
    pos = pos[np.isfinite(pos) & (pos >= 0)]
    grid = np.concatenate([pos, [NEXT_ABOVE_MAX[name]]])
    mids64 = (grid[:-1] + grid[1:]) / 2
    mids = mids64.astype(np.float32)
    assert (mids.astype(np.float64) == mids64).all(), "midpoints must be exact float32 ties"
    points = np.concatenate([pos.astype(np.float32), mids])
    up = np.nextafter(points, np.float32(np.inf))
    down = np.nextafter(points, np.float32(-np.inf))
    extremes = np.concatenate([
        f32_from_bits(0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000,
                      0x7F800001, 0x7FC00000, 0x7FFFFFFF),
        np.array([1e-30, 1e-10, 1e10, 1e30], np.float32)])
    s = np.concatenate([points, up, down, extremes])
    return np.concatenate([s, -s])


def random_sample(seed: int) -> np.ndarray:
    """All float32 classes uniformly by bit pattern, plus magnitudes log-uniform over
    every format's range with random low bits."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint32).view(np.float32)
    mags = np.exp2(rng.uniform(-140, 128, size=200_000)).astype(np.float32)
    signs = rng.choice(np.array([-1, 1], np.float32), size=mags.size)
    return np.concatenate([raw, mags * signs])


# ---------------------------------------------------------------- exhaustive patterns

@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_decode_matches_reference_for_every_pattern(name):
    b = all_patterns(name)
    with np.errstate(invalid="ignore"):
        ref = b.view(REF_DTYPE[name]).astype(np.float32)
    assert_same_float32(DECODE[name](b), ref)


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_every_pattern_round_trips(name):
    b = all_patterns(name)
    back = ENCODE[name](DECODE[name](b))
    nan = is_nan_bits(name, b)
    np.testing.assert_array_equal(back[~nan], b[~nan])
    assert is_nan_bits(name, back[nan]).all()
    np.testing.assert_array_equal(back[nan] & SIGN[name], b[nan] & SIGN[name])


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_nans_decode_quiet_and_quiet_nans_round_trip_with_payload(name):
    b = all_patterns(name)
    nan = b[is_nan_bits(name, b)]
    assert (DECODE[name](nan).view(np.uint32) & 0x00400000 != 0).all()
    quiet_bit = 0x0200 if name == "f16" else 0x0040
    quiet = nan[nan & quiet_bit != 0]
    np.testing.assert_array_equal(ENCODE[name](DECODE[name](quiet)), quiet)


# ---------------------------------------------------------------- rounding vs references

@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_encode_matches_reference_on_every_rounding_boundary(name):
    assert_encodes_like_reference(name, boundary_sample(name))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_encode_matches_reference_on_random_sample(name):
    assert_encodes_like_reference(name, random_sample(seed=len(name)))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_encode_keeps_shape_and_layout(name):
    x = np.float32(1.5) * np.arange(24, dtype=np.float32).reshape(4, 6)
    for arr in (x, x.T, x[:, ::2], np.float32(3.0), np.array(-2.0, np.float32)):
        ours = ENCODE[name](arr)
        assert ours.shape == np.shape(arr)
        np.testing.assert_array_equal(ours, reference_encode(name, np.asarray(arr)))


# ---------------------------------------------------------------- hand-worked cases

F16_CASES = [
    ("0x1.002p0", 0x3C00),       # 1 + 2**-11: tie between 1 and 1 + 2**-10 -> even (1)
    ("0x1.006p0", 0x3C02),       # 1 + 3 * 2**-11: tie -> even (1 + 2**-9)
    ("0x1.002002p0", 0x3C01),    # just above the tie
    ("0x1.001ffep0", 0x3C00),    # just below the tie
    ("-0x1.002p0", 0xBC00),
    ("0x1p-24", 0x0001),         # smallest subnormal
    ("0x1p-25", 0x0000),         # half of it: tie -> even (0)
    ("0x1.000002p-25", 0x0001),  # just above that tie
    ("0x1.8p-24", 0x0002),       # 1.5 subnormal steps: tie -> even (2)
    ("0x1.ff8p-15", 0x03FF),     # largest subnormal
    ("0x1.ffcp-15", 0x0400),     # tie between it and the smallest normal -> even (normal)
    ("0x1p-14", 0x0400),
    ("-0x1p-26", 0x8000),        # underflows to -0
    ("0x1p-149", 0x0000),        # float32 subnormal
    (65504.0, 0x7BFF),           # largest finite
    ("0x1.ffdffep15", 0x7BFF),   # just below 65520
    (65520.0, 0x7C00),           # tie between 65504 (odd) and 2**16 -> even: overflows to inf
    (-65520.0, 0xFC00),
    (1e9, 0x7C00),
    (float("inf"), 0x7C00),
    (float("-inf"), 0xFC00),
    (0.0, 0x0000),
    (-0.0, 0x8000),
]

BF16_CASES = [
    ("0x1.01p0", 0x3F80),        # 1 + 2**-8: tie -> even (1)
    ("0x1.03p0", 0x3F82),        # 1 + 3 * 2**-8: tie -> even (1 + 2**-6)
    ("0x1.010002p0", 0x3F81),    # just above the tie
    ("0x1.00fffep0", 0x3F80),    # just below the tie
    ("-0x1.03p0", 0xBF82),
    ("0x1.fep127", 0x7F7F),      # largest finite
    ("0x1.fefffep127", 0x7F7F),  # just below the overflow tie
    ("0x1.ffp127", 0x7F80),      # tie between max (odd) and 2**128 -> even: inf
    ("0x1.fffffep127", 0x7F80),  # float32 max
    ("-0x1.ffp127", 0xFF80),
    ("0x1p-133", 0x0001),        # smallest bf16 subnormal (a float32 subnormal)
    ("0x1p-134", 0x0000),        # half of it: tie -> even (0)
    ("0x1.8p-133", 0x0002),      # 1.5 steps: tie -> even (2)
]
BF16_BIT_CASES = [               # float32 subnormals are easier to write as bits
    (0x00008001, 0x0001),        # just above half the smallest subnormal
    (0x00007FFF, 0x0000),
    (0x007F8000, 0x0080),        # tie between largest subnormal (odd) and smallest normal
    (0x007F7FFF, 0x007F),
    (0x00800000, 0x0080),        # float32 smallest normal
    (0x80000000, 0x8000),
    (0x3F808000, 0x3F80),        # 1 + 2**-8 again, as bits
    (0xFF800000, 0xFF80),        # -inf
]

FP8_CASES = [
    (1.0, 0x38),
    ("0x1.2p0", 0x39),           # 1.125, exact
    ("0x1.1p0", 0x38),           # 1 + 2**-4: tie -> even (1)
    ("0x1.3p0", 0x3A),           # 1 + 3 * 2**-4: tie -> even (1.25)
    ("0x1.100002p0", 0x39),      # just above the tie
    ("0x1p-9", 0x01),            # smallest subnormal
    ("0x1p-10", 0x00),           # half of it: tie -> even (0)
    ("0x1.000002p-10", 0x01),
    ("0x1.8p-9", 0x02),          # 1.5 steps: tie -> even (2)
    ("-0x1p-10", 0x80),
    ("0x1.cp-7", 0x07),          # largest subnormal 7 * 2**-9
    ("0x1.ep-7", 0x08),          # tie between it (odd) and the smallest normal -> normal
    ("0x1p-6", 0x08),
    (416.0, 0x7D),
    (431.0, 0x7D),
    (432.0, 0x7E),               # tie between 416 (odd) and 448 -> even (448)
    (448.0, 0x7E),               # largest finite
    (449.0, 0x7E),               # saturates (rounds to 448 anyway)
    (464.0, 0x7E),               # tie between 448 (even) and 480 -> 448
    (465.0, 0x7E),               # would round to 480: saturates
    (480.0, 0x7E),
    (1e9, 0x7E),
    ("0x1.fffffep127", 0x7E),
    (float("inf"), 0x7E),        # no inf in E4M3fn: saturates too
    (float("-inf"), 0xFE),
    (-464.0, 0xFE),
    (-1e9, 0xFE),
    (0.0, 0x00),
    (-0.0, 0x80),
]


@pytest.mark.parametrize("value,expected", F16_CASES)
def test_f16_hand_cases(value, expected):
    got = f32_to_f16_bits(np.array([f32(value)]))
    assert got.dtype == np.uint16 and hex(got[0]) == hex(expected)


@pytest.mark.parametrize("value,expected", BF16_CASES)
def test_bf16_hand_cases(value, expected):
    got = f32_to_bf16_bits(np.array([f32(value)]))
    assert got.dtype == np.uint16 and hex(got[0]) == hex(expected)


@pytest.mark.parametrize("bits,expected", BF16_BIT_CASES)
def test_bf16_hand_bit_cases(bits, expected):
    assert hex(f32_to_bf16_bits(f32_from_bits(bits))[0]) == hex(expected)


@pytest.mark.parametrize("value,expected", FP8_CASES)
def test_fp8_hand_cases(value, expected):
    got = f32_to_fp8e4m3_bits(np.array([f32(value)]))
    assert got.dtype == np.uint8 and hex(got[0]) == hex(expected)


NAN_BITS = (0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FFF8000,
            0xFFC00000, 0xFF800001, 0xFFFFFFFF)


def test_nan_encodes_to_quiet_nan_with_sign():
    x = f32_from_bits(*NAN_BITS)
    neg = np.signbit(x)
    h = f32_to_f16_bits(x)      # 0x7F800001 would truncate to inf; must stay NaN
    assert ((h & 0x7C00 == 0x7C00) & (h & 0x0200 != 0)).all(), [hex(v) for v in h]
    np.testing.assert_array_equal(h & 0x8000 != 0, neg)
    # bf16: the naive "add 0x7FFF and truncate" turns 0x7FFFFFFF into -0 and 0x7F800001
    # into inf; both must stay NaN.
    b = f32_to_bf16_bits(x)
    assert ((b & 0x7F80 == 0x7F80) & (b & 0x0040 != 0)).all(), [hex(v) for v in b]
    np.testing.assert_array_equal(b & 0x8000 != 0, neg)
    np.testing.assert_array_equal(f32_to_fp8e4m3_bits(x), np.where(neg, 0xFF, 0x7F).astype(np.uint8))


def test_hand_decodes():
    def dec(name, *bits):
        return DECODE[name](np.array(bits, BITS[name]))
    np.testing.assert_array_equal(
        dec("fp8e4m3", 0x7E, 0xFE, 0x01, 0x08, 0x38, 0x07),
        np.array([448, -448, 2.0**-9, 2.0**-6, 1.0, 7 * 2.0**-9], np.float32))
    assert np.isnan(dec("fp8e4m3", 0x7F, 0xFF)).all()
    assert np.signbit(dec("fp8e4m3", 0xFF, 0x80)).all()
    np.testing.assert_array_equal(
        dec("f16", 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00),
        np.array([2.0**-24, 1023 * 2.0**-24, 2.0**-14, 65504, np.inf, -np.inf], np.float32))
    np.testing.assert_array_equal(
        dec("bf16", 0x0001, 0x7F7F, 0x3F81).view(np.uint32),
        np.array([0x00010000, 0x7F7F0000, 0x3F810000], np.uint32))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_bit_functions_refuse_wrong_dtypes(name):
    with pytest.raises(ValueError, match="float32"):
        ENCODE[name](np.array([1.0]))                     # float64 would round twice
    with pytest.raises(ValueError, match="bit patterns"):
        DECODE[name](np.array([1], np.int64))


# ---------------------------------------------------------------- public wrappers

@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_to_storage_from_storage_round_to(name):
    x = boundary_sample(name).reshape(2, -1)
    stored = to_storage(x, name)
    assert stored.dtype == DTYPES[name].np_dtype and stored.shape == x.shape
    np.testing.assert_array_equal(stored.view(BITS[name]), ENCODE[name](x))
    with np.errstate(invalid="ignore"):
        ref_values = reference_encode(name, x).view(REF_DTYPE[name]).astype(np.float32)
    assert_same_float32(from_storage(stored, name), ref_values)
    rounded = round_to(x, name)
    assert_same_float32(rounded, ref_values)
    assert_same_float32(round_to(rounded, name), rounded)        # idempotent


def test_f32_is_an_exact_copy():
    x = f32_from_bits(0x7F800001, 0x80000000, 0x00000001, 0x3F800001)
    for out in (to_storage(x, "f32"), from_storage(x, "f32"), round_to(x, "f32")):
        assert out.dtype == np.float32 and not np.shares_memory(out, x)
        np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))


def test_inputs_that_float32_holds_exactly_are_accepted():
    h = np.array([1.5, -2.0**-24, 65504], np.float16)
    assert_same_float32(round_to(h, "f32"), h.astype(np.float32))
    np.testing.assert_array_equal(to_storage(h, "f16").view(np.uint16), h.view(np.uint16))
    q = np.array([-127, 0, 127], np.int8)
    np.testing.assert_array_equal(from_storage(q, "int8"), np.array([-127, 0, 127], np.float32))
    assert from_storage(q, "int8").dtype == np.float32


def test_wrapper_errors():
    x = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="quantize_per_output_channel"):
        to_storage(x, "int8")
    with pytest.raises(ValueError, match="quantize_per_output_channel"):
        round_to(x, "int8")
    for fn in (to_storage, from_storage, round_to):
        with pytest.raises(ValueError, match="'f8'.*f32, f16, bf16, fp8e4m3, int8"):
            fn(x, "f8")
    with pytest.raises(ValueError, match="float32"):
        to_storage(np.ones(3), "f16")                        # float64: would round twice
    with pytest.raises(ValueError, match="bfloat16"):
        from_storage(np.ones(3, np.float16), "bf16")
    with pytest.raises(ValueError, match="int8"):
        from_storage(np.ones(3, np.uint8), "int8")


# ---------------------------------------------------------------- quantization

def weights(rows=64, cols=300, seed=0) -> np.ndarray:
    """Rows of very different magnitudes, some all-zero, some with a single outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-2, 2, size=(rows, 1))
    w[3] = 0
    w[rows - 1] = 0
    w[5, 7] = 40 * np.abs(w[5]).max()
    return w.astype(np.float32)


@pytest.mark.parametrize("scale_name", ["f32", "f16"])
def test_int8_error_within_half_a_step(scale_name):
    w = weights()
    q, s = quantize_per_output_channel(w, "int8", scale_name)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (w.shape[0],)
    assert q.min() >= -127
    deq = dequantize_per_output_channel(q, s, "int8")
    assert deq.dtype == np.float32
    # half a step, plus float32 rounding of w / scale and of q * scale (< 2**-16 steps)
    err = np.abs(w.astype(np.float64) - deq.astype(np.float64))
    assert (err <= s.astype(np.float64)[:, None] * (0.5 + 2.0**-16)).all()
    nonzero = np.abs(w).max(axis=1) > 0
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[nonzero], 127)   # row max -> +-127


@pytest.mark.parametrize("scale_name", ["f32", "f16"])
def test_fp8_relative_error(scale_name):
    w = weights(seed=1)
    q, s = quantize_per_output_channel(w, "fp8e4m3", scale_name)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    # the storage conversion inside is the saturating RNE one, checked against ml_dtypes
    np.testing.assert_array_equal(q.view(np.uint8), reference_encode("fp8e4m3", w / s[:, None]))
    deq = dequantize_per_output_channel(q, s, "fp8e4m3").astype(np.float64)
    w64, s64 = w.astype(np.float64), s.astype(np.float64)[:, None]
    normal = np.abs(w64) >= 2.0**-6 * s64
    slack = 1 + 2.0**-20                            # f16-rounded scale, float32 products
    assert (np.abs(w64 - deq)[normal] <= 2.0**-4 * np.abs(w64)[normal] * slack).all()
    # below the smallest normal: half the subnormal step 2**-9
    sub_bound = np.broadcast_to(2.0**-10 * s64 * slack, w.shape)
    assert (np.abs(w64 - deq)[~normal] <= sub_bound[~normal]).all()
    nonzero = np.abs(w).max(axis=1) > 0
    np.testing.assert_array_equal(np.abs(from_storage(q, "fp8e4m3")).max(axis=1)[nonzero], 448)


@pytest.mark.parametrize("storage", ["int8", "fp8e4m3"])
def test_scales_are_max_over_qmax_rounded_to_the_scale_dtype(storage):
    w = weights(seed=2)
    qmax = np.float32(127 if storage == "int8" else 448)
    amax = np.abs(w).max(axis=1)
    expect = np.where(amax > 0, amax / qmax, np.float32(1)).astype(np.float32)
    _, s32 = quantize_per_output_channel(w, storage, "f32")
    np.testing.assert_array_equal(s32, expect)
    _, s16 = quantize_per_output_channel(w, storage, "f16")
    np.testing.assert_array_equal(s16, expect.astype(np.float16).astype(np.float32))
    # what the caller stores is exactly what quantization used
    np.testing.assert_array_equal(from_storage(to_storage(s16, "f16"), "f16"), s16)


def test_quantization_uses_the_rounded_scale():
    # max|row| / 127 = 1 + 2**-12, which f16 rounds to 1.0; 100.51 / 1.0 rounds to 101,
    # 100.51 / (1 + 2**-12) = 100.486 to 100.
    w = np.array([[127 * (1 + 2.0**-12), 100.51]], np.float32)
    q32, s32 = quantize_per_output_channel(w, "int8", "f32")
    assert s32[0] == np.float32(1 + 2.0**-12) and q32.tolist() == [[127, 100]]
    q16, s16 = quantize_per_output_channel(w, "int8", "f16")
    assert s16[0] == 1.0 and q16.tolist() == [[127, 101]]


def test_int8_rounds_half_to_even():
    w = np.array([[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5]], np.float32)
    q, s = quantize_per_output_channel(w, "int8", "f32")
    assert s[0] == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126]]


@pytest.mark.parametrize("storage", ["int8", "fp8e4m3"])
def test_zero_rows_get_scale_one(storage):
    w = np.zeros((3, 5), np.float32)
    w[1, 2] = -0.5 * (127 if storage == "int8" else 448)     # scale 0.5, exact
    q, s = quantize_per_output_channel(w, storage, "f16")
    assert s.tolist() == [1.0, 0.5, 1.0]
    deq = dequantize_per_output_channel(q, s, storage)
    np.testing.assert_array_equal(deq, w)
    q0, s0 = quantize_per_output_channel(np.zeros((2, 0), np.float32), storage, "f32")
    assert q0.shape == (2, 0) and s0.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("storage", ["int8", "fp8e4m3"])
def test_quantize_is_deterministic_and_leaves_input_alone(storage):
    w = weights(seed=3)
    before = w.copy()
    q1, s1 = quantize_per_output_channel(w, storage, "f16")
    q2, s2 = quantize_per_output_channel(w.copy(), storage, "f16")
    assert q1.tobytes() == q2.tobytes() and s1.tobytes() == s2.tobytes()
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(
        dequantize_per_output_channel(q1, s1, storage), from_storage(q1, storage) * s1[:, None])


def test_quantize_errors():
    w = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="'f16'.*fp8e4m3, int8"):
        quantize_per_output_channel(w, "f16", "f32")
    with pytest.raises(ValueError, match="'bf16'.*f32, f16"):
        quantize_per_output_channel(w, "int8", "bf16")
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_output_channel(np.ones(4, np.float32), "int8", "f32")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_output_channel(np.array([[1, np.nan]], np.float32), "int8", "f32")
    with pytest.raises(ValueError, match=r"rows \[1\].*f16"):         # scale underflows f16
        quantize_per_output_channel(np.array([[1, 1], [1e-12, 0]], np.float32), "int8", "f16")
    with pytest.raises(ValueError, match=r"rows \[0\].*f16"):         # scale overflows f16
        quantize_per_output_channel(np.array([[1e10, 1]], np.float32), "int8", "f16")
    q, s = quantize_per_output_channel(w, "int8", "f32")
    with pytest.raises(ValueError, match="shapes"):
        dequantize_per_output_channel(q, s[:1], "int8")
    with pytest.raises(ValueError, match="int8"):
        dequantize_per_output_channel(q.view(np.uint8), s, "int8")
    with pytest.raises(ValueError, match="fp8e4m3, int8"):
        dequantize_per_output_channel(q, s, "f32")


# ---------------------------------------------------------------- speed

def test_embedding_sized_array_converts_fast():
    """49152 x 576 (SmolLM2's tied embedding): typically ~0.2 s per direction. The bound
    is loose so a busy machine passes; a per-element Python loop would take minutes."""
    x = (np.random.default_rng(0).standard_normal((49152, 576)) * 0.02).astype(np.float32)
    for name in FLOAT_FORMATS:
        t0 = time.perf_counter()
        stored = to_storage(x, name)
        t1 = time.perf_counter()
        from_storage(stored, name)
        t2 = time.perf_counter()
        assert t1 - t0 < 2.0 and t2 - t1 < 2.0, (name, t1 - t0, t2 - t1)
