"""The kernel catalog: each Jinja2 template's parameters and launch geometry.

A template is a kernel *family*; the Plan instantiates it once per distinct combination of
dtypes, and the instance name spells every dtype (``gemv_wf16_xf32_yf32_cf32_af32``), as
CUTLASS names its operations. Pointer parameters take their dtype from the buffer bound to
them; ``role_fields`` take theirs from the policy role of the op. Grid and block are
expressions over the kernel's integer arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

# Parameter kinds. Pointer kinds bind buffers; the scalar kinds "int" and "float" bind expressions.
# "workspace" is the kernel's own scratch in global memory (KernelFamily.workspace bytes, zeroed at
# allocation, left zeroed where the kernel keeps counters there): the runtime binds it, not the spec.
# "prefetch" binds a packed weight the kernel never reads, only asks the L2 to fetch (the next GEMV's,
# while this kernel leaves the memory system idle); its size in KiB goes to the `bytes_of` int after it.
PTR_KINDS = ("in", "out", "inout")
WORKSPACE = "workspace"
PREFETCH = "prefetch"
INDEX_KINDS = ("index_in", "index_out", "index_inout")


# The C declaration of a parameter of each kind ({t}: the ctype of the dtype bound to it): every
# kernel signature is rendered from these and the family's parameter list, in one place.
C_DECL = {"in": "const {t}* __restrict__ {n}", "out": "{t}* __restrict__ {n}", "inout": "{t}* __restrict__ {n}",
          "index_in": "const int* __restrict__ {n}", "index_out": "int* __restrict__ {n}",
          "index_inout": "int* __restrict__ {n}", "int": "int {n}", "float": "float {n}",
          WORKSPACE: "unsigned char* __restrict__ {n}", PREFETCH: "const void* __restrict__ {n}"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    short: str = ""           # its letter(s) in the instance name (pointer params only): OPERAND_LETTERS
    scale_of: str | None = None  # present only when the weight bound to `scale_of` is quantized
    kib_of: str | None = None    # bound by the Plan: whole KiB of the weight bound to this PREFETCH param


@dataclass(frozen=True)
class Variant:
    """A second entry point of a family's template (``<instance>_<suffix>``), same parameters, that the
    runtime launches instead, with `grid`, when every int argument in `at_most` is within its bound:
    a special case compiled on its own, so the general kernel's code does not slow it down."""
    suffix: str
    at_most: tuple[tuple[str, int | str], ...]   # a str bound is a tuning placeholder, an int once planned
    grid: str


@dataclass(frozen=True)
class KernelFamily:
    template: str
    params: tuple[Param, ...]
    # role slot -> policy fields the kernel computes in. "" is the op's main role (`role:` in the
    # model spec); a fused kernel also has e.g. "norm" (`norm_role:`) for its RMSNorm prologue.
    slots: dict[str, tuple[str, ...]]
    grid: str
    block: str
    smem_elems: str = "0"       # dynamic shared memory, in f32 elements (staged input vector, norm weight)
    # The kernel loops grid-stride over its rows, so any grid is correct: the runtime may launch fewer
    # blocks than `grid` (one full wave of the GPU) and each warp then streams several rows.
    grid_stride: bool = False
    workspace: str = "0"        # bytes of the WORKSPACE parameter (expression over the kernel's int args)
    # upper bounds on int arguments that the CUDA template sizes arrays by at compile time; the runtime
    # refuses a model beyond one before launching (the reference backend has no such bound)
    limits: tuple[tuple[str, int], ...] = ()
    variants: tuple[Variant, ...] = ()
    # dynamic shared memory in bytes when a device header sizes it (an expression; `{itemsize_<param>}`
    # is the bytes per element of the dtype bound to that pointer parameter); else smem_elems
    smem_bytes: str | None = None
    # role fields a CUDA template computes in one dtype only, {field: dtype} of its main role (the prefill
    # GEMMs sum in tensor-core f32 accumulators); the reference backend takes any
    cuda_fixed: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    @property
    def spec_params(self) -> tuple[Param, ...]:
        """Parameters a model spec must bind (scales and prefetch sizes are bound by the Plan, the workspace
        by the runtime)."""
        return tuple(p for p in self.params if p.scale_of is None and p.kib_of is None and p.kind != WORKSPACE)

    @property
    def role_fields(self) -> tuple[str, ...]:
        """Keys of the kernel's role dtypes: "compute", "norm.output", ..."""
        return tuple(f"{slot}.{f}" if slot else f for slot, fields in self.slots.items() for f in fields)


