"""Turning a layer-averaged budget into per-stage counts.

A method that prunes at several depths keeps different counts in different layers. Papers quote the
layer-averaged count ``T``: ``(sum over layers of the visual tokens that layer sees) / L``. Given a shape
(TOPS without a preset: the paper's ``2T → T → T/4``) we scale it by ``c`` so that the average is ``T``; each
stage is capped by the one before (and the first by ``n``). (A paper's nominal budgets, which are not layer
averages, are reproduced by the method's presets instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BudgetError


@dataclass(frozen=True)
class StagePlacement:
    """Where a stage's count applies and its relative size, for :func:`resolve_counts`."""

    first_layer: int  # first decoder layer that sees this stage's count (0 for before the LLM)
    shape: float  # relative size of this stage's count


def layer_average(n: int, counts: list[int], placements: list[StagePlacement], num_layers: int) -> float:
    """Layer-averaged visual-token count of a schedule."""
    total, prev_layer, prev_count = 0, 0, n
    for count, p in zip(counts, placements):
        total += (p.first_layer - prev_layer) * prev_count
        prev_layer, prev_count = p.first_layer, count
    total += (num_layers - prev_layer) * prev_count
    return total / num_layers


def _counts(c: float, target: float, n: int, placements: list[StagePlacement]) -> list[float]:
    out, cap = [], float(n)
    for p in placements:
        cap = min(cap, max(1.0, c * p.shape * target))
        out.append(cap)
    return out


def resolve_counts(n: int, target: float, placements: list[StagePlacement], num_layers: int) -> list[int]:
    """Per-stage counts whose layer average is ``target`` (to rounding) for ``n`` visual tokens."""
    if n <= 0:
        return [0 for _ in placements]
    if target > n:
        raise BudgetError(f"keep_tokens={target:g} is more than the {n} visual tokens present")
    if target >= n:
        return [n for _ in placements]

    def avg(c: float) -> float:
        counts = _counts(c, target, n, placements)
        return layer_average(n, counts, placements, num_layers)  # type: ignore[arg-type]

    lowest = layer_average(n, [1] * len(placements), placements, num_layers)
    if lowest > target + 1e-9:
        raise BudgetError(
            f"a layer-averaged {target:g} of {n} visual tokens is out of reach with stages starting at layers "
            f"{[p.first_layer for p in placements]} of {num_layers}: the least possible is {lowest:.1f}; "
            "prune earlier or ask for more tokens"
        )
    lo, hi = 0.0, 1.0
    while avg(hi) < target:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    counts = [int(x + 0.5) for x in _counts(hi, target, n, placements)]
    return [max(1, min(n, k)) for k in counts]
