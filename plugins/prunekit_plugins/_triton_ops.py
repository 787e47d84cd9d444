"""Element-wise Triton helpers shared by the built-in selection kernels (imported only where Triton runs)."""

from __future__ import annotations

import triton
import triton.language as tl

#: the largest float64 (torch.finfo(torch.float64).max)
FLOAT64_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def nanmin(a, b):
    return tl.where((a < b) | (a != a), a, b)  # NaN wins, as torch.amin


@triton.jit
def nanmax(a, b):
    return tl.where((a > b) | (a != a), a, b)  # NaN wins, as torch.amax and torch.maximum


@triton.jit
def round_half_even(x):
    """``torch.round``: to the nearest integer, ties to even (exact for floats of any size)."""
    r = tl.floor(x)
    d = x - r  # exact
    half = r * 0.5  # exact
    odd = tl.floor(half) != half
    return r + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def finite(s):
    """Scores made finite as the pick's reference does (``torch.nan_to_num``): NaN and -inf to the lowest float64,
    +inf to the highest."""
    s = tl.where(s != s, -FLOAT64_MAX, s)
    s = tl.where(s == float("inf"), FLOAT64_MAX, s)
    return tl.where(s == float("-inf"), -FLOAT64_MAX, s)


@triton.jit
def listed_change(src_ptr, index_ptr, old_ptr, new_ptr, base, count, cols, cm, N, scale,
                  GRID: tl.constexpr, BU: tl.constexpr, BI: tl.constexpr):
    """Facility-location coverage's change at the tokens ``cols`` (``[BI]``, valid where ``cm``) from the ``count``
    changed terms listed at ``base`` (row ``index_u``, its best similarity ``old_u`` before and ``new_u`` after):
    ``Σ_u clamp(G[index_u, cols], old_u, new_u) − old_u``, exact in int64, ``BU`` rows at a time. ``G`` is the
    int64 grid at ``src_ptr`` (``GRID``), or else the float similarity there, put on the grid of ``scale`` as it is
    read."""
    acc = tl.zeros([BI], dtype=tl.int64)
    for u0 in range(0, count, BU):
        u = u0 + tl.arange(0, BU)
        um = u < count
        r = tl.load(index_ptr + base + u, mask=um, other=0)
        lo = tl.load(old_ptr + base + u, mask=um, other=0)
        hi = tl.load(new_ptr + base + u, mask=um, other=0)
        x = tl.load(src_ptr + (base + r)[:, None] * N + cols[None, :], mask=um[:, None] & cm[None, :], other=0)
        if not GRID:
            x = round_half_even(x * scale).to(tl.int64)
        term = tl.minimum(tl.maximum(x, lo[:, None]), hi[:, None]) - lo[:, None]
        acc += tl.sum(tl.where(um[:, None], term, 0), 0)
    return acc
