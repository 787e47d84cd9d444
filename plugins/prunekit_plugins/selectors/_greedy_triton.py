"""Triton implementations of the greedy selector's kernels (see ``greedy.PICK`` and ``greedy.RUN``).

Imported only when a selection runs on CUDA tensors and Triton imports. The same float64 operations as the
references, in the same order (minimum, maximum, subtraction, division, one product and one sum per term), with
contraction into fused multiply-adds switched off, so the scores are bit-identical and so is the pick (ties: lowest
index); the coverage update is exact integer arithmetic on the references' grid.

* ``pick``: one greedy step after the gains are known, one program per sample, over chunks of ``BLOCK`` tokens.
* ``run``: the rest of a selection in one launch, one program per sample: every step's pick and every scorer's
  update (the forms of :class:`prunekit.plugin.FusedTerm`) in a loop inside the kernel, the state of all N tokens
  held in registers (N up to ``greedy.RUN_MAX_TOKENS``). Between steps nothing returns to the host or launches again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunekit_plugins._triton_ops import finite, listed_change, nanmax, nanmin, round_half_even
from prunekit_plugins.selectors.greedy import fusable

@triton.jit
def _weighted(w, x, PRODUCT: tl.constexpr):
    """A term's part of the score: ``w·x`` (sum), or ``max(x, 0)^w`` for ``w`` 0 or 1 (product: what torch's
    ``pow`` gives there, 1 at 0 and the clamped value itself at 1; other exponents take the reference)."""
    if PRODUCT:
        out = tl.where(w == 0, 1.0, tl.where(x < 0, 0.0, x))  # x < 0 is False for NaN and -0.0, as clamp_min
    else:
        out = w * x
    return out


@triton.jit
def _combined(total, part, PRODUCT: tl.constexpr):
    if PRODUCT:
        out = total * part
    else:
        out = total + part
    return out


#: tokens per chunk of ``pick`` (the tests shrink it to run every loop several times)
BLOCK = 4096
#: elements of the changed-rows tile ``run`` adds up at once (rows x tokens; the tests shrink it)
RUN_TILE = 8192


@triton.jit
def _pick_kernel(gains_ptr, weights_ptr, penalty_ptr, picks_ptr, score_ptr, step, B, N, K,
                 T: tl.constexpr, MINMAX: tl.constexpr, PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
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
                lo_acc = tl.where(m, nanmin(lo_acc, x + p), lo_acc)
                hi_acc = tl.where(m, nanmax(hi_acc, x - p), hi_acc)
            lo = tl.reduce(lo_acc, 0, nanmin)
            hi = tl.reduce(hi_acc, 0, nanmax)
            span = hi - lo
        for start in range(0, N, BLOCK):
            i = start + offs
            m = i < N
            x = tl.load(row + i, mask=m, other=0.0)
            if MINMAX:
                g = tl.where(span > 0, (x - lo) / span, 0.0)
            else:
                g = x
            part = _weighted(w, g, PRODUCT)
            if t == 0:
                total = part
            else:
                total = _combined(tl.load(score_row + i, mask=m, other=0.0), part, PRODUCT)
                # A chunk smaller than the program's threads gives each token to several threads: all of them read
                # the running score before any writes the new one (else one would add its part twice).
                tl.debug_barrier()
            tl.store(score_row + i, total, mask=m)
    # the best candidate: scores made finite, minus the penalty
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, N, BLOCK):
        i = start + offs
        m = i < N
        s = finite(tl.load(score_row + i, mask=m, other=0.0)) - tl.load(pen_row + i, mask=m, other=0.0)
        s = tl.where(m, s, float("-inf"))
        top = tl.max(s, 0)
        at = tl.min(tl.where(s == top, i, N), 0)
        take = top > best
        best = tl.where(take, top, best)
        best_i = tl.where(take, at, best_i)
    tl.store(pen_row + best_i, float("inf"))
    tl.store(picks_ptr + b * K + step, best_i.to(tl.int64))


def check(weights, normalize: str, combine: str) -> None:
    """Raise unless these kernels compute a greedy score of this form exactly (``greedy.fusable``; see
    ``_weighted``)."""
    if not fusable(weights, normalize, combine):
        raise ValueError(f"the Triton greedy kernels cover normalize 'minmax' or 'none' with combine 'sum', or "
                         f"'product' with weights 0 or 1; got normalize={normalize!r}, combine={combine!r}, "
                         f"weights={tuple(weights)!r}")


def pick(gains, weights, weight_tensor, penalty, picks, step, normalize, combine):
    """Same arguments and result as ``greedy._pick_reference`` (``normalize`` "minmax"/"none"; ``combine`` "sum",
    or "product" with every weight 0 or 1)."""
    check(weights, normalize, combine)
    T, B, N = gains.shape
    K = picks.shape[1]
    assert gains.is_contiguous() and penalty.is_contiguous() and picks.is_contiguous()
    score = torch.empty(B, N, dtype=torch.float64, device=gains.device)
    block = min(BLOCK, triton.next_power_of_2(N))
    _pick_kernel[(B,)](gains, weight_tensor, penalty, picks, score, step, B, N, K, T=T,
                       MINMAX=normalize == "minmax", PRODUCT=combine == "product", BLOCK=block,
                       num_warps=4 if block <= 1024 else 8,
                       enable_fp_fusion=False)
    return picks[:, step]


# ---------------------------------------------------------------------------------------------------------
# run: the rest of a selection in one launch
# ---------------------------------------------------------------------------------------------------------
#: term kinds of ``run`` (constexpr per term slot; 0: no term in the slot)
_KINDS = {"constant": 1, "nearest": 2, "coverage": 3}
_SLOTS = 4


@triton.jit
def _slot_gains(KIND: tl.constexpr, gains_ptr, t: tl.constexpr, B, b, N, j, m):
    """A constant term's gains (the selector's buffer row), or a placeholder for the other kinds."""
    if KIND == 1:
        g = tl.load(gains_ptr + (t * B + b) * N + j, mask=m, other=0.0)
    else:
        g = tl.zeros(j.shape, tl.float64)
    return g


@triton.jit
def _slot_weight(KIND: tl.constexpr, weights_ptr, t: tl.constexpr):
    if KIND != 0:
        w = tl.load(weights_ptr + t)
    else:
        w = tl.full([], 0.0, tl.float64)
    return w


@triton.jit
def _term(KIND: tl.constexpr, constant, near, gain, scale, pen, m, MINMAX: tl.constexpr):
    """A term's current gains, normalised over the candidates (``normalize_over``)."""
    if KIND == 1:
        x = constant
    elif KIND == 2:
        x = (1.0 - near).to(tl.float64)  # in the similarity's dtype, then widened (as the diversity run)
    else:
        x = gain.to(tl.float64) / scale
    if MINMAX:
        lo = tl.reduce(tl.where(m, x + pen, float("inf")), 0, nanmin)
        hi = tl.reduce(tl.where(m, x - pen, float("-inf")), 0, nanmax)
        span = hi - lo
        x = tl.where(span > 0, (x - lo) / span, 0.0)
    return x


