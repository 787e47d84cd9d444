"""Triton implementation of ``greedy_pick`` (see ``greedy.PICK``): one program per sample.

Imported only when a selection runs on CUDA tensors and Triton imports. The same float64 operations as the reference,
in the same order (minimum, maximum, subtraction, division, one product and one sum per term), with contraction into
fused multiply-adds switched off, so the scores are bit-identical and so is the pick (ties: lowest index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: tokens per chunk (the tests shrink it to run every loop several times)
BLOCK = 4096


@triton.jit
def _nanmin(a, b):
    return tl.where((a < b) | (a != a), a, b)  # NaN wins, as torch.amin


@triton.jit
def _nanmax(a, b):
    return tl.where((a > b) | (a != a), a, b)  # NaN wins, as torch.amax


@triton.jit
def _pick_kernel(gains_ptr, weights_ptr, penalty_ptr, picks_ptr, score_ptr, step, B, N, K,
                 T: tl.constexpr, MINMAX: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    pen_row = penalty_ptr + b * N
    score_row = score_ptr + b * N
    for t in tl.static_range(T):
        row = gains_ptr + (t * B + b) * N
        w = tl.load(weights_ptr + t)
        lo = float("inf")
        hi = float("-inf")
        span = 1.0
        if MINMAX:
            lo_acc = tl.full([BLOCK], float("inf"), tl.float64)
            hi_acc = tl.full([BLOCK], float("-inf"), tl.float64)
            for start in range(0, N, BLOCK):
                i = start + offs
                m = i < N
                x = tl.load(row + i, mask=m, other=0.0)
                p = tl.load(pen_row + i, mask=m, other=0.0)
                lo_acc = tl.where(m, _nanmin(lo_acc, x + p), lo_acc)
                hi_acc = tl.where(m, _nanmax(hi_acc, x - p), hi_acc)
            lo = tl.reduce(lo_acc, 0, _nanmin)
            hi = tl.reduce(hi_acc, 0, _nanmax)
            span = hi - lo
        for start in range(0, N, BLOCK):
            i = start + offs
            m = i < N
            x = tl.load(row + i, mask=m, other=0.0)
            if MINMAX:
                g = tl.where(span > 0, (x - lo) / span, 0.0)
            else:
                g = x
            part = w * g
            if t == 0:
                total = part
            else:
                total = tl.load(score_row + i, mask=m, other=0.0) + part
            tl.store(score_row + i, total, mask=m)
    # the best candidate: scores made finite (NaN, -inf: lowest float; +inf: highest), minus the penalty
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, N, BLOCK):
        i = start + offs
        m = i < N
        s = tl.load(score_row + i, mask=m, other=0.0)
        s = tl.where(s != s, -1.7976931348623157e308, s)
        s = tl.where(s == float("inf"), 1.7976931348623157e308, s)
        s = tl.where(s == float("-inf"), -1.7976931348623157e308, s)
        s = s - tl.load(pen_row + i, mask=m, other=0.0)
        s = tl.where(m, s, float("-inf"))
        top = tl.max(s, 0)
        at = tl.min(tl.where(s == top, i, N), 0)
        take = top > best
        best = tl.where(take, top, best)
        best_i = tl.where(take, at, best_i)
    tl.store(pen_row + best_i, float("inf"))
    tl.store(picks_ptr + b * K + step, best_i.to(tl.int64))


def pick(gains, weights, weight_tensor, penalty, picks, step, normalize, combine):
    """Same arguments and result as ``greedy._pick_reference`` (``normalize`` "minmax"/"none", ``combine`` "sum")."""
    if combine != "sum" or normalize not in ("minmax", "none"):
        raise ValueError(f"the Triton greedy pick covers combine='sum' with normalize 'minmax' or 'none', "
                         f"got combine={combine!r}, normalize={normalize!r}")
    T, B, N = gains.shape
    K = picks.shape[1]
    assert gains.is_contiguous() and penalty.is_contiguous() and picks.is_contiguous()
    score = torch.empty(B, N, dtype=torch.float64, device=gains.device)
    block = min(BLOCK, triton.next_power_of_2(N))
    _pick_kernel[(B,)](gains, weight_tensor, penalty, picks, score, step, B, N, K, T=T,
                       MINMAX=normalize == "minmax", BLOCK=block, num_warps=4 if block <= 1024 else 8,
                       enable_fp_fusion=False)
    return picks[:, step]
