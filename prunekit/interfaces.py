"""The interfaces every plugin implements.

Selection is split in two so that ablations are configuration, not code:

* a :class:`Scorer` turns features (and optionally a relevance vector) into a per-token gain. Gains that depend on
  the set already chosen (coverage, diversity) live in a :class:`ScorerRun`, which the selector updates after each
  pick, so incremental state never leaks into the selector;
* a :class:`Selector` turns features, relevance and a budget ``k`` into kept indices. The greedy selector combines
  any registered scorers (TOPS: weighted sum of normalised gains; SCOPE: product; DivPrune: one scorer), a DPP
  selector uses features and relevance directly.

Methods speak to models only through :class:`InsertionPoint` names and :class:`StageContext`; adapters speak to
methods only through :class:`Stage` objects. Neither imports the other.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from .ops import take_rows

if TYPE_CHECKING:  # pragma: no cover
    from .config import MethodConfig
    from .report import PruningReport


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

    def __repr__(self) -> str:
        return f"Reduction(indices={tuple(self.indices.shape)}, merged={int(self.merged.sum())})"


class ScorerRun(ABC):
    """The incremental state of one scorer during one selection."""

    @abstractmethod
    def gains(self) -> Tensor:
        """Gain of adding each token to the current set, ``[B, N]`` (values of chosen tokens are ignored)."""

    def update(self, picked: Tensor) -> None:
        """Add ``picked`` (``[B]`` indices) to the set. Set-independent scorers need not override this."""


class Scorer(ABC):
    """A per-token gain. Register with ``prunekit_register_scorers``; ``name`` is its registry name."""

    name: ClassVar[str]
    #: True when :meth:`start` reads ``inputs.relevance``.
    requires_relevance: ClassVar[bool] = False
    #: True when :meth:`start` reads ``inputs.query``.
    requires_query: ClassVar[bool] = False

    @abstractmethod
    def start(self, inputs: SelectionInput) -> ScorerRun:
        """Begin a selection on ``inputs`` with the empty set chosen."""


class Selector(ABC):
    """Turns a :class:`SelectionInput` and a budget into kept indices ``[B, k]``, ascending."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        ...


# ---------------------------------------------------------------------------------------------------------
# Model side
# ---------------------------------------------------------------------------------------------------------
class InsertionPoint(ABC):
    """A kind of place in a multimodal model where visual tokens can be pruned.

    An adapter declares which insertion points it implements; a method's stages name them. ``signals`` are the
    relevance signals an adapter may offer there (see :meth:`StageContext.relevance`).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    signals: ClassVar[frozenset[str]]
    #: True when a stage at this point must name a decoder layer.
    needs_layer: ClassVar[bool] = False
    #: the signals that read the prompt's text (the question), not only the image: a stage that asks for one is
    #: query-aware (a server that caches each image's encoder output cannot run it)
    query_signals: ClassVar[frozenset[str]] = frozenset()


@dataclass
class Stage:
    """One pruning step of a method's plan.

    ``layer`` (decoder insertion points): the first decoder layer that sees the pruned sequence; pruning uses
    the output and attention of layer ``layer - 1``. ``keep(n)`` maps a sample's original visual-token count to
    the number this stage keeps. ``choose(ctx)`` returns, per sample, the kept indices into the visual tokens
    present at this stage (any order), or a :class:`Choice` when the stage also changes token values.
    """

    point: str
    keep: Callable[[int], int]
    choose: Callable[["StageContext"], list["Tensor | Choice"]]
    layer: int | None = None
    label: str = ""
    signals: tuple[str, ...] = ()


class StageContext:
    """What a stage sees of one forward pass: per-sample visual features and lazily computed signals.

    ``grids`` (when the adapter knows them): per sample, the ``(rows, cols)`` patch grid of each of its images, in
    the order their tokens appear; ``None`` for a sample whose tokens do not form plain grids.
    """

    def __init__(
        self,
        stage: Stage,
        features: list[Tensor],
        keep: list[int],
        signal: Callable[[str, dict[str, Any]], list[Tensor]],
        grids: list[list[tuple[int, int]] | None] | None = None,
    ) -> None:
        self.stage = stage
        self.features = features
        self.keep = keep
        self._signal = signal
        self.grids = grids if grids is not None else [None] * len(features)
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return len(self.features)

    def relevance(self, signal: str, **options: Any) -> list[Tensor]:
        """A signal per sample (``relevance`` ``[n_b]``, ``keys`` ``[n_b, d]``, ...), computed on first use."""
        key = (signal, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = self._signal(signal, options)
        return self._cache[key]

    def select_grouped(
        self,
        relevance: list[Tensor] | None,
        selector: Callable[[SelectionInput, int], Tensor],
        query: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Run ``selector`` batched over samples that share token count and budget (usually all of them)."""
        groups: dict[tuple, list[int]] = {}
        for b, (f, k) in enumerate(zip(self.features, self.keep)):
            q = None if query is None else query[b].shape[0]
            groups.setdefault((f.shape[0], k, q), []).append(b)
        out: list[Tensor | None] = [None] * self.batch_size
        for (n, k, _), rows in groups.items():
            if n == 0 or k >= n:
                for b in rows:
                    out[b] = torch.arange(n, device=self.features[b].device)
                continue
            feats = torch.stack([self.features[b] for b in rows])
            rel = None if relevance is None else torch.stack([relevance[b] for b in rows])
            qry = None if query is None else torch.stack([query[b] for b in rows])
            kept = selector(SelectionInput(feats, rel, qry), k)
            for i, b in enumerate(rows):
                out[b] = kept[i]
        return out  # type: ignore[return-value]