@triton.jit
def _run_kernel(gains_ptr, weights_ptr, penalty_ptr, picks_ptr, sim_ptr, near_ptr, grid_ptr, scale, cbest_ptr,
                chosen_ptr, cgain_ptr, index_ptr, old_ptr, new_ptr, start, B, N, K,
                K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                MINMAX: tl.constexpr, PRODUCT: tl.constexpr, NEAR: tl.constexpr, COV: tl.constexpr,
                GRID: tl.constexpr, OUT: tl.constexpr,
                BLOCK: tl.constexpr, BU: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    m = j < N
    base = b * N
    # the state of every token, held in registers for the whole selection
    pen = tl.load(penalty_ptr + base + j, mask=m, other=0.0)
    c0 = _slot_gains(K0, gains_ptr, 0, B, b, N, j, m)
    c1 = _slot_gains(K1, gains_ptr, 1, B, b, N, j, m)
    c2 = _slot_gains(K2, gains_ptr, 2, B, b, N, j, m)
    c3 = _slot_gains(K3, gains_ptr, 3, B, b, N, j, m)
    w0 = _slot_weight(K0, weights_ptr, 0)
    w1 = _slot_weight(K1, weights_ptr, 1)
    w2 = _slot_weight(K2, weights_ptr, 2)
    w3 = _slot_weight(K3, weights_ptr, 3)
    if NEAR:
        near = tl.load(near_ptr + base + j, mask=m, other=0.0)
    else:
        near = tl.zeros([BLOCK], tl.float32)
    if COV:
        cbest = tl.load(cbest_ptr + base + j, mask=m, other=0)
        cgain = tl.load(cgain_ptr + base + j, mask=m, other=0)
        chosen = tl.load(chosen_ptr + base + j, mask=m, other=1) != 0
    else:
        cbest = tl.zeros([BLOCK], tl.int64)
        cgain = tl.zeros([BLOCK], tl.int64)
        chosen = j < 0
    for step in range(start, K):
        # pick: Σ w·N(g) (or Π max(N(g), 0)^w), term by term in order; the best candidate, lowest index on ties
        total = _weighted(w0, _term(K0, c0, near, cgain, scale, pen, m, MINMAX), PRODUCT)
        if K1 != 0:
            total = _combined(total, _weighted(w1, _term(K1, c1, near, cgain, scale, pen, m, MINMAX), PRODUCT), PRODUCT)
        if K2 != 0:
            total = _combined(total, _weighted(w2, _term(K2, c2, near, cgain, scale, pen, m, MINMAX), PRODUCT), PRODUCT)
        if K3 != 0:
            total = _combined(total, _weighted(w3, _term(K3, c3, near, cgain, scale, pen, m, MINMAX), PRODUCT), PRODUCT)
        s = tl.where(m, finite(total) - pen, float("-inf"))
        top = tl.max(s, 0)
        p = tl.min(tl.where(s == top, j, N), 0)
        pen = tl.where(j == p, float("inf"), pen)
        tl.store(picks_ptr + b * K + step, p.to(tl.int64))
        if step + 1 < K:
            # every scorer's update with p; F's row p is its column p
            f = tl.load(sim_ptr + (base + p) * N + j, mask=m, other=0.0)
            if NEAR:
                near = nanmax(near, f)
            if COV:
                if GRID:
                    col = tl.load(grid_ptr + (base + p) * N + j, mask=m, other=0)
                else:
                    col = round_half_even(f * scale).to(tl.int64)
                changed = (((col > cbest) & (chosen == 0)) | (j == p)) & m
                grown = tl.maximum(cbest, col)
                # the changed terms listed in memory (index, old and new best), for every thread to read
                pos = tl.cumsum(changed.to(tl.int32), 0) - 1
                count = tl.sum(changed.to(tl.int32), 0)
                tl.store(index_ptr + base + pos, j.to(tl.int64), mask=changed)
                tl.store(old_ptr + base + pos, cbest, mask=changed)
                tl.store(new_ptr + base + pos, tl.where(j == p, OUT, grown), mask=changed)
                cbest = grown
                chosen = chosen | (j == p)
                tl.debug_barrier()
                # grid_ptr is the float similarity itself when no grid is held (GRID false)
                cgain = cgain - listed_change(grid_ptr, index_ptr, old_ptr, new_ptr, base, count, j, m, N, scale,
                                              GRID, BU, BLOCK)
                tl.debug_barrier()  # the list is rewritten at the next step
    # the state back where the runs keep it
    tl.store(penalty_ptr + base + j, pen, mask=m)
    if NEAR:
        tl.store(near_ptr + base + j, near, mask=m)
    if COV:
        tl.store(cbest_ptr + base + j, cbest, mask=m)
        tl.store(cgain_ptr + base + j, cgain, mask=m)
        tl.store(chosen_ptr + base + j, chosen.to(tl.uint8), mask=m)


class _Terms:
    """The fused terms as the kernels take them: a kind per slot, and each term's state tensors (``dummy``, a
    pointer never read, where the kind is absent). ``grid`` is the held int64 grid, or else the float similarity
    (put on the grid as it is read, ``grid_held`` false)."""

    def __init__(self, terms, weights, normalize: str, combine: str, dummy) -> None:
        check(weights, normalize, combine)
        held = [t.similarity for t in terms if t.similarity is not None]
        if not held or len(terms) > _SLOTS:  # the caller also keeps N within what the kernels take
            raise ValueError(f"the fused kernels cover up to {_SLOTS} terms with a held similarity matrix; got "
                             f"{len(terms)} terms")
        near = next((t for t in terms if t.kind == "nearest"), None)
        cov = next((t for t in terms if t.kind == "coverage"), None)
        self.kinds = [_KINDS[t.kind] for t in terms] + [0] * (_SLOTS - len(terms))
        self.sim = held[0]
        self.near, self.cov = near is not None, cov is not None
        self.near_best = near.best if near else dummy
        self.grid_held = cov is not None and cov.grid is not None
        self.grid = cov.grid if self.grid_held else self.sim
        self.scale = cov.scale if cov else 1.0
        self.cbest = cov.best if cov else dummy
        self.chosen = cov.chosen.view(torch.uint8) if cov else dummy
        self.cgain = cov.gain if cov else dummy
        self.out = cov.out if cov else 0
        self.minmax, self.product = normalize == "minmax", combine == "product"


def run(gains, weights, weight_tensor, penalty, picks, start, normalize, combine, terms, runs):
    """Same arguments and effect as ``greedy._run_reference`` (which also takes ``runs``; this reads ``terms``)."""
    T, B, N = gains.shape
    K = picks.shape[1]
    f = _Terms(terms, weights, normalize, combine, dummy=penalty)
    assert all(t.is_contiguous() for t in (gains, penalty, picks, f.sim))
    block = triton.next_power_of_2(N)
    warps, rows = run_launch(block)
    scratch = torch.empty(3, B, N, dtype=torch.int64, device=gains.device) if f.cov else [penalty] * 3
    _run_kernel[(B,)](
        gains, weight_tensor, penalty, picks, f.sim, f.near_best, f.grid, f.scale, f.cbest, f.chosen, f.cgain,
        *scratch, start, B, N, K, K0=f.kinds[0], K1=f.kinds[1], K2=f.kinds[2], K3=f.kinds[3], MINMAX=f.minmax,
        PRODUCT=f.product, NEAR=f.near, COV=f.cov, GRID=f.grid_held, OUT=f.out, BLOCK=block, BU=rows,
        num_warps=warps, enable_fp_fusion=False)


#: ``run``'s launch by block of tokens (the next power of two of N): (warps, changed rows summed at once). From
#: benchmarks/gpu_selection.py's tune part on an H200 (docs/performance.md): at 4,096 (N = 2,880) the fastest; at
#: 1,024 (N = 576) the fastest, 16 x 16 (2.0 ms, batch 1), spills 40 bytes with the float similarity and 8 x 8
#: (2.2 ms) with the grid, so 16 x 8, which spills with neither (not timed); 2,048 unmeasured. Smaller blocks:
#: :func:`run_launch`'s rule.
RUN_LAUNCH = {1024: (16, 8), 2048: (16, 4), 4096: (32, 4)}


def run_launch(block: int) -> tuple[int, int]:
    """Warps of ``run``'s program for ``block`` tokens and the changed rows it sums at once: :data:`RUN_LAUNCH`,
    else 4 warps and a tile of about ``RUN_TILE`` elements. Every entry holds the state in registers without
    spilling on sm_90 up to 2,048 tokens (ptxas, checked by tests/test_kernels.py); at 4,096 every count spills."""
    if block in RUN_LAUNCH:
        return RUN_LAUNCH[block]
    return 4, max(1, min(16, RUN_TILE // block))


# ---------------------------------------------------------------------------------------------------------
# wide_step: one greedy step of a fused selection spread over many programs per sample (N above what one
# program's registers hold)
# ---------------------------------------------------------------------------------------------------------
#: the wide steps' launch by the most tokens it applies to (None: any): (tokens per program, changed rows summed
#: at once, warps of the coverage-change kernel). Up to 4,096 tokens: the fastest of benchmarks/gpu_selection.py's
#: tune part on an H200 (N = 576 and 2,880, batches 1 and 8); above, 128 tokens per program measured 15 % faster
#: than 32 at N = 10,816, batch 8 (docs/performance.md). No entry spills on sm_90 (tests/test_kernels.py; 128 x 16
#: int64 spills at 4 warps). The tests shrink them.
WIDE_LAUNCH = ((4096, (32, 16, 4)), (None, (128, 16, 8)))


def wide_launch(n: int) -> tuple[int, int, int]:
    """:data:`WIDE_LAUNCH`'s entry for ``n`` tokens."""
    return next(launch for most, launch in WIDE_LAUNCH if most is None or n <= most)


@triton.jit
def _current(KIND: tl.constexpr, gains_ptr, t: tl.constexpr, B, b, N, cols, cm, near_ptr, cgain, scale):
    """Term ``t``'s current gains at ``cols`` (as ``_term`` before normalising)."""
    if KIND == 1:
        x = tl.load(gains_ptr + (t * B + b) * N + cols, mask=cm, other=0.0)
    elif KIND == 2:
        x = (1.0 - tl.load(near_ptr + b * N + cols, mask=cm, other=0.0)).to(tl.float64)
    else:
        x = cgain.to(tl.float64) / scale
    return x


@triton.jit
def _partial_span(KIND: tl.constexpr, gains_ptr, t: tl.constexpr, B, b, N, cols, cm, near_ptr, cgain, scale, pen,
                  part_ptr, q, P):
    """This program's minimum of ``x + penalty`` and maximum of ``x - penalty`` of term ``t``, into
    ``part[b, t, 0 | 1, q]``."""
    if KIND != 0:
        x = _current(KIND, gains_ptr, t, B, b, N, cols, cm, near_ptr, cgain, scale)
        lo = tl.reduce(tl.where(cm, x + pen, float("inf")), 0, nanmin)
        hi = tl.reduce(tl.where(cm, x - pen, float("-inf")), 0, nanmax)
        tl.store(part_ptr + ((b * 4 + t) * 2) * P + q, lo)
        tl.store(part_ptr + ((b * 4 + t) * 2 + 1) * P + q, hi)


@triton.jit
def _wide_gains_kernel(gains_ptr, penalty_ptr, near_ptr, grid_ptr, scale, cgain_ptr, index_ptr, old_ptr,
                       new_ptr, count_ptr, part_ptr, B, N, P,
                       K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                       MINMAX: tl.constexpr, COV: tl.constexpr, DELTA: tl.constexpr, GRID: tl.constexpr,
                       BU: tl.constexpr, BI: tl.constexpr):
    """Coverage's change of the listed terms at this program's tokens (``DELTA``), then each term's partial span."""
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    cols = q * BI + tl.arange(0, BI)
    cm = cols < N
    base = b * N
    if COV:
        cgain = tl.load(cgain_ptr + base + cols, mask=cm, other=0)
    else:
        cgain = tl.zeros([BI], tl.int64)
    if DELTA:  # grid_ptr is the float similarity itself when no grid is held (GRID false)
        cgain = cgain - listed_change(grid_ptr, index_ptr, old_ptr, new_ptr, base, tl.load(count_ptr + b), cols, cm,
                                      N, scale, GRID, BU, BI)
        tl.debug_barrier()  # every thread holding a token (several, below the program's threads) has read it first
        tl.store(cgain_ptr + base + cols, cgain, mask=cm)
    if MINMAX:
        pen = tl.load(penalty_ptr + base + cols, mask=cm, other=0.0)
        _partial_span(K0, gains_ptr, 0, B, b, N, cols, cm, near_ptr, cgain, scale, pen, part_ptr, q, P)
        _partial_span(K1, gains_ptr, 1, B, b, N, cols, cm, near_ptr, cgain, scale, pen, part_ptr, q, P)
        _partial_span(K2, gains_ptr, 2, B, b, N, cols, cm, near_ptr, cgain, scale, pen, part_ptr, q, P)
        _partial_span(K3, gains_ptr, 3, B, b, N, cols, cm, near_ptr, cgain, scale, pen, part_ptr, q, P)


@triton.jit
def _wide_part(KIND: tl.constexpr, gains_ptr, weights_ptr, t: tl.constexpr, B, b, N, cols, cm, near_ptr, cgain,
               scale, pen, part_ptr, P, PB: tl.constexpr, MINMAX: tl.constexpr, PRODUCT: tl.constexpr):
    """Term ``t``'s part of the score at this program's tokens (``_weighted``), the span reduced from every
    program's part."""
    x = _current(KIND, gains_ptr, t, B, b, N, cols, cm, near_ptr, cgain, scale)
    if MINMAX:
        qs = tl.arange(0, PB)
        qm = qs < P
        lo = tl.reduce(tl.load(part_ptr + ((b * 4 + t) * 2) * P + qs, mask=qm, other=float("inf")), 0, nanmin)
        hi = tl.reduce(tl.load(part_ptr + ((b * 4 + t) * 2 + 1) * P + qs, mask=qm, other=float("-inf")), 0, nanmax)
        span = hi - lo
        x = tl.where(span > 0, (x - lo) / span, 0.0)
    return _weighted(tl.load(weights_ptr + t), x, PRODUCT)


@triton.jit
def _wide_score_kernel(gains_ptr, weights_ptr, penalty_ptr, near_ptr, scale, cgain_ptr, count_ptr, part_ptr,
                       top_ptr, at_ptr, B, N, P,
                       K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                       MINMAX: tl.constexpr, PRODUCT: tl.constexpr, PB: tl.constexpr, BI: tl.constexpr):
    """The score at this program's tokens, term by term in order, and its best candidate (lowest index)."""
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    cols = q * BI + tl.arange(0, BI)
    cm = cols < N
    base = b * N
    pen = tl.load(penalty_ptr + base + cols, mask=cm, other=0.0)
    cgain = tl.load(cgain_ptr + base + cols, mask=cm, other=0)
    total = _wide_part(K0, gains_ptr, weights_ptr, 0, B, b, N, cols, cm, near_ptr, cgain, scale, pen, part_ptr, P,
                       PB, MINMAX, PRODUCT)
    if K1 != 0:
        total = _combined(total, _wide_part(K1, gains_ptr, weights_ptr, 1, B, b, N, cols, cm, near_ptr, cgain, scale,
                                            pen, part_ptr, P, PB, MINMAX, PRODUCT), PRODUCT)
    if K2 != 0:
        total = _combined(total, _wide_part(K2, gains_ptr, weights_ptr, 2, B, b, N, cols, cm, near_ptr, cgain, scale,
                                            pen, part_ptr, P, PB, MINMAX, PRODUCT), PRODUCT)
    if K3 != 0:
        total = _combined(total, _wide_part(K3, gains_ptr, weights_ptr, 3, B, b, N, cols, cm, near_ptr, cgain, scale,
                                            pen, part_ptr, P, PB, MINMAX, PRODUCT), PRODUCT)
    s = tl.where(cm, finite(total) - pen, float("-inf"))
    top = tl.max(s, 0)
    tl.store(top_ptr + b * P + q, top)
    tl.store(at_ptr + b * P + q, tl.min(tl.where(s == top, cols, N), 0))
    if q == 0:
        tl.store(count_ptr + b, 0)  # the list the pick's update writes next starts empty


@triton.jit
def _wide_pick_kernel(penalty_ptr, picks_ptr, step, sim_ptr, near_ptr, grid_ptr, scale, cbest_ptr, chosen_ptr,
                      index_ptr, old_ptr, new_ptr, count_ptr, top_ptr, at_ptr, update, B, N, K, P,
                      NEAR: tl.constexpr, COV: tl.constexpr, GRID: tl.constexpr, OUT: tl.constexpr,
                      PB: tl.constexpr, BI: tl.constexpr):
    """The pick from every program's best (highest score, then lowest index), written by the first program; then,
    when ``update``, the scorers' updates at this program's tokens, the changed coverage terms appended to the
    list (its order does not matter: the change is an exact integer sum)."""
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    qs = tl.arange(0, PB)
    qm = qs < P
    tops = tl.load(top_ptr + b * P + qs, mask=qm, other=float("-inf"))
    best = tl.max(tops, 0)
    p = tl.min(tl.where(qm & (tops == best), tl.load(at_ptr + b * P + qs, mask=qm, other=N), N), 0)
    base = b * N
    if q == 0:
        tl.store(penalty_ptr + base + p, float("inf"))
        tl.store(picks_ptr + b * K + step, p.to(tl.int64))
    if update != 0:
        cols = q * BI + tl.arange(0, BI)
        cm = cols < N
        f = tl.load(sim_ptr + (base + p) * N + cols, mask=cm, other=0.0)
        if NEAR:
            near = tl.load(near_ptr + base + cols, mask=cm, other=0.0)
        if COV:
            cbest = tl.load(cbest_ptr + base + cols, mask=cm, other=0)
            chosen = tl.load(chosen_ptr + base + cols, mask=cm, other=1) != 0
        tl.debug_barrier()  # every thread holding a token (several, below the program's threads) has read it first
        if NEAR:
            tl.store(near_ptr + base + cols, nanmax(near, f), mask=cm)
        if COV:
            if GRID:
                col = tl.load(grid_ptr + (base + p) * N + cols, mask=cm, other=0)
            else:
                col = round_half_even(f * scale).to(tl.int64)
            changed = (((col > cbest) & (chosen == 0)) | (cols == p)) & cm
            grown = tl.maximum(cbest, col)
            flag = changed.to(tl.int32)
            start = tl.atomic_add(count_ptr + b, tl.sum(flag, 0))
            pos = start + tl.cumsum(flag, 0) - 1
            tl.store(index_ptr + base + pos, cols.to(tl.int64), mask=changed)
            tl.store(old_ptr + base + pos, cbest, mask=changed)
            tl.store(new_ptr + base + pos, tl.where(cols == p, OUT, grown), mask=changed)
            tl.store(cbest_ptr + base + cols, grown, mask=cm)
            tl.store(chosen_ptr + base + cols, (chosen | (cols == p)).to(tl.uint8), mask=cm)


class _Wide:
    """The buffers of one wide selection, allocated at its first step, and its terms as the kernels take them."""

    def __init__(self, terms: _Terms, B, N, device):
        self.terms = terms
        self.cols, self.rows, self.warps = wide_launch(N)
        self.P = triton.cdiv(N, self.cols)
        self.part = torch.empty(B, 4, 2, self.P, dtype=torch.float64, device=device)
        self.top = torch.empty(B, self.P, dtype=torch.float64, device=device)
        self.at = torch.empty(B, self.P, dtype=torch.int32, device=device)
        self.count = torch.zeros(B, dtype=torch.int32, device=device)
        self.lists = torch.empty(3, B, N, dtype=torch.int64, device=device)


def wide_step(gains, weights, weight_tensor, penalty, picks, step, start, normalize, combine, terms, runs, work):
    """Same arguments and effect as ``greedy._wide_step_reference``; returns the buffers for the next step."""
    T, B, N = gains.shape
    K = picks.shape[1]
    if work is None:
        work = _Wide(_Terms(terms, weights, normalize, combine, dummy=penalty), B, N, gains.device)
    w, f = work, work.terms
    pb = triton.next_power_of_2(w.P)
    common = dict(K0=f.kinds[0], K1=f.kinds[1], K2=f.kinds[2], K3=f.kinds[3], MINMAX=f.minmax, enable_fp_fusion=False)
    gains_args = (gains, penalty, f.near_best, f.grid, f.scale, f.cgain, *w.lists, w.count, w.part, B, N, w.P)
    if step == start:  # the spans of the gains already in the buffers (nothing listed yet)
        _wide_gains_kernel[(B, w.P)](*gains_args, COV=f.cov, DELTA=False, GRID=f.grid_held, BU=w.rows,
                                     BI=w.cols, num_warps=w.warps, **common)
    _wide_score_kernel[(B, w.P)](gains, weight_tensor, penalty, f.near_best, f.scale, f.cgain, w.count, w.part, w.top,
                                 w.at, B, N, w.P, PRODUCT=f.product, PB=pb, BI=w.cols, **common)
    last = step + 1 >= K
    _wide_pick_kernel[(B, w.P)](penalty, picks, step, f.sim, f.near_best, f.grid, f.scale, f.cbest, f.chosen,
                                *w.lists, w.count, w.top, w.at, 0 if last else 1, B, N, K, w.P, NEAR=f.near,
                                COV=f.cov, GRID=f.grid_held, OUT=f.out, PB=pb, BI=w.cols, enable_fp_fusion=False)
    if not last:
        _wide_gains_kernel[(B, w.P)](*gains_args, COV=f.cov, DELTA=f.cov, GRID=f.grid_held, BU=w.rows,
                                     BI=w.cols, num_warps=w.warps, **common)
    return work