# One name grammar for every family: each operand letter means one thing everywhere (docs/architecture.md
# has the table), and none is a field or slot letter, so a name reads without knowing its family.
OPERAND_LETTERS = {"t": "embedding table", "w": "weight", "s": "per-output-channel scale of the weight",
                   "g": "RMSNorm gain (gamma)", "f": "RoPE inverse frequencies", "x": "input vector",
                   "u": "second input vector (SwiGLU's up)", "y": "output vector", "h": "hidden state updated in place",
                   "d": "delta added to the hidden state", "q": "query", "k": "new key", "v": "new value",
                   "kc": "key cache", "vc": "value cache", "l": "logits"}
# Role fields are spelled in instance names as slot letter + field letter: c, a, o, nc, rc, ...
SLOT_SHORT = {"": "", "norm": "n", "rope": "r", "act": "e"}
FIELD_SHORT = {"compute": "c", "accumulate": "a", "output": "o"}


def field_short(key: str) -> str:
    slot, _, fld = key.rpartition(".")
    return SLOT_SHORT[slot] + FIELD_SHORT[fld]


WARPS = 8          # warps per block of the row-parallel kernels: one warp per output row (or rope pair)
# The attention block's size is the device's tuning.attn_threads, and so is its split: each of its warps
# scores four chunks of 8 positions per split, so ATTN_SPLIT positions per block ("{attn_threads}" in a
# family's expressions is filled in by the Plan from the device spec).
ATTN_SPLIT = "{attn_threads}"
ATTN_MAX_HEAD_DIM = 256  # attention's per-block arrays (q, each warp's output) hold this many dims
_GEMV = (Param("w", "in", "w"), Param("scale", "in", "s", scale_of="w"))
# ---- batched prefill: `m` token rows per launch (the spec binds it to `tokens`)
GEMM_THREADS = 256       # dtf/gemm.cuh's block: 8 warps over a {gemm_bm} x {gemm_bn} tile of the output (the family's
                         # tile in the device spec's tuning.gemm_tiles)
PREFILL_ATTN_BQ = 64     # dtf/prefill_attention.cuh: query rows per block
PREFILL_ATTN_THREADS = 128
_M = Param("m", "int")


GEMM_TILES = ((128, 128), (128, 64), (64, 64))   # (gemm_bm, gemm_bn) tiles dtf/gemm.cuh implements
GEMM_WIDE_TILES = ((128, 256),)                   # ... and on its wgmma path only
GEMM_SPLITS = (1, 2, 4, 8)   # blocks (a cluster, wgmma path) that split one tile's K, then reduce through DSMEM
GEMM_STAGES, GEMM_BK, GEMM_SIMT_BK = 4, 32, 16   # its pipeline: stages of BK k (tensor cores), 2 of SIMT_BK (SIMT)
GEMM_WG_BK, GEMM_WG_ALIGN, GEMM_WG_SMEM, GEMM_WG_MAX_STAGES = 64, 1024, 232448, 4   # the wgmma path's (sm_90a)


