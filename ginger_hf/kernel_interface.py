"""The one description of what Python and the C++ kernel (``_cpu_kernel.cpp``) exchange.

Every table passed between them is a row of named fields, listed here once. ``kernel.py``
builds its tables from these names, and the build writes ``cpp_header()`` (C++ enums of the
same names, ``kMaxRank``, ``kAbiVersion``) next to the source, so neither side holds a bare
position. The per-block parameters of the small solves are ``solve.SOLVE_PARAMS`` (``Blocks``'
fields), computed from a tensor's hyper-parameters and counters by ``solve.tensor_params`` and
``solve.counter_params`` for both fast paths (the kernel's rows here, the device step's table).
Adding one touches three files: ``functional.py`` (a ``Hyper`` field, and its use in the reference
step, the tests' oracle), ``solve.py`` (the ``Blocks`` field, how it is computed, its use in the torch
solve) and ``_cpu_solve.h`` (its use in the C++ solve, as ``prm[Param::name]``).
"""

from __future__ import annotations

from .solve import SOLVE_PARAMS, UPDATE_PARAMS

# Bump when a table's meaning changes without a name changing; kernel.py refuses a library built otherwise.
ABI_VERSION = 2
MAX_RANK = 64  # the largest tau the kernel's fixed-size small solves take

# Rows of fixed fields: name -> field names, in order. Each becomes ``namespace <name> { enum ... count }``.
RECORDS: dict[str, tuple[str, ...]] = {
    # One int64 row per tensor of a whole step (ginger_step): its blocks, block length, whether it refreshes,
    # the addresses of its data and of its float64 small state.
    "TensorRow": ("B", "k", "refresh", "U", "m", "g", "p", "c", "s", "R", "e"),
    # One int64 row per block of the two-pass calls, and the block's addresses in pass 1 and pass 2.
    "BlockRow": ("k", "refresh", "ustride"),
    "Pass1Ptr": ("U", "m", "g", "c"),
    "Pass2Ptr": ("U", "m", "g", "p", "c"),
    # float64 per-tensor parameters of a whole step: the solve's (debias as after a refresh), then pass 2's,
    # then the debias of a step without a refresh. The solve calls take the first ``len(SOLVE_PARAMS)`` per block.
    "Param": SOLVE_PARAMS + UPDATE_PARAMS + ("debias_keep",),
    # int64 per tensor of a whole step: whether its gradient and its curvature vector were finite.
    "Finite": ("grad", "curvature"),
    # float64 per-block results of a whole step: |u|^2 and its part in span(U), g.g, 1 where left untouched.
    "Result": ("update_sq", "span_sq", "grad_sq", "untouched"),
    # The places of the named sums / coefficients in a row (solve.StatsLayout, solve.CoefLayout), as int64 tables.
    "StatsAt": ("width", "gram", "uc", "um", "cc", "cm", "mm", "gg"),
    "CoefAt": ("width", "scale", "along", "lr", "decay", "rho", "v_c", "shrink", "shift", "v_u"),
    # The float64 row a keep solve writes after the coefficients.
    "KeepOut": ("update_sq", "span_sq", "e"),
}

# The row a refresh solve writes after the coefficients: (name, size as (a, b, c): a n^2 + b n + c for rank n).
REFRESH_OUT: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("s", (0, 1, 0)), ("R", (1, 0, 0)), ("e", (0, 0, 1)), ("rotate", (0, 0, 1)), ("update_sq", (0, 0, 1)),
    ("span_sq", (0, 0, 1)))


def refresh_out(n: int) -> tuple[dict[str, tuple[int, int]], int]:
    """``REFRESH_OUT`` as ``name -> (offset, size)`` for rank ``n``, and the total width."""
    out, at = {}, 0
    for name, (a, b, c) in REFRESH_OUT:
        out[name] = (at, a * n * n + b * n + c)
        at += out[name][1]
    return out, at


def cpp_header() -> str:
    """The C++ side of this description (written next to the source at build time; never edited by hand)."""
    lines = ["// Generated from ginger_hf/kernel_interface.py: do not edit.", "#pragma once", "#include <cstdint>",
             f"constexpr int kAbiVersion = {ABI_VERSION};", f"constexpr int kMaxRank = {MAX_RANK};",
             f"constexpr int kSolveParams = {len(SOLVE_PARAMS)};  // Param's first fields: the small solves' own"]
    for name, fields in RECORDS.items():
        lines.append(f"namespace {name} {{ enum : int {{ {', '.join(fields)}, count }}; }}")
    lines.append("struct RefreshOut {")
    lines.append(f"  int64_t {', '.join(name for name, _ in REFRESH_OUT)}, width;")
    body = " ".join(f"{name} = at; at += {a} * n * n + {b} * n + {c};" for name, (a, b, c) in REFRESH_OUT)
    lines.append(f"  RefreshOut(int n, int64_t at) {{ {body} width = at; }}")
    lines.append("};")
    return "\n".join(lines) + "\n"
