"""Greedy selection over a combination of scorers: the engine shared by TOPS, DivPrune and SCOPE."""

from __future__ import annotations

import math
import numbers
import os
from typing import Literal, Sequence

import torch
from torch import Tensor

from prunekit.plugin import FusedTerm, GraphCache, Kernel, Scorer, ScorerRun, SelectionInput, Selector, hookimpl

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


def combined_score(gains: Tensor, weights: Sequence[float], penalty: Tensor, normalize: Normalize,
                   combine: str) -> Tensor:
    """The greedy score ``[B, N]`` of gains ``[T, B, N]`` (float64): each term normalised over the candidates,
    then ``Σ w·N(g)`` (``sum``) or ``Π max(N(g), 0)^w`` (``product``), term by term in order."""
    g = normalize_over(gains, penalty, normalize)
    total = None
    for t, weight in enumerate(weights):  # term by term, in order: the sums round as the spec's would
        if combine == "sum":
            part = weight * g[t]
            total = part if total is None else total + part
        else:
            part = g[t].clamp_min(0) ** weight
            total = part if total is None else total * part
    return total  # type: ignore[return-value]


def fusable(weights: Sequence[float], normalize: str, combine: str) -> bool:
    """Whether the Triton kernels compute a greedy score of this form exactly: ``normalize`` "minmax" or "none" with
    ``combine`` "sum", or "product" with every weight 0 or 1 (no ``pow``: a GPU's need not round as a CPU's)."""
    return normalize in ("minmax", "none") and (combine == "sum" or
                                               (combine == "product" and all(w in (0.0, 1.0) for w in weights)))


def _pick_reference(gains: Tensor, weights: tuple, weight_tensor: Tensor, penalty: Tensor, picks: Tensor, step: int,
                    normalize: Normalize, combine: str) -> Tensor:
    picked = _best_candidate(combined_score(gains, weights, penalty, normalize, combine), penalty)
    penalty.scatter_(1, picked[:, None], float("inf"))
    picks[:, step] = picked
    return picks[:, step]


def _run_reference(gains: Tensor, weights: tuple, weight_tensor: Tensor, penalty: Tensor, picks: Tensor, start: int,
                   normalize: Normalize, combine: str, terms: list[FusedTerm], runs: list[ScorerRun]) -> None:
    k = picks.shape[1]
    for step in range(start, k):
        if step > start:
            for t, run in enumerate(runs):
                run.gains_into(gains[t])
        picked = PICK(gains.device, gains, weights, weight_tensor, penalty, picks, step, normalize, combine)
        if step + 1 < k:
            for run in runs:
                run.update(picked)


def _wide_step_reference(gains: Tensor, weights: tuple, weight_tensor: Tensor, penalty: Tensor, picks: Tensor,
                         step: int, start: int, normalize: Normalize, combine: str, terms: list[FusedTerm],
                         runs: list[ScorerRun], work: object) -> object:
    if step > start:
        for t, run in enumerate(runs):
            run.gains_into(gains[t])
    picked = PICK(gains.device, gains, weights, weight_tensor, penalty, picks, step, normalize, combine)
    if step + 1 < picks.shape[1]:
        for run in runs:
            run.update(picked)
    return work


#: one greedy step after the gains are known: score every candidate, take the best, mark it chosen
#: (``penalty`` +inf, ``picks[:, step]``). Triton covers the forms :func:`fusable` names.
PICK = Kernel("greedy_pick", _pick_reference, "prunekit_plugins.selectors._greedy_triton:pick")
#: the rest of a selection from step ``start`` on (the gains of that step in the buffer), every pick and every
#: update: one launch where every term has a fused form (``ScorerRun.fused``) and N <= RUN_MAX_TOKENS. The
#: reference runs the step loop with the runs themselves (their updates and PICK), which is what the Triton kernel
#: is tested against.
RUN = Kernel("greedy_run", _run_reference, "prunekit_plugins.selectors._greedy_triton:run")
#: the most tokens RUN takes (one GPU program per sample keeps every token's state in registers)
RUN_MAX_TOKENS = 4096
#: the most tokens RUN takes when a term is coverage: its changed rows' sums are what one program per sample does
#: slowly. Measured on an H200 (replayed from a CUDA graph, docs/performance.md): with coverage the wide steps were
#: faster from N = 576 on (TOPS 1.5 vs 2.0 ms at 576 and 4.8 vs 14.7 ms at 2,880, batch 1; SCOPE likewise), without
#: it one program (DivPrune 0.8 vs 1.0 ms at 576 and 1.3 vs 2.3 ms at 2,880); below 576 unmeasured.
RUN_MAX_COVERAGE_TOKENS = 512
#: one step of a fused selection above RUN_MAX_TOKENS, spread over many programs per sample (three launches on a
#: GPU: the score and each slice's best, the pick and the updates, coverage's change and the spans of the next
#: gains). Used only where Triton runs (elsewhere the step loop runs as it is); the reference is one step of the
#: loop. Returns the buffers it keeps between steps (None before the first).
WIDE_STEP = Kernel("greedy_wide_step", _wide_step_reference,
                   "prunekit_plugins.selectors._greedy_triton:wide_step")
