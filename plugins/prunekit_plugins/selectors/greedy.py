"""Greedy selection over a combination of scorers: the engine shared by TOPS, DivPrune and SCOPE."""

from __future__ import annotations

import math
import numbers
from typing import Literal, Sequence

import torch
from torch import Tensor

from prunekit.plugin import Scorer, SelectionInput, Selector, hookimpl

Normalize = Literal["minmax", "mean", "none"]


def normalize_over(x: Tensor, penalty: Tensor, how: Normalize) -> Tensor:
    """Normalise ``x`` ``[..., B, N]`` over the candidate tokens only (chosen tokens are ignored).

    ``penalty`` (``[B, N]``, ``x``'s dtype): 0 at candidates and +inf at chosen tokens."""
    if how == "none":
        return x
    if how == "minmax":
        lo = (x + penalty).amin(-1, keepdim=True)
        hi = (x - penalty).amax(-1, keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (x - lo) / span, 0.0)
    if how == "mean":
        candidates = penalty == 0
        mean = (x * candidates).sum(-1, keepdim=True) / candidates.sum(-1, keepdim=True).clamp_min(1)
        return torch.where(mean != 0, x / mean, torch.zeros_like(x))
    raise ValueError(f"normalize must be one of 'minmax', 'mean', 'none'; got {how!r}")


def _best_candidate(score: Tensor, penalty: Tensor) -> Tensor:
    """Per row, the lowest-index candidate (``penalty`` 0) with the largest score. Scores are first made finite
    (NaN and -inf: the lowest float, +inf: the highest), so a chosen token (-inf after the penalty) is never
    picked again, whatever the scores hold."""
    if not score.is_floating_point():
        score = score.to(torch.float64)
    info = torch.finfo(score.dtype)
    finite = torch.nan_to_num(score, nan=info.min, posinf=info.max, neginf=info.min)
    return (finite - penalty.to(score.dtype)).argmax(-1)


class GreedySelector(Selector):
    """Pick ``k`` tokens one at a time, each maximising the combined gain of the scorers.

    ``combine="sum"``: ``Σ w·N(g)`` (TOPS); ``combine="product"``: ``Π max(g, 0)^w`` (SCOPE). ``seed``: a scorer
    whose initial gains choose the first token (TOPS: relevance); without one the first token maximises the
    combined gain against the empty set. Ties go to the lowest index. ``max_similarity_bytes``: above it, scorers
    read rows of the similarity matrix computed on demand instead of a held matrix (see SelectionInput).
    """

    name = "greedy"

    def __init__(
        self,
        terms: Sequence[tuple[Scorer, float]],
        combine: Literal["sum", "product"] = "sum",
        normalize: Normalize = "minmax",
        seed: Scorer | None = None,
        max_similarity_bytes: int | None = None,
    ) -> None:
        if not terms:
            raise ValueError("GreedySelector needs at least one (scorer, weight) term")
        for scorer, weight in terms:
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
                raise ValueError(f"weight of scorer {getattr(scorer, 'name', scorer)!r} must be a finite number >= 0, "
                                 f"got {weight!r}")
        if combine not in ("sum", "product"):
            raise ValueError(f"combine must be 'sum' or 'product'; got {combine!r}")
        limit = max_similarity_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"max_similarity_bytes must be None or an int >= 0, got {limit!r}")
        self.terms = list(terms)
        self.combine = combine
        self.normalize = normalize
        self.seed = seed
        self.max_similarity_bytes = max_similarity_bytes

    def _score(self, runs, penalty: Tensor) -> Tensor:
        # All terms at once ([T, B, N], float64): one pass of normalisation ops per step instead of one per term.
        gains = torch.stack([run.gains().to(torch.float64) for run, _ in runs])
        g = normalize_over(gains, penalty, self.normalize)
        total = None
        for t, (_, weight) in enumerate(runs):  # term by term, in order: the sums round as the spec's would
            if self.combine == "sum":
                part = weight * g[t]
                total = part if total is None else total + part
            else:
                part = g[t].clamp_min(0) ** weight
                total = part if total is None else total * part
        return total  # type: ignore[return-value]

    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        B, N = inputs.batch_size, inputs.num_tokens
        device = inputs.features.device
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k >= N:
            return torch.arange(N, device=device).expand(B, N).clone()
        if self.max_similarity_bytes is not None:
            inputs.limit_similarity(self.max_similarity_bytes)
        runs = [(scorer.start(inputs), weight) for scorer, weight in self.terms]
        penalty = torch.zeros(B, N, dtype=torch.float64, device=device)  # +inf at chosen tokens
        rows = torch.arange(B, device=device)
        picks = []
        for step in range(k):
            if step == 0 and self.seed is not None:
                score = self.seed.start(inputs).gains()
            else:
                score = self._score(runs, penalty)
            picked = _best_candidate(score, penalty)
            penalty[rows, picked] = float("inf")
            picks.append(picked)
            if step + 1 < k:
                for run, _ in runs:
                    run.update(picked)
        return torch.stack(picks, 1).sort(-1).values


@hookimpl
def prunekit_register_selectors(register):
    register(GreedySelector)
