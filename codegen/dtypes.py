"""The one table of dtypes dtypeforge knows, with exact numpy conversion helpers.

Every dtype name that appears in a spec, a Plan, a manifest or a packing table is a
key of ``DTYPES``; nothing else is accepted. The table also says what a dtype needs
from a device (``requires_*``), so device/policy compatibility is data, not branches.

The conversion helpers (bottom of the file) are shared by the weight loader and the
numpy reference decoder, so the bytes the loader packs and the values the reference
computes with are rounded by the same code.
"""
from __future__ import annotations

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

    @property
    def vec16(self) -> int:
        """Elements in one 16-byte vector load."""
        return 16 // self.itemsize


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
INDEX_CTYPE = "int"
INDEX_NP = np.dtype(np.int32)


def dtype(name: str) -> DType:
    return DTYPES[name]