#: greedy selections replayed from CUDA graphs (see prunekit.kernels.GraphCache)
GRAPHS = GraphCache()


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

    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        with torch.no_grad():  # indices carry no gradient; the loop's in-place and out= operations need none
            if self.max_similarity_bytes is not None:
                inputs.limit_similarity(self.max_similarity_bytes)
            key = self._graph_key(inputs, k)
            if key is None:
                return self._select(inputs, k)
            cap = inputs.max_similarity_bytes
            return GRAPHS.run(key, lambda f, r, q: self._select(SelectionInput(f, r, q, cap), k),
                              inputs.features, inputs.relevance, inputs.query)

    def _graph_key(self, inputs: SelectionInput, k: int) -> tuple | None:
        """What fixes a selection's work, when it can be replayed from a CUDA graph (GRAPHS); else None."""
        f = inputs.features
        B, N = inputs.batch_size, inputs.num_tokens
        if inputs.streamed or k >= N or not PICK.uses_triton(f.device):
            return None
        if not GRAPHS.enabled(f.device, B * N * N * (f.element_size() + 8)):
            return None
        parts = []
        for scorer, weight in [*self.terms, (self.seed, None)]:
            if scorer is None:
                continue
            if not getattr(scorer, "capturable", False):
                return None
            parts.append((type(scorer), tuple(sorted(vars(scorer).items())), weight))
        shape = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
        # the fused-path setting too: a graph recorded on one path must not replay for another (same indices,
        # different work)
        path = os.environ.get("PRUNEKIT_FUSED_SELECTION", "1").strip().lower()
        key = (tuple(parts), self.combine, self.normalize, inputs.max_similarity_bytes, k, shape(f), f.device,
               shape(inputs.relevance), shape(inputs.query), path)
        try:
            hash(key)
        except TypeError:  # a scorer attribute that is not a plain value
            return None
        return key

    def _select(self, inputs: SelectionInput, k: int) -> Tensor:
        B, N = inputs.batch_size, inputs.num_tokens
        device = inputs.features.device
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k >= N:
            return torch.arange(N, device=device).expand(B, N).clone()
        runs = [scorer.start(inputs) for scorer, _ in self.terms]
        # Every buffer of the loop is allocated here: inside it, shapes are static and nothing is read back to the
        # host (a step is the scorers' updates and one PICK), so a GPU runs the K steps without waiting.
        gains = torch.empty(len(runs), B, N, dtype=torch.float64, device=device)
        weights = tuple(w for _, w in self.terms)
        weight_tensor = torch.empty(len(weights), dtype=torch.float64, device=device)
        for t, w in enumerate(weights):  # filled on the device: no copy from host memory (capturable)
            weight_tensor[t].fill_(float(w))
        penalty = torch.zeros(B, N, dtype=torch.float64, device=device)  # +inf at chosen tokens
        picks = torch.empty(B, k, dtype=torch.long, device=device)
        fused = fusable(weights, self.normalize, self.combine)
        for step in range(k):
            if step == 0 and self.seed is not None:
                picked = _best_candidate(self.seed.start(inputs).gains(), penalty)
                penalty.scatter_(1, picked[:, None], float("inf"))
                picks[:, 0] = picked
                picked = picks[:, 0]
            else:
                for t, run in enumerate(runs):
                    run.gains_into(gains[t])
                terms = self._fused_terms(runs) if step == 1 and fused else None
                mode = self._fused_mode(N, device, terms) if terms is not None else None
                if mode == "run":  # the remaining steps in one kernel
                    RUN(device, gains, weights, weight_tensor, penalty, picks, step, self.normalize, self.combine,
                        terms, runs)
                    break
                if mode == "wide":  # the remaining steps, each spread over the GPU
                    work = None
                    for later in range(step, k):
                        work = WIDE_STEP(device, gains, weights, weight_tensor, penalty, picks, later, step,
                                         self.normalize, self.combine, terms, runs, work)
                    break
                picked = PICK(device, gains, weights, weight_tensor, penalty, picks, step, self.normalize, self.combine,
                              triton=fused)
            if step + 1 < k:
                for run in runs:
                    run.update(picked)
        return picks.sort(-1).values

    @staticmethod
    def _fused_mode(num_tokens: int, device: torch.device, terms: list[FusedTerm]) -> str | None:
        """How the steps after the first run when every term has a fused form (``terms``): ``"run"`` (:data:`RUN`,
        up to :data:`RUN_MAX_TOKENS` tokens, :data:`RUN_MAX_COVERAGE_TOKENS` with a coverage term), ``"wide"``
        (:data:`WIDE_STEP`, above, where Triton runs) or None (the step loop). ``PRUNEKIT_FUSED_SELECTION`` in the
        environment: ``0`` the step loop, ``wide`` the wide steps at any size where Triton runs, ``run`` one
        program per sample up to :data:`RUN_MAX_TOKENS` whatever the terms (for comparisons)."""
        setting = os.environ.get("PRUNEKIT_FUSED_SELECTION", "1").strip().lower()
        if setting not in ("", "1", "0", "wide", "run"):
            raise ValueError(f"PRUNEKIT_FUSED_SELECTION must be '1' (the default), '0', 'wide' or 'run'; got "
                             f"{setting!r}")
        if setting == "0":
            return None
        wide = WIDE_STEP.uses_triton(device)
        if setting == "wide" and wide:
            return "wide"
        most = RUN_MAX_TOKENS
        if setting != "run" and any(t.kind == "coverage" for t in terms):
            most = RUN_MAX_COVERAGE_TOKENS
        if num_tokens <= most:
            return "run"
        return "wide" if wide else None

    @staticmethod
    def _fused_terms(runs: list[ScorerRun]) -> list[FusedTerm] | None:
        """The runs' fused forms when every run has one the fused kernels carry on (at most one ``nearest`` and one
        ``coverage``, all on one held similarity matrix), else None."""
        terms = [run.fused() for run in runs]
        if any(t is None for t in terms) or len(terms) > 4:
            return None
        kinds = [t.kind for t in terms]
        if kinds.count("nearest") > 1 or kinds.count("coverage") > 1:
            return None
        held = {id(t.similarity) for t in terms if t.similarity is not None}
        return terms if len(held) == 1 else None


@hookimpl
def prunekit_register_selectors(register):
    register(GreedySelector)
