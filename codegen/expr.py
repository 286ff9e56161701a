"""Shape and launch-argument expressions over config symbols.

Specs write shapes like ``n_heads * head_dim``; manifests keep them symbolic so one target
serves every model size, and the runtime evaluates them against a checkpoint's config. Only
integer/float literals, symbol names, ``+ - * //`` and ``cdiv(a, b)`` are accepted, checked
by walking the parsed AST, so a spec can never smuggle code into Python or generated C.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}
_FUNCS = {"cdiv": lambda a, b: -(-a // b)}
ALLOWED = "integer literals, config symbols, + - * // and cdiv(a, b)"


def prefill_attn_smem(head_dim: int, elem_bytes: int) -> int:
    """Dynamic shared memory of one prefill-attention block: dtf/prefill_attention.cuh's
    prefill_attn_smem_bytes, which it mirrors (tests/test_compile_generated.py compares the two). The
    SIMT path stages rows of DMAX = 64, 128 or 256 dims, R = 8, 8 or 4 query rows per warp; the
    tensor-core path (16-bit caches, head_dim 64 or 128) four 64-row tiles."""
    dmax = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    r = 8 if dmax <= 128 else 4
    simt = 4 * ((4 * r + 32) * (dmax + 4) + 128 * r)
    mma = 256 * head_dim * elem_bytes if elem_bytes == 2 and head_dim in (64, 128) else 0
    return max(simt, mma)


# Functions the Plan writes into a manifest's launch sizes (not for specs): sizes a device header defines.
_SIZE_FUNCS = {"prefill_attn_smem": prefill_attn_smem}


class ExprError(ValueError):
    pass


def _check(node: ast.AST, symbols: Iterable[str], extra_funcs: Mapping = {}) -> None:
    symbols = set(symbols)
    funcs = {**_FUNCS, **extra_funcs}
    for n in ast.walk(node):
        if isinstance(n, (ast.Expression, ast.Load)) or type(n) in _BINOPS:
            continue
        if isinstance(n, ast.BinOp):
            if type(n.op) not in _BINOPS:
                raise ExprError(f"operator {type(n.op).__name__} is not allowed ({ALLOWED})")
        elif isinstance(n, ast.Constant):
            if isinstance(n.value, bool) or not isinstance(n.value, (int, float)):
                raise ExprError(f"literal {n.value!r} is not allowed ({ALLOWED})")
        elif isinstance(n, ast.Name):
            if n.id not in symbols and n.id not in funcs:
                raise ExprError(f"unknown symbol {n.id!r} (known: {', '.join(sorted(symbols))})")
        elif isinstance(n, ast.Call):
            if not (isinstance(n.func, ast.Name) and n.func.id in funcs and len(n.args) == 2 and not n.keywords):
                raise ExprError(f"only cdiv(a, b) may be called ({ALLOWED})")
        else:
            raise ExprError(f"{type(n).__name__} is not allowed ({ALLOWED})")


def parse(text: str | int | float, symbols: Iterable[str]) -> str:
    """Validate an expression and return its canonical spelling (what manifests store)."""
    if isinstance(text, bool):
        raise ExprError(f"{text!r} is not an expression ({ALLOWED})")
    if isinstance(text, (int, float)):
        return repr(text)
    if not isinstance(text, str):
        raise ExprError(f"{text!r} is not an expression ({ALLOWED})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ExprError(f"{text!r} does not parse ({ALLOWED})") from None
    _check(tree, symbols)
    return ast.unparse(tree)


def symbols_of(text: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(str(text), mode="eval"))
            if isinstance(n, ast.Name) and n.id not in _FUNCS and n.id not in _SIZE_FUNCS}


def evaluate(text: str | int | float, env: Mapping[str, int | float]):
    """Evaluate a (validated) expression with symbol values from ``env``."""
    tree = ast.parse(str(text), mode="eval")
    _check(tree, env.keys(), _SIZE_FUNCS)

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.BinOp):
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        return {**_FUNCS, **_SIZE_FUNCS}[n.func.id](*(ev(a) for a in n.args))

    return ev(tree)
