"""The interfaces of selection, usable without a model: what a selection reads (:class:`SelectionInput`), the
per-token gains of a :class:`Scorer` (set-dependent ones in a :class:`ScorerRun`), a :class:`Selector` that turns
them into kept indices, and what a method may return besides indices (:class:`Choice`, :class:`Reduction`).

Selection is split in two so that ablations are configuration, not code:

* a :class:`Scorer` turns features (and optionally a relevance vector) into a per-token gain. Gains that depend on
  the set already chosen (coverage, diversity) live in a :class:`ScorerRun`, which the selector updates after each
  pick, so incremental state never leaks into the selector;
* a :class:`Selector` turns features, relevance and a budget ``k`` into kept indices. The greedy selector combines
  any registered scorers (TOPS: weighted sum of normalised gains; SCOPE: product; DivPrune: one scorer), a DPP
  selector uses features and relevance directly.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .ops import take_rows

__all__ = ["SelectionInput", "Choice", "Reduction", "FusedTerm", "ScorerRun", "Scorer", "Selector"]


# ---------------------------------------------------------------------------------------------------------
# Selection (pure tensor functions, no model)
# ---------------------------------------------------------------------------------------------------------
class SelectionInput:
    """Features ``[B, N, D]`` and optional relevance ``[B, N]`` of one pruning point, with shared derived tensors.

    The cosine-similarity matrix ``F`` is computed exactly: each normalised feature is rounded to the grid
    ``2^-FEATURE_BITS`` (``2^-26``, finer than float32 near 1), and the dot products of those grid vectors are
    exact in float64, whatever the order of their sums (every product and partial sum is a multiple of ``2^-52``
    below 2 in magnitude: by Cauchy–Schwarz, at most the product of two norms of about 1), then rounded once to
    the features' dtype. So ``F[i, j]`` depends on tokens ``i`` and ``j`` only, never on the other rows of the
    matrix product that computed it: ``F`` is exactly symmetric, a row computed alone equals that row of the
    whole matrix bit for bit, and a selection is the same batched or row by row, held or streamed, on any BLAS.

    Scorers that only need some rows of F (the greedy scorers) read them with :meth:`similarity_rows` /
    :meth:`similarity_block` / :meth:`similarity_to`. When the whole ``[B, N, N]`` matrix would take more than
    ``max_similarity_bytes`` (video-scale N) those rows are computed on demand from the features instead of being
    cut from a held matrix (:attr:`streamed`), and readers take them a block at a time (:meth:`block_rows`), so the
    memory of a selection stays within ``max_similarity_bytes`` plus ``O(N·D)``.
    """

    #: default memory cap for holding the whole similarity matrix (bytes, all batch rows together)
    MAX_SIMILARITY_BYTES: ClassVar[int] = 1 << 30
    #: fraction bits of the grid the normalised features are rounded to before their exact dot products
    FEATURE_BITS: ClassVar[int] = 26
    #: the least rows of F a work block holds whatever the cap (a block is never smaller than the features)
    MIN_BLOCK_ROWS: ClassVar[int] = 16

    def __init__(
        self,
        features: Tensor,
        relevance: Tensor | None = None,
        query: Tensor | None = None,
        max_similarity_bytes: int | None = None,
    ) -> None:
        if features.dim() != 3:
            raise ValueError(f"features must have shape [B, N, D], got {tuple(features.shape)}")
        if relevance is not None and relevance.shape != features.shape[:2]:
            raise ValueError(
                f"relevance must have shape [B, N] = {tuple(features.shape[:2])}, got {tuple(relevance.shape)}"
            )
        # Half precision cosine similarities tie too often; float64 inputs stay float64 (for exactness tests).
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        self.features = features.to(dtype)
        self.relevance = None if relevance is None else relevance.to(dtype)
        if query is not None and (query.dim() != 3 or query.shape[0] != features.shape[0]):
            raise ValueError(f"query must have shape [B, Q, D] with B = {features.shape[0]}, got {tuple(query.shape)}")
        #: optional query tokens ``[B, Q, D]`` (e.g. the instruction's embeddings) for query-aware scorers
        self.query = None if query is None else query.to(dtype)
        self._similarity: Tensor | None = None
        self._normalized: Tensor | None = None
        self._grid: Tensor | None = None
        self._last_column: tuple[Tensor, Tensor] | None = None
        self._held_extra = 0  # bytes of N×N matrices scorers hold besides F (see hold)
        #: True when rows of F are computed on demand instead of cut from a held matrix
        self.streamed = False
        #: the memory cap in bytes (see limit_similarity)
        self.max_similarity_bytes = self.MAX_SIMILARITY_BYTES
        self.limit_similarity(self.MAX_SIMILARITY_BYTES if max_similarity_bytes is None else max_similarity_bytes)

    def limit_similarity(self, max_bytes: int) -> None:
        """Hold the whole similarity matrix only when it fits ``max_bytes`` (call before anything reads it)."""
        valid = isinstance(max_bytes, numbers.Real) and not isinstance(max_bytes, bool)
        if not (valid and 0 <= max_bytes < math.inf):
            raise ValueError(f"max_similarity_bytes must be a finite number of bytes >= 0, got {max_bytes!r}")
        if self._similarity is None:
            self.max_similarity_bytes = max_bytes
            self.streamed = self._matrix_bytes(self.features.element_size()) > max_bytes

    def _matrix_bytes(self, element_size: int) -> int:
        B, N = self.features.shape[:2]
        return B * N * N * element_size

    def _held(self) -> int:
        return (0 if self.streamed else self._matrix_bytes(self.features.element_size())) + self._held_extra

    def hold(self, element_size: int) -> bool:
        """Whether a scorer may hold one more ``[B, N, N]`` matrix of ``element_size`` bytes per element next to F
        within the cap; True reserves it. Never while streamed."""
        nbytes = self._matrix_bytes(element_size)
        if self.streamed or self._held() + nbytes > self.max_similarity_bytes:
            return False
        self._held_extra += nbytes
        return True

    def block_rows(self, bytes_per_element: int) -> int:
        """Rows of F to work on at once: a ``[B, rows, N]`` block of ``bytes_per_element`` (all its temporaries
        counted) fits the memory the cap leaves beside what is held, or, below that, the size of the features
        (at least :attr:`MIN_BLOCK_ROWS` rows)."""
        B, N, D = self.features.shape
        floor = B * N * max(D * self.features.element_size(), self.MIN_BLOCK_ROWS * bytes_per_element)
        budget = max(self.max_similarity_bytes - self._held(), floor)
        return max(1, min(N, int(budget // max(1, B * N * bytes_per_element))))

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    @property
    def normalized(self) -> Tensor:
        """L2-normalised features ``[B, N, D]``."""
        if self._normalized is None:
            self._normalized = torch.nn.functional.normalize(self.features, dim=-1)
        return self._normalized

    @property
    def _grid_features(self) -> Tensor:
        """The normalised features rounded to the grid ``2^-FEATURE_BITS``, in float64, ``[B, N, D]``."""
        if self._grid is None:
            scale = 2.0**self.FEATURE_BITS
            self._grid = self.normalized.to(torch.float64, copy=True).mul_(scale).round_().div_(scale)
        return self._grid

    def _exact(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``F`` between grid features ``rows`` ``[B, R, D]`` and ``cols`` ``[B, C, D]``, ``[B, R, C]``: every
        product and partial sum is a multiple of ``2^-2·FEATURE_BITS`` below 2 in magnitude, so float64 holds it
        exactly and the result is the same for any BLAS and any blocking; then rounded once to the features'
        dtype."""
        dot = rows @ cols.transpose(-1, -2)
        return dot if self.features.dtype == torch.float64 else dot.to(self.features.dtype)

    @property
    def similarity(self) -> Tensor:
        """Cosine similarity of the rows, ``[B, N, N]``, exactly symmetric (computed once, shared by all scorers).

        Large matrices are built a band of rows at a time, each band only from the diagonal on (the rest is its
        mirror image): fewer products, and no band outgrows the memory cap."""
        if self._similarity is None:
            B, N = self.features.shape[:2]
            grid = self._grid_features
            step = min(self.block_rows(8 + self.features.element_size()), N if N < 256 else -(-N // 4))
            if step >= N:  # one band: the whole matrix
                self._similarity = self._exact(grid, grid)
                return self._similarity
            out = torch.empty(B, N, N, dtype=self.features.dtype, device=self.features.device)
            for start in range(0, N, step):
                end = min(N, start + step)
                out[:, start:end, start:].copy_(grid[:, start:end] @ grid[:, start:].transpose(-1, -2))  # as _exact
                out[:, end:, start:end].copy_(out[:, start:end, end:].transpose(-1, -2))
            self._similarity = out
        return self._similarity

    def similarity_rows(self, index: Tensor) -> Tensor:
        """Rows ``F[b, index[b, u], :]`` as ``[B, U, N]`` (equal to the columns, F being symmetric).

        Streamed, this computes ``U`` whole rows at once: read many rows through :meth:`block_rows` blocks."""
        if not self.streamed:
            return take_rows(self.similarity, index)
        grid = self._grid_features
        return self._exact(take_rows(grid, index), grid)

    def similarity_block(self, start: int, end: int) -> Tensor:
        """Rows ``start:end`` of F for every sample, ``[B, end - start, N]``."""
        if not self.streamed:
            return self.similarity[:, start:end]
        grid = self._grid_features
        return self._exact(grid[:, start:end], grid)

    def similarity_to(self, picked: Tensor) -> Tensor:
        """``F[b, :, picked[b]]`` as ``[B, N]``: every token's similarity to one token per sample."""
        # Every set-dependent scorer asks for the column of the token just picked: compute it once per pick.
        if self._last_column is None or self._last_column[0] is not picked:
            self._last_column = (picked, self.similarity_rows(picked[:, None]).squeeze(1))
        return self._last_column[1]


@dataclass
class Choice:
    """One sample's result of a stage that also changes token values (merging, pooling, recycling).

    ``indices`` are kept indices into the stage's visual tokens; ``values`` (``[k, D]``, aligned with
    ``indices``, in the stage's feature space) replace those tokens' features; ``merged`` (``[k]`` bool) marks
    the tokens whose value is a merge of several tokens, or no visual token's own (such as the encoder's [CLS]
    feature), so that reports can tell them apart. A plain tensor of
    indices is the same as ``Choice(indices)``.

    ``ordered``: by default each kept token stays at its own index's place in the sequence. With ``ordered=True``
    the tokens fill the places of ``indices`` (taken in sequence order) in the order given: the i-th token of the
    Choice goes to the i-th kept place. A method appends merged tokens after the kept ones this way (SparseVLM's
    recycled tokens). Reports list the tokens in sequence order. (Per-image budgets, ``budget_per="image"``, and
    model-free :class:`Reduction` results keep index order.)
    """

    indices: Tensor
    values: Tensor | None = None
    merged: Tensor | None = None
    ordered: bool = False

    def __post_init__(self) -> None:
        k = self.indices.numel()
        if self.values is not None and self.values.shape[0] != k:
            raise ValueError(f"Choice.values has {self.values.shape[0]} rows for {k} indices")
        if self.merged is not None and self.merged.numel() != k:
            raise ValueError(f"Choice.merged has {self.merged.numel()} entries for {k} indices")


class Reduction:
    """Model-free result of a merging method: kept ``indices`` ``[B, k]`` (ascending), their ``values``
    ``[B, k, D]`` and ``merged`` flags ``[B, k]``."""

    def __init__(self, indices: Tensor, values: Tensor, merged: Tensor) -> None:
        self.indices, self.values, self.merged = indices, values, merged

    @classmethod
    def from_choices(cls, choices: list[Choice], features: Tensor) -> "Reduction":
        """Per-sample :class:`Choice` objects of equal size, batched; a choice without values keeps the features
        ``[B, N, D]`` of its tokens. Sorted by index."""
        idx = torch.stack([c.indices.long() for c in choices])
        order = idx.argsort(-1)
        idx = idx.gather(1, order)
        values = torch.stack([
            features[b, c.indices.long()] if c.values is None else c.values.to(features.dtype)
            for b, c in enumerate(choices)
        ])
        values = values.gather(1, order[..., None].expand(-1, -1, values.shape[-1]))
        merged = torch.stack([
            torch.zeros(c.indices.numel(), dtype=torch.bool) if c.merged is None else c.merged.bool().cpu()
            for c in choices
        ]).to(idx.device).gather(1, order)
        return cls(idx, values, merged)

    def __repr__(self) -> str:
        return f"Reduction(indices={tuple(self.indices.shape)}, merged={int(self.merged.sum())})"


@dataclass
class FusedTerm:
    """A :class:`ScorerRun`'s state in one of the forms a selector can update by itself, from
    :meth:`ScorerRun.fused`. A selector that knows these forms may run the rest of a selection in one fused loop
    (the greedy selector: one kernel launch on a GPU), updating the tensors below in place exactly as
    :meth:`ScorerRun.update` would have; the run is not used again. ``F`` is ``similarity`` (``[B, N, N]``, held,
    exactly symmetric: row ``p`` is column ``p``).

    * ``"constant"``: gains that do not depend on the set; the selector's buffer already holds them.
    * ``"nearest"``: gains ``1 − best``, computed in ``best``'s dtype; after a pick ``p``,
      ``best = maximum(best, F[:, p])`` (NaN propagates, as :func:`torch.maximum`).
    * ``"coverage"``: the facility-location gains on a fixed-point grid of ``scale`` (see the
      ``facility_location`` scorer): ``gain`` ``[B, N]`` (int64; float gains ``gain / scale``), the best grid
      similarity ``best`` to the set (int64) and ``chosen`` (bool). After a pick ``p`` every unchosen ``j`` with
      ``G[p, j] > best[j]``, and ``p`` itself (whose term becomes ``out``, "+inf"), change ``gain`` by
      ``−Σ_j (clamp(G[j, i], best_old[j], best_new[j]) − best_old[j])``; ``G`` is ``grid`` (int64) when given, else
      ``round_half_even(F · scale)`` as it is read.
    """

    kind: str
    similarity: Tensor | None = None
    best: Tensor | None = None
    chosen: Tensor | None = None
    gain: Tensor | None = None
    grid: Tensor | None = None
    scale: float = 1.0
    out: int = 0

    KINDS: ClassVar[tuple[str, ...]] = ("constant", "nearest", "coverage")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"FusedTerm.kind must be one of {', '.join(map(repr, self.KINDS))}; got {self.kind!r}")


class ScorerRun(ABC):
    """The incremental state of one scorer during one selection."""

    @abstractmethod
    def gains(self) -> Tensor:
        """Gain of adding each token to the current set, ``[B, N]`` (values of chosen tokens are ignored)."""

    def update(self, picked: Tensor) -> None:
        """Add ``picked`` (``[B]`` indices) to the set. Set-independent scorers need not override this.

        A selector may call it with ``picked`` still on the device: an update that reads values back to the host
        (``.item()``, ``nonzero``, a boolean mask) stalls a GPU at every step."""

    def gains_into(self, out: Tensor) -> None:
        """Write :meth:`gains` into ``out`` (``[B, N]`` float64). A selector passes the same ``out`` at every step,
        so a run that keeps its gains there (or knows they did not change) can skip the copy: ask
        :func:`~prunekit.ops.same_buffer` whether ``out`` is the buffer it wrote (not its address, which a
        selection traced by ``torch.compile`` does not have)."""
        out.copy_(self.gains())

    def fused(self) -> FusedTerm | None:
        """This run's state as a :class:`FusedTerm`, called after :meth:`gains_into` wrote the current gains; None
        (the default) when it has no such form: the selector then calls :meth:`update` and :meth:`gains_into` at
        every step."""
        return None


class Scorer(ABC):
    """A per-token gain. Register with ``prunekit_register_scorers``; ``name`` is its registry name."""

    name: ClassVar[str]
    #: True when :meth:`start` reads ``inputs.relevance``.
    requires_relevance: ClassVar[bool] = False
    #: True when :meth:`start` reads ``inputs.query``.
    requires_query: ClassVar[bool] = False
    #: True when a run reads nothing back to the host, keeps its shapes, and depends only on the inputs' values and
    #: the scorer's attributes (``vars(scorer)``): then a selection over it may be replayed from a CUDA graph (the
    #: tests trace such a selection whole with ``torch.compile(fullgraph=True)``).
    capturable: ClassVar[bool] = False

    @abstractmethod
    def start(self, inputs: SelectionInput) -> ScorerRun:
        """Begin a selection on ``inputs`` with the empty set chosen."""


class Selector(ABC):
    """Turns a :class:`SelectionInput` and a budget into kept indices ``[B, k]``, ascending. The inputs' tensors are
    read, never written (a batch of one is a view of the stage's features)."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        ...