def gemm_wg_stages(bm: int, bn: int) -> int:
    """dtf/gemm.cuh's wgmma stages for a tile: as many as fit an sm_90 block (at most 4)."""
    return min((GEMM_WG_SMEM - GEMM_WG_ALIGN) // ((bm + bn) * GEMM_WG_BK * 2), GEMM_WG_MAX_STAGES)


def gemm_smem_bytes(compute_itemsize: int, bm: int, bn: int, wgmma: bool = False) -> int:
    """dtf/gemm.cuh's gemm_smem_bytes, which this mirrors (tests/test_compile_generated.py compares
    them): the larger of the mainloop's stages and the f32 C tile that reuses them (the wgmma path
    aligns them to its swizzle atom inside the allocation)."""
    c = bm * (bn + 8) * 4
    if compute_itemsize == 2 and wgmma:
        return max(gemm_wg_stages(bm, bn) * (bm + bn) * GEMM_WG_BK * 2, c) + GEMM_WG_ALIGN
    tc = 0 if compute_itemsize == 4 else GEMM_STAGES * (bm + bn) * GEMM_BK * 2
    simt = 2 * (bm + bn) * GEMM_SIMT_BK * 4
    return max(tc, simt, c)


def tuned_sizes(tile: tuple[int, int, int], itemsizes: dict[str, int], wgmma: bool) -> dict[str, int]:
    """Sizes that follow from a family's GEMM tile, the device's capabilities and an instance's dtypes, for
    the families' expressions: the tile (gemm_bm, gemm_bn), its K split (gemm_split blocks) and its shared
    memory (for the compute dtype)."""
    return {"gemm_bm": tile[0], "gemm_bn": tile[1], "gemm_split": tile[2],
            "gemm_smem": gemm_smem_bytes(itemsizes.get("itemsize_compute", 4), *tile[:2], wgmma)}
# The GEMM tiles' grid, token tiles fastest, so the blocks that share a weight tile run together and it
# is read from DRAM once: {gemm_bn} output channels per tile, or half as many for the fused epilogues
# whose tile pairs two channels (gate with up, a rotary pair's two halves); {gemm_split} blocks a tile.
_GEMM_GRID = "cdiv(m, {gemm_bm}) * cdiv(%s, {gemm_bn}) * {gemm_split}"
_GEMM_PAIR_GRID = "cdiv(m, {gemm_bm}) * cdiv(%s, {gemm_bn} // 2) * {gemm_split}"
_F32_SUMS = (("accumulate", "f32"),)
_NORM_IN = (Param("x", "in", "x"), Param("gamma", "in", "g"))
_MAIN = ("compute", "accumulate")
_NORM = {"norm": ("compute", "accumulate", "output")}

FAMILIES: dict[str, KernelFamily] = {f.template: f for f in (
    KernelFamily("embedding_gather",
                 (Param("table", "in", "t"), Param("token", "index_in"), Param("out", "out", "y"), Param("hidden", "int")),
                 {}, "cdiv(hidden, 256)", "256"),
    KernelFamily("rmsnorm",
                 _NORM_IN + (Param("y", "out", "y"), Param("n", "int"), Param("eps", "float")),
                 {"": _MAIN}, "1", "256"),
    KernelFamily("gemv",
                 _GEMV + (Param("x", "in", "x"), Param("y", "out", "y"), Param("rows", "int"), Param("cols", "int")),
                 {"": _MAIN}, f"cdiv(rows, {WARPS})", f"{32 * WARPS}", "cols", grid_stride=True),
    KernelFamily("rope",
                 (Param("q", "inout", "q"), Param("k", "inout", "k"), Param("pos", "index_in"),
                  Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int"), Param("inv_freq", "in", "f")),
                 {"": ("compute",)}, "n_heads + n_kv_heads", "head_dim // 2"),
    KernelFamily("kv_append",
                 (Param("k", "in", "k"), Param("v", "in", "v"), Param("k_cache", "out", "kc"), Param("v_cache", "out", "vc"),
                  Param("pos", "index_in"), Param("kv_dim", "int")),
                 {}, "cdiv(kv_dim, 256)", "256"),
    # split-KV: one block per (head, ATTN_SPLIT positions), merged by the last; while it runs, the
    # memory system is idle but for the o-proj's early loads, so it prefetches the next big weight to L2
    KernelFamily("attention",
                 (Param("q", "in", "q"), Param("k_cache", "in", "kc"), Param("v_cache", "in", "vc"), Param("out", "out", "y"),
                  Param("pos", "index_in"), Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int"),
                  Param("max_seq", "int"), Param("work", WORKSPACE), Param("prefetch", PREFETCH),
                  Param("prefetch_kib", "int", kib_of="prefetch")),
                 {"": _MAIN}, f"n_heads * cdiv(max_seq, {ATTN_SPLIT})", "{attn_threads}",
                 workspace=f"n_heads * cdiv(max_seq, {ATTN_SPLIT}) * (head_dim + 2) * 4 + n_heads * 4",
                 limits=(("head_dim", ATTN_MAX_HEAD_DIM),),
                 # a context that fits one split: one block per head, without the split bookkeeping
                 variants=(Variant("one_split", (("max_seq", ATTN_SPLIT),), "n_heads"),)),
    KernelFamily("silu_mul",
                 (Param("gate", "in", "x"), Param("up", "in", "u"), Param("y", "out", "y"), Param("n", "int")),
                 {"": ("compute",)}, "cdiv(n, 256)", "256"),
    KernelFamily("residual_add",
                 (Param("x", "inout", "h"), Param("d", "in", "d"), Param("n", "int")),
                 {"": ("compute",)}, "cdiv(n, 256)", "256"),
    KernelFamily("argmax",
                 (Param("logits", "in", "l"), Param("token", "index_out"), Param("n", "int")),
                 {}, "1", "1024"),
    KernelFamily("advance_pos",
                 (Param("pos", "index_inout"),),
                 {}, "1", "1"),
    # ---- fused kernels: each is the composition of the ops above with the same rounding points
    KernelFamily("norm_qkv_rope_kv",      # rmsnorm -> q/k/v GEMV -> RoPE -> q out, k/v into the caches at pos
                 _NORM_IN + _GEMV + (Param("q", "out", "q"), Param("k_cache", "out", "kc"), Param("v_cache", "out", "vc"),
                                     Param("pos", "index_in"), Param("cols", "int"), Param("n_heads", "int"),
                                     Param("n_kv_heads", "int"), Param("head_dim", "int"), Param("eps", "float"),
                                     Param("inv_freq", "in", "f")),
                 {**_NORM, "": _MAIN + ("output",), "rope": ("compute",)},
                 f"cdiv((n_heads + 2 * n_kv_heads) * (head_dim // 2), {WARPS})", f"{32 * WARPS}", "2 * cols", grid_stride=True),
    KernelFamily("gemv_residual",         # x += W a  (GEMV, then the residual add in the epilogue)
                 _GEMV + (Param("a", "in", "x"), Param("x", "inout", "h"), Param("rows", "int"), Param("cols", "int")),
                 {"": _MAIN + ("output",), "act": ("compute",)}, f"cdiv(rows, {WARPS})", f"{32 * WARPS}", "cols", grid_stride=True),
    KernelFamily("norm_gemv_swiglu",      # rmsnorm -> gate/up GEMV (fused rows) -> SiLU(gate) * up
                 _NORM_IN + _GEMV + (Param("y", "out", "y"), Param("rows", "int"), Param("cols", "int"), Param("eps", "float")),
                 {**_NORM, "": _MAIN + ("output",), "act": ("compute",)}, f"cdiv(rows, {WARPS})", f"{32 * WARPS}", "2 * cols", grid_stride=True),
    KernelFamily("norm_gemv",             # rmsnorm -> GEMV, two rows per warp and batch
                 _NORM_IN + _GEMV + (Param("y", "out", "y"), Param("rows", "int"), Param("cols", "int"), Param("eps", "float")),
                 {**_NORM, "": _MAIN}, f"cdiv(rows, {2 * WARPS})", f"{32 * WARPS}", "2 * cols", grid_stride=True),
    # rmsnorm -> GEMV -> argmax -> pos += 1: the step's last three launches in one. Each block publishes
    # its best row in the workspace (after a counter); the last block to finish picks the token.
    # ---- batched prefill: the same ops over m token rows (prefill_step), the decode step's rounding points
    KernelFamily("embedding_gather_rows",
                 (Param("table", "in", "t"), Param("ids", "index_in"), Param("out", "out", "y"), _M, Param("hidden", "int")),
                 {}, "cdiv(m * hidden, 256)", "256"),
    KernelFamily("rmsnorm_rows",
                 _NORM_IN + (Param("y", "out", "y"), _M, Param("n", "int"), Param("eps", "float")),
                 {"": _MAIN}, "m", "256"),
    KernelFamily("gemm",                  # y = x W^T over m rows (dtf/gemm.cuh)
                 _GEMV + (Param("x", "in", "x"), Param("y", "out", "y"), _M, Param("rows", "int"), Param("cols", "int")),
                 {"": _MAIN}, _GEMM_GRID % "rows", f"{GEMM_THREADS}", smem_bytes="{gemm_smem}", cuda_fixed=_F32_SUMS),
    KernelFamily("gemm_residual",         # x += a W^T (the GEMM rounded to output, then the residual add)
                 _GEMV + (Param("a", "in", "x"), Param("x", "inout", "h"), _M, Param("rows", "int"), Param("cols", "int")),
                 {"": _MAIN + ("output",), "act": ("compute",)}, _GEMM_GRID % "rows", f"{GEMM_THREADS}", smem_bytes="{gemm_smem}", cuda_fixed=_F32_SUMS),
    KernelFamily("gemm_swiglu",           # gate/up GEMM (fused rows) -> SiLU(gate) * up
                 _GEMV + (Param("x", "in", "x"), Param("y", "out", "y"), _M, Param("rows", "int"), Param("cols", "int")),
                 {"": _MAIN + ("output",), "act": ("compute",)}, _GEMM_PAIR_GRID % "rows", f"{GEMM_THREADS}", smem_bytes="{gemm_smem}", cuda_fixed=_F32_SUMS),
    KernelFamily("gemm_rope_kv",          # q/k/v GEMM (fused rows) -> RoPE at pos + row -> q out, k/v into the caches
                 _GEMV + (Param("x", "in", "x"), Param("q", "out", "q"), Param("k_cache", "out", "kc"), Param("v_cache", "out", "vc"),
                          Param("pos", "index_in"), _M, Param("cols", "int"), Param("n_heads", "int"),
                          Param("n_kv_heads", "int"), Param("head_dim", "int"), Param("inv_freq", "in", "f")),
                 {"": _MAIN + ("output",), "rope": ("compute",)},
                 _GEMM_PAIR_GRID % "(n_heads + 2 * n_kv_heads) * (head_dim // 2)", f"{GEMM_THREADS}", smem_bytes="{gemm_smem}",
                 cuda_fixed=_F32_SUMS),
    KernelFamily("rope_rows",
                 (Param("q", "inout", "q"), Param("k", "inout", "k"), Param("pos", "index_in"), _M,
                  Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int"), Param("inv_freq", "in", "f")),
                 {"": ("compute",)}, "m * (n_heads + n_kv_heads)", "head_dim // 2"),
    KernelFamily("kv_append_rows",
                 (Param("k", "in", "k"), Param("v", "in", "v"), Param("k_cache", "out", "kc"), Param("v_cache", "out", "vc"),
                  Param("pos", "index_in"), _M, Param("kv_dim", "int")),
                 {}, "cdiv(m * kv_dim, 256)", "256"),
    # causal flash attention of m query rows at pos.. over cache rows 0..pos+row (dtf/prefill_attention.cuh)
    KernelFamily("prefill_attention",
                 (Param("q", "in", "q"), Param("k_cache", "in", "kc"), Param("v_cache", "in", "vc"), Param("out", "out", "y"),
                  Param("pos", "index_in"), _M, Param("n_heads", "int"), Param("n_kv_heads", "int"), Param("head_dim", "int")),
                 {"": _MAIN}, f"n_heads * cdiv(m, {PREFILL_ATTN_BQ})", f"{PREFILL_ATTN_THREADS}",
                 limits=(("head_dim", ATTN_MAX_HEAD_DIM),), smem_bytes="prefill_attn_smem(head_dim, {itemsize_k_cache})",
                 cuda_fixed=(("compute", "f32"), ("accumulate", "f32"))),
    KernelFamily("last_row",              # the block's last row, where the decode step's final norm and lm_head start
                 (Param("xs", "in", "x"), Param("x", "out", "y"), _M, Param("hidden", "int")),
                 {}, "cdiv(hidden, 256)", "256"),
    KernelFamily("norm_gemv_argmax",
                 _NORM_IN + _GEMV + (Param("y", "out", "y"), Param("token", "index_out"), Param("pos", "index_inout"),
                                     Param("rows", "int"), Param("cols", "int"), Param("eps", "float"),
                                     Param("work", WORKSPACE)),
                 {**_NORM, "": _MAIN}, f"cdiv(rows, {2 * WARPS})", f"{32 * WARPS}", "2 * cols", grid_stride=True,
                 workspace=f"8 + 8 * cdiv(rows, {2 * WARPS})"),
)}
