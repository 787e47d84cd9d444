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
