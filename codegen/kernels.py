"""The kernel catalog: each Jinja2 template's parameters and launch geometry.

A template is a kernel *family*; the Plan instantiates it once per distinct combination of
dtypes, and the instance name spells every dtype (``gemv_wf16_xf32_yf32_cf32_af32``), as
CUTLASS names its operations. Pointer parameters take their dtype from the buffer bound to
them; ``role_fields`` take theirs from the policy role of the op. Grid and block are
expressions over the kernel's integer arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

# Parameter kinds. Pointer kinds bind buffers; scalar kinds bind expressions.
PTR_KINDS = ("in", "out", "inout")
INDEX_KINDS = ("index_in", "index_out", "index_inout")
SCALAR_KINDS = ("int", "float")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    short: str = ""           # letter used in the instance name (pointer params only)
    scale_of: str | None = None  # present only when the weight bound to `scale_of` is quantized


@dataclass(frozen=True)
class KernelFamily:
    template: str
    params: tuple[Param, ...]
    role_fields: tuple[str, ...]   # policy fields of the op's role that the kernel computes in
    grid: str
    block: str

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    @property
    def spec_params(self) -> tuple[Param, ...]:
        """Parameters a model spec must bind (scales are bound by the Plan)."""
        return tuple(p for p in self.params if p.scale_of is None)


# Role fields are spelled in instance names with these letters.
FIELD_SHORT = {"compute": "c", "accumulate": "a"}

GEMV_ROWS_PER_BLOCK = 8  # one warp per output row

FAMILIES: dict[str, KernelFamily] = {f.template: f for f in (
    KernelFamily("embedding_gather",
                 (Param("table", "in", "t"), Param("token", "index_in"), Param("out", "out", "o"), Param("hidden", "int")),
                 (), "cdiv(hidden, 256)", "256"),
    KernelFamily("rmsnorm",
                 (Param("x", "in", "x"), Param("gamma", "in", "g"), Param("y", "out", "y"),
                  Param("n", "int"), Param("eps", "float")),
                 ("compute", "accumulate"), "1", "256"),
    KernelFamily("gemv",
                 (Param("w", "in", "w"), Param("scale", "in", "s", scale_of="w"), Param("x", "in", "x"),
                  Param("y", "out", "y"), Param("rows", "int"), Param("cols", "int")),
                 ("compute", "accumulate"), f"cdiv(rows, {GEMV_ROWS_PER_BLOCK})", f"{32 * GEMV_ROWS_PER_BLOCK}"),
    KernelFamily("rope",
                 (Param("q", "inout", "q"), Param("k", "inout", "k"), Param("pos", "index_in"),
                  Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int"), Param("theta", "float")),
                 ("compute",), "n_heads + n_kv_heads", "head_dim // 2"),
    KernelFamily("kv_append",
                 (Param("k", "in", "k"), Param("v", "in", "v"), Param("k_cache", "out", "c"), Param("v_cache", "out", "d"),
                  Param("pos", "index_in"), Param("kv_dim", "int")),
                 (), "cdiv(kv_dim, 256)", "256"),
    KernelFamily("attention",
                 (Param("q", "in", "q"), Param("k_cache", "in", "k"), Param("v_cache", "in", "v"), Param("out", "out", "o"),
                  Param("pos", "index_in"), Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int")),
                 ("compute", "accumulate"), "n_heads", "128"),
    KernelFamily("silu_mul",
                 (Param("gate", "in", "g"), Param("up", "in", "u"), Param("y", "out", "y"), Param("n", "int")),
                 ("compute",), "cdiv(n, 256)", "256"),
    KernelFamily("residual_add",
                 (Param("x", "inout", "x"), Param("d", "in", "d"), Param("n", "int")),
                 ("compute",), "cdiv(n, 256)", "256"),
    KernelFamily("argmax",
                 (Param("logits", "in", "l"), Param("token", "index_out"), Param("n", "int")),
                 (), "1", "1024"),
    KernelFamily("advance_pos",
                 (Param("pos", "index_inout"),),
                 (), "1", "1"),
)}