@dataclass
class ModelSpec:
    """What a method may know about a model: sizes, never classes."""

    family: str
    num_layers: int
    hidden_size: int
    visual_tokens_per_image: int | None = None
    has_cls: bool = True
    name_or_path: str = ""
    #: signals this model's adapter cannot give, with the reason (e.g. a [CLS] feature the projector cannot take)
    unavailable: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Patch(ABC):
    """Handle of an installed patch: removable, switchable, and the keeper of the last report."""

    enabled: bool = True
    #: the validated method config this patch was built from
    config: Any = None

    @abstractmethod
    def remove(self) -> None:
        ...

    @property
    @abstractmethod
    def report(self) -> "PruningReport | None":
        ...


class ModelAdapter(ABC):
    """Knows one model family: where its insertion points are and how to read its signals."""

    name: ClassVar[str]
    #: class names of the supported ``transformers`` models (matched by name, so nothing is imported).
    model_classes: ClassVar[tuple[str, ...]]
    insertion_points: ClassVar[frozenset[str]]
    #: the budget units (``budget_per`` values) this adapter can tell apart in a prompt: ``"prompt"``, ``"image"``
    #: (images and video frames) and, for models that split images into crops (AnyRes), ``"crop"``
    budget_units: ClassVar[frozenset[str]] = frozenset({"prompt", "image"})

    @classmethod
    def supports(cls, model: Any) -> bool:
        return type(model).__name__ in cls.model_classes

    def __init__(self, model: Any) -> None:
        self.model = model

    @abstractmethod
    def describe(self) -> ModelSpec:
        ...

    @abstractmethod
    def patch(self, stages: Sequence[Stage], config: "MethodConfig", method: str) -> Patch:
        ...


class Method(ABC):
    """A pruning method: a config model and a plan of stages. Register with ``prunekit_register_methods``."""

    name: ClassVar[str]
    Config: ClassVar[type["MethodConfig"]]
    #: Config accepted by ``prunekit.select`` (selection-only fields), or None if selection needs a model.
    SelectionConfig: ClassVar[type | None] = None
    description: ClassVar[str] = ""
    #: what ``budget_per="auto"`` means for this method: the unit its official code budgets per (``"crop"``: each
    #: crop of an AnyRes image on its own), used on models whose adapter offers that unit, else ``"prompt"``
    official_budget_per: ClassVar[str] = "prompt"

    def __init__(self, config: "MethodConfig") -> None:
        self.config = config

    @abstractmethod
    def plan(self, spec: ModelSpec) -> list[Stage]:
        ...

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: Any) -> Tensor:
        raise NotImplementedError(f"method {cls.name!r} needs a model to select tokens; use prunekit.build")
