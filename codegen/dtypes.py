"""The one table of dtypes dtypeforge knows, with exact numpy conversion helpers.

Every dtype name that appears in a spec, a Plan, a manifest or a packing table is a
key of ``DTYPES``; nothing else is accepted. The table also says what a dtype needs
from a device (``requires_*``), so device/policy compatibility is data, not branches.

The conversion helpers (bottom of the file) are shared by the weight loader and the
numpy reference decoder, so the bytes the loader packs and the values the reference
computes with are rounded by the same code.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str            # spec/manifest spelling, also used in kernel names
    ctype: str           # CUDA C type
    itemsize: int        # bytes per element in device memory
    np_dtype: np.dtype   # numpy dtype of a packed host array
    quantized: bool      # needs a scale (policy `quant:`) when used as storage
    # device capability (specs/devices/*.yaml `capabilities:`) needed to use the dtype
    requires_as_storage: str | None   # to load and convert it at all
    requires_as_compute: str | None   # to do arithmetic in it (compute / accumulate)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("f32", "float", 4, np.dtype(np.float32), False, None, None),
        DType("f16", "__half", 2, np.dtype(np.float16), False, None, "native_f16_arith"),
        DType("bf16", "__nv_bfloat16", 2, np.dtype(ml_dtypes.bfloat16), False, None, "native_bf16_arith"),
        DType("fp8e4m3", "__nv_fp8_e4m3", 1, np.dtype(ml_dtypes.float8_e4m3fn), True, "fp8_convert", None),
        DType("int8", "int8_t", 1, np.dtype(np.int8), True, None, None),
    )
}

# Dtypes a policy may name for each field. Quantized formats are storage-only.
STORAGE_DTYPES = tuple(DTYPES)
ARITH_DTYPES = ("f32", "f16", "bf16")          # compute / accumulate / output
SCALE_DTYPES = ("f32", "f16")
QUANT_SCHEMES = ("per_output_channel",)        # symmetric, one scale per weight row

# Not a policy dtype: token ids and positions live in int32 device buffers.
INDEX_NP = np.dtype(np.int32)


def dtype(name: str) -> DType:
    return DTYPES[name]


# --------------------------------------------------------------------------------------
# Exact conversions, built from bit manipulation on uint32 views (plus one exactly
# rounded float32 add for subnormal results) rather than borrowed from numpy/ml_dtypes
# casts: the rounding must be exactly the GPU kernels' (`__float2half_rn`,
# `__float2bfloat16_rn`, `__nv_cvt_float_to_fp8(.., __NV_SATFINITE, __NV_E4M3)`), i.e.
# round-to-nearest-even, quiet NaNs, and a *saturating* fp8 conversion that no host
# library provides. tests/test_dtypes_convert.py cross-checks every result against
# numpy's float16 and ml_dtypes.
#
# Everything is vectorized. Encoding walks the input in blocks so its ~10 temporaries
# stay in cache (about 2x faster: ~0.2 s for a 49152 x 576 embedding on one idle core);
# decoding is a lookup in a table of every bit pattern's value.
# --------------------------------------------------------------------------------------

_U32 = np.uint32
_F32_INF_BITS = 0x7F800000
_BLOCK = 1 << 16


@dataclass(frozen=True)
class _Format:
    """A narrow binary float format, as the encoder needs it."""
    man_bits: int        # stored mantissa bits
    bias: int            # exponent bias
    top_bits: int        # largest magnitude encoding a conversion yields: inf, or max finite if saturating
    nan_bits: int        # quiet NaN magnitude; NaN payload bits that fit are OR-ed in
    sign_bit: int        # bit index of the sign
    bits_dtype: type


_F16 = _Format(10, 15, 0x7C00, 0x7E00, 15, np.uint16)
_BF16 = _Format(7, 127, 0x7F80, 0x7FC0, 15, np.uint16)
_FP8E4M3 = _Format(3, 7, 0x7E, 0x7F, 7, np.uint8)   # 0x7E = 448; 0x7F is the only NaN, no inf


def _as_f32(a) -> np.ndarray:
    """``a`` as float32 without rounding; wider inputs are refused (rounding twice,
    f64 -> f32 -> narrow, can differ from rounding once)."""
    a = np.asarray(a)
    if a.dtype != np.float32:
        if not np.can_cast(a.dtype, np.float32, "safe"):
            raise ValueError(
                f"expected float32 input (or a dtype float32 holds exactly), got {a.dtype}; "
                "cast it to float32 first if rounding twice is what you want")
        a = a.astype(np.float32)
    return a


def _as_bits(b, bits_dtype) -> np.ndarray:
    b = np.asarray(b)
    if b.dtype != bits_dtype:
        raise ValueError(f"expected a {np.dtype(bits_dtype)} array of bit patterns, got {b.dtype}")
    return b


def _encode(a, fmt: _Format) -> np.ndarray:
    a = _as_f32(a)
    flat = np.ascontiguousarray(a.reshape(-1)).view(_U32)
    out = np.empty(flat.size, fmt.bits_dtype)
    with np.errstate(invalid="ignore"):      # signalling NaNs in the subnormal-path add
        for i in range(0, flat.size, _BLOCK):
            out[i:i + _BLOCK] = _encode_block(flat[i:i + _BLOCK], fmt)
    return out.reshape(a.shape)


def _encode_block(u: np.ndarray, fmt: _Format) -> np.ndarray:
    """float32 bits -> ``fmt`` bits (as uint32), round-to-nearest-even."""
    sh = _U32(23 - fmt.man_bits)
    mag = u & _U32(0x7FFFFFFF)
    # Normal results (and too large ones): rebias the exponent, add just under half an ulp
    # plus the lowest kept bit (so exact ties go to even), truncate. A mantissa carry walks
    # into the exponent, and past the largest finite value into inf, by itself. For bf16
    # (float32's exponent range) this is exact for float32 subnormals too.
    r = (mag >> sh) & _U32(1)
    r += mag
    r += _U32((((fmt.bias - 127) << 23) + (1 << (22 - fmt.man_bits)) - 1) % 2**32)
    r >>= sh
    np.minimum(r, _U32(fmt.top_bits), out=r)
    if fmt.bias != 127:
        # Below the smallest normal 2**(1-bias): adding C = 2**(23 + 1 - bias - man_bits)
        # puts the sum in [C, 2C), whose float32 ulp is the format's subnormal step, so the
        # (IEEE, round-to-nearest-even) float32 addition rounds exactly as the format must,
        # and the sum's bits minus C's are the encoding (2**man_bits = smallest normal).
        # (Even with denormals-are-zero set this holds: float32 subnormal inputs round to
        # 0 in these formats anyway, and the sum is a normal float32.)
        c = np.float32(2.0 ** (24 - fmt.bias - fmt.man_bits))
        sub = (mag.view(np.float32) + c).view(_U32) - c.view(_U32)
        # Branch-free select (a masked copy mispredicts when the mask is ~random): the
        # sign of mag - smallest normal as an all-ones / all-zeros mask.
        below = ((mag - _U32((128 - fmt.bias) << 23)).view(np.int32) >> 31).view(_U32)
        sub ^= r
        sub &= below
        r ^= sub
    nan = mag > _U32(_F32_INF_BITS)
    if nan.any():
        r[nan] = _U32(fmt.nan_bits) | ((mag[nan] >> sh) & _U32((1 << fmt.man_bits) - 1))
    r |= (u >> _U32(31 - fmt.sign_bit)) & _U32(1 << fmt.sign_bit)
    return r


def _decode_formula(b: np.ndarray, fmt: _Format) -> np.ndarray:
    """``fmt`` bits (uint32) -> float32 bits, for formats whose subnormals are float32
    normals (f16, fp8): those are built by adding to the exponent field of the float32
    of the mantissa integer, exact with no float arithmetic (so no flush-to-zero risk)."""
    m_mask = (1 << fmt.man_bits) - 1
    e = (b >> _U32(fmt.man_bits)) & _U32((1 << (fmt.sign_bit - fmt.man_bits)) - 1)
    m = b & _U32(m_mask)
    normal = ((e + _U32(127 - fmt.bias)) << _U32(23)) | (m << _U32(23 - fmt.man_bits))
    subnormal = m.astype(np.float32).view(_U32) + _U32(((1 - fmt.bias - fmt.man_bits) << 23) % 2**32)
    mag = np.where(e == 0, np.where(m == 0, _U32(0), subnormal), normal)
    return mag | ((b >> _U32(fmt.sign_bit)) << _U32(31))


def _build_decode_table(name: str) -> np.ndarray:
    """float32 value of every bit pattern of ``name``, so decoding is one table lookup."""
    if name == "bf16":
        # bf16 is the top half of a float32; only NaNs need their quiet bit set.
        u = np.arange(1 << 16, dtype=_U32) << _U32(16)
        u[(u & _U32(0x7FFFFFFF)) > _U32(_F32_INF_BITS)] |= _U32(0x400000)
    elif name == "f16":
        b = np.arange(1 << 16, dtype=_U32)
        u = _decode_formula(b, _F16)
        m = b & _U32(0x3FF)
        special = (b & _U32(0x7C00)) == _U32(0x7C00)        # inf, or NaN with payload m
        u[special] = (u[special] & _U32(0x80000000)) | _U32(_F32_INF_BITS) | (m[special] << _U32(13))
        u[special & (m != 0)] |= _U32(0x400000)
    else:
        b = np.arange(1 << 8, dtype=_U32)
        u = _decode_formula(b, _FP8E4M3)
        nan = (b & _U32(0x7F)) == _U32(_FP8E4M3.nan_bits)
        u[nan] = (u[nan] & _U32(0x80000000)) | _U32(0x7FC00000)
    table = u.view(np.float32)
    table.flags.writeable = False
    return table


_DECODE_TABLES = {name: _build_decode_table(name) for name in ("f16", "bf16", "fp8e4m3")}


def f32_to_f16_bits(a) -> np.ndarray:
    """IEEE binary16 bits of float32 ``a``: RNE, overflow to +-inf, subnormals, -0 kept,
    NaN -> quiet NaN with its sign and top payload bits."""
    return _encode(a, _F16)


def f16_bits_to_f32(b) -> np.ndarray:
    """float32 value of binary16 bits (exact); NaNs come back quiet, payload kept."""
    return _DECODE_TABLES["f16"][_as_bits(b, np.uint16)]


def f32_to_bf16_bits(a) -> np.ndarray:
    """bfloat16 bits of float32 ``a``: RNE, overflow to +-inf, subnormals, -0 kept,
    NaN -> quiet NaN (never rounded into inf or across the sign bit)."""
    return _encode(a, _BF16)


def bf16_bits_to_f32(b) -> np.ndarray:
    """float32 value of bfloat16 bits (exact); NaNs come back quiet, payload kept."""
    return _DECODE_TABLES["bf16"][_as_bits(b, np.uint16)]


def f32_to_fp8e4m3_bits(a) -> np.ndarray:
    """E4M3fn bits of float32 ``a``, saturating: RNE, then anything beyond +-448
    (+-inf included) becomes +-448; NaN -> NaN with its sign; subnormals down to 2**-9."""
    return _encode(a, _FP8E4M3)


def fp8e4m3_bits_to_f32(b) -> np.ndarray:
    """float32 value of E4M3fn bits (exact); 0x7F / 0xFF decode to quiet NaN."""
    return _DECODE_TABLES["fp8e4m3"][_as_bits(b, np.uint8)]


_BIT_CODECS = {  # float formats held as bit patterns: (encode, decode, bits dtype)
    "f16": (f32_to_f16_bits, f16_bits_to_f32, np.uint16),
    "bf16": (f32_to_bf16_bits, bf16_bits_to_f32, np.uint16),
    "fp8e4m3": (f32_to_fp8e4m3_bits, fp8e4m3_bits_to_f32, np.uint8),
}


def _check_name(name: str, allowed, what: str) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(allowed)}")


def to_storage(a_f32, name: str) -> np.ndarray:
    """float32 values -> a host array of ``DTYPES[name].np_dtype`` (RNE; fp8 saturates).
    int8 is refused: it needs a scale, use ``quantize_per_output_channel``."""
    _check_name(name, STORAGE_DTYPES, "storage dtype")
    if name == "int8":
        raise ValueError("int8 needs a scale: use quantize_per_output_channel")
    a = _as_f32(a_f32)
    if name == "f32":
        return a.copy()
    encode, _, _ = _BIT_CODECS[name]
    return encode(a).view(DTYPES[name].np_dtype)


def from_storage(arr, name: str) -> np.ndarray:
    """A host array of ``DTYPES[name].np_dtype`` -> its exact float32 values."""
    _check_name(name, STORAGE_DTYPES, "storage dtype")
    arr = np.asarray(arr)
    want = DTYPES[name].np_dtype
    if arr.dtype != want:
        raise ValueError(f"from_storage(..., {name!r}) expects a {want} array, got {arr.dtype}")
    if name in ("f32", "int8"):
        return arr.astype(np.float32)
    _, decode, bits_dtype = _BIT_CODECS[name]
    return decode(arr.view(bits_dtype))


def round_to(a_f32, name: str) -> np.ndarray:
    """float32 ``a_f32`` after a round trip through dtype ``name`` (a copy for f32): the
    reference decoder's rounding point wherever a kernel narrows a value to ``name``."""
    return from_storage(to_storage(a_f32, name), name)


QUANT_STORAGE_DTYPES = tuple(n for n, d in DTYPES.items() if d.quantized)
_QUANT_MAX = {"int8": 127.0, "fp8e4m3": 448.0}


def quantize_per_output_channel(w_f32, storage_name: str, scale_name: str):
    """Symmetric per-row quantization of a [rows, cols] float32 weight.

    scale = max|row| / (127 for int8, 448 for fp8e4m3), 1.0 for an all-zero row, rounded
    to ``scale_name`` *before* quantizing, so that ``from_storage(q) * stored scale`` is
    what the row was quantized against. int8: q = rint(w / scale) (half to even) clipped
    to [-127, 127]; fp8e4m3: q = saturating RNE of w / scale.
    Returns (q as ``DTYPES[storage_name].np_dtype``, scales as float32 values).

    With f16 scales, a row whose scale is an f16 subnormal (max|row| below about
    127 * 2**-14 for int8, 448 * 2**-14 for fp8) gets a coarsely rounded scale, and its
    largest elements clip by up to that rounding error.
    """
    _check_name(storage_name, QUANT_STORAGE_DTYPES, "quantized storage dtype")
    _check_name(scale_name, SCALE_DTYPES, "scale dtype")
    w = _as_f32(w_f32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [rows, cols] weight, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains inf or NaN; per-row scales would be meaningless")
    amax = np.max(np.abs(w), axis=1, initial=np.float32(0))
    scales = np.where(amax > 0, amax / np.float32(_QUANT_MAX[storage_name]), np.float32(1))
    scales = round_to(scales, scale_name)
    bad = np.flatnonzero((scales == 0) | np.isinf(scales))
    if bad.size:
        raise ValueError(
            f"rows {bad[:8].tolist()}{' ...' if bad.size > 8 else ''}: scale max|row|/"
            f"{_QUANT_MAX[storage_name]:g} underflows or overflows {scale_name}")
    x = w / scales[:, None]
    if storage_name == "int8":
        q = np.clip(np.rint(x), -127, 127).astype(np.int8)
    else:
        q = to_storage(x, storage_name)
    return q, scales


def dequantize_per_output_channel(q, scales_f32, storage_name: str) -> np.ndarray:
    """float32 ``from_storage(q) * scale`` per row, the product the kernels compute."""
    _check_name(storage_name, QUANT_STORAGE_DTYPES, "quantized storage dtype")
    values = from_storage(q, storage_name)
    scales = _as_f32(scales_f32)
    if values.ndim != 2 or scales.shape != (values.shape[0],):
        raise ValueError(f"expected q [rows, cols] and scales [rows], got shapes {values.shape} and {scales.shape}")
    return values * scales[:, None]


# --------------------------------------------------------------------------------------
# Range: which magnitudes a storage dtype keeps finite, by the conversions above.
# --------------------------------------------------------------------------------------

def max_finite(name: str) -> float:
    """Largest finite magnitude of storage dtype ``name`` (int8: 127, its symmetric range)."""
    _check_name(name, STORAGE_DTYPES, "storage dtype")
    if name == "int8":
        return _QUANT_MAX["int8"]
    return float(ml_dtypes.finfo(DTYPES[name].np_dtype).max)


@functools.cache
def overflow_threshold(name: str) -> float:
    """Smallest float32 magnitude that ``to_storage(.., name)`` turns into inf.

    Values a little above ``max_finite`` round back to it (RNE: up to half an ulp past it,
    the tie going to inf, whose mantissa is even), so the limit is not the max itself. It is
    found by bisection over float32 bit patterns with the conversion, so it cannot disagree
    with it. inf where no finite value overflows: f32, and fp8e4m3 (saturating, and only
    ever stored with a scale)."""
    _check_name(name, STORAGE_DTYPES, "storage dtype")
    if name == "int8":
        raise ValueError("int8 is only stored with a scale; its range is the scale's (see storage_holds)")

    def overflows(bits: int) -> bool:
        return bool(np.isinf(round_to(np.array([bits], _U32).view(np.float32), name))[0])

    lo = int(np.array([max_finite(name)], np.float32).view(_U32)[0])   # the max converts to itself
    hi = _F32_INF_BITS
    if not overflows(hi):
        return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if overflows(mid) else (mid, hi)
    return float(np.array([hi], _U32).view(np.float32)[0])


def storage_holds(max_abs: float, storage: str, scale: str | None = None) -> bool:
    """Whether finite float32 weights of largest magnitude ``max_abs`` pack into ``storage``
    without overflow: below its overflow threshold, or, quantized, when the per-row scale
    max_abs / (127 or 448) stays finite in ``scale`` (what quantize_per_output_channel needs)."""
    _check_name(storage, STORAGE_DTYPES, "storage dtype")
    if not DTYPES[storage].quantized:
        return max_abs < overflow_threshold(storage)
    if scale is None:
        raise ValueError(f"{storage} is stored with a scale: pass its dtype")
    _check_name(scale, SCALE_DTYPES, "scale dtype")
    s = np.array([max_abs], np.float32) / np.float32(_QUANT_MAX[storage])
    return bool(np.isfinite(round_to(s, scale))[0])
