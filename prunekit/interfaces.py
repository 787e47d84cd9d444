"""The interfaces every plugin implements: methods (:class:`Method`, planning :class:`Stage` objects that run in a
:class:`StageContext`), model adapters (:class:`ModelAdapter`, describing a model as a :class:`ModelSpec` and
installing a :class:`Patch`) and the :class:`InsertionPoint` descriptions. The selection interfaces (scorers,
selectors, what a selection reads and returns) are in :mod:`prunekit.selection` and re-exported here.

Methods speak to models only through :class:`InsertionPoint` names and :class:`StageContext`; adapters speak to
methods only through :class:`Stage` objects. Neither imports the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from .ops import batch_of
from .selection import Choice, FusedTerm, Reduction, Scorer, ScorerRun, SelectionInput, Selector

if TYPE_CHECKING:  # pragma: no cover
    from .config import MethodConfig
    from .report import PruningReport


# ---------------------------------------------------------------------------------------------------------
# Model side
# ---------------------------------------------------------------------------------------------------------
class InsertionPoint(ABC):
    """A kind of place in a multimodal model where visual tokens can be pruned: its name, what a stage there sees
    and the signals computed there.

    The three points are defined by the library (:mod:`prunekit.insertion_points`), not registered by plugins: each
    describes what the runtime implements. An adapter declares which of them it offers; a method's stages name
    them. ``signals`` are the relevance signals an adapter may offer there (see :meth:`StageContext.relevance`).
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
            feats = batch_of(self.features[b] for b in rows)
            rel = None if relevance is None else batch_of(relevance[b] for b in rows)
            qry = None if query is None else batch_of(query[b] for b in rows)
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
    """A pruning method: a config model, a selection rule and a plan of stages. Register with
    ``prunekit_register_methods``.

    A method states its rule once, as one of two class methods, and both ways of using it derive from that:

    * :meth:`rule` selects for one sample: ``features`` ``[n, D]``, ``relevance`` ``[n]`` (or None), budget ``k``,
      the config, and as keywords the model signals a stage gives it (absent in a model-free call, where the rule
      falls back on what it has: the features as keys, no [CLS] feature); it returns kept indices or a
      :class:`Choice`;
    * :meth:`batch_rule` selects for a batch of samples of equal size at once (a :class:`SelectionInput`),
      returning ``[B, k]`` indices: the greedy and DPP methods, whose selectors work on batches.

    :meth:`chooser` turns the rule into a stage's ``choose`` (what the stage feeds it: its relevance signal,
    other signals) for :meth:`plan`; :meth:`select` runs it model-free for ``prunekit.select`` / ``reduce``.
    """

    name: ClassVar[str]
    Config: ClassVar[type["MethodConfig"]]
    #: Config accepted by ``prunekit.select`` (selection-only fields), or None if selection needs a model.
    SelectionConfig: ClassVar[type | None] = None
    description: ClassVar[str] = ""
    #: what ``budget_per="auto"`` means for this method: the unit its official code budgets per (``"crop"``: each
    #: crop of an AnyRes image on its own), used on models whose adapter offers that unit, else ``"prompt"``
    official_budget_per: ClassVar[str] = "prompt"
    #: what the model-free ``relevance`` stands for when the rule cannot do without it (e.g. ``"the [CLS]
    #: attention"``): :meth:`select` then refuses a call without it, naming it; None: the rule reads none, or
    #: does without (a method whose need depends on its config overrides :meth:`check_selection`)
    relevance_input: ClassVar[str | None] = None

    def __init__(self, config: "MethodConfig") -> None:
        self.config = config

    @abstractmethod
    def plan(self, spec: ModelSpec) -> list[Stage]:
        ...

    def budget_per(self, spec: ModelSpec) -> str:
        """The budget unit this method asks for on the model ``spec`` describes: ``config.budget_per`` (``"auto"``
        is resolved by ``build`` against the adapter's units). A method whose own settings choose a unit (a TOPS
        preset's) overrides this: configs are frozen, so the choice is returned, never written into the config."""
        return self.config.budget_per

    # -- the rule -------------------------------------------------------------------------------------------
    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor | None, k: int, config: Any, **signals: Any) -> "Tensor | Choice":
        """The selection rule for one sample (see the class doc); state this or :meth:`batch_rule`."""
        raise NotImplementedError(f"method {cls.name!r} states no rule for one sample")

    @classmethod
    def batch_rule(cls, inputs: SelectionInput, k: int, config: Any) -> Tensor:
        """The selection rule for a batch of samples of equal size: kept indices ``[B, k]``, ascending."""
        raise NotImplementedError(f"method {cls.name!r} states no batch rule")

    @classmethod
    def _states(cls, rule: str) -> bool:
        """Whether this class (not :class:`Method` itself) defines ``rule``."""
        return next(c for c in cls.__mro__ if rule in vars(c)) is not Method

    def chooser(
        self,
        relevance: Callable[["StageContext"], list[Tensor]] | None = None,
        *,
        features: Callable[["StageContext"], list[Tensor]] | None = None,
        query: Callable[["StageContext"], list[Tensor]] | None = None,
        config: Any = None,
        **signals: Callable[["StageContext"], list[Any]],
    ) -> Callable[["StageContext"], list["Tensor | Choice"]]:
        """A stage's ``choose`` that applies the rule to what the stage sees.

        Each argument reads the stage's context and gives one value per sample: ``relevance`` the relevance,
        ``features`` what the rule reads as features (default: the stage's visual features), ``query`` the query
        (batch rules), and every other keyword a signal the rule takes by that name. ``config``: the config the
        rule runs with (default: the method's; a stage may run the rule with other settings, such as TOPS's
        stage-II weights). A sample whose budget keeps every token keeps them as they are, without the rule.
        """
        cls, config = type(self), self.config if config is None else config
        if cls._states("batch_rule"):

            def choose_batched(ctx: "StageContext") -> list[Tensor]:
                rel = None if relevance is None else relevance(ctx)
                qry = None if query is None else query(ctx)
                return ctx.select_grouped(rel, lambda inputs, k: cls.batch_rule(inputs, k, config), query=qry)

            return choose_batched

        def choose(ctx: "StageContext") -> list["Tensor | Choice"]:
            feats = ctx.features if features is None else features(ctx)
            rel = [None] * ctx.batch_size if relevance is None else relevance(ctx)
            given = {name: read(ctx) for name, read in signals.items()}
            out: list[Tensor | Choice] = []
            for b, (own, k) in enumerate(zip(ctx.features, ctx.keep)):
                if k >= own.shape[0]:
                    out.append(torch.arange(own.shape[0], device=own.device))
                else:
                    out.append(cls.rule(feats[b], rel[b], k, config, **{name: v[b] for name, v in given.items()}))
            return out

        return choose

    # -- model-free ------------------------------------------------------------------------------------------
    @classmethod
    def check_selection(cls, relevance: Tensor | None, query: Tensor | None, config: Any) -> None:
        """Refuse a model-free selection without an input the rule needs (:attr:`relevance_input`)."""
        if cls.relevance_input is not None and relevance is None:
            raise ValueError(f"{cls.name} needs {cls.relevance_input}: pass relevance=[B, N]")

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: Any) -> "Tensor | Reduction":
        """Model-free selection by the rule: kept indices ``[B, k]``, or a :class:`Reduction` where the rule
        merges. A method that reads a query overrides this with a ``query`` keyword (and passes it on to
        :meth:`apply_rule`): ``prunekit.select`` accepts a query only for such a method."""
        cls.check_selection(relevance, None, config)
        return cls.apply_rule(features, relevance, k, config)

    @classmethod
    def apply_rule(
        cls, features: Tensor, relevance: Tensor | None, k: int, config: Any, query: Tensor | None = None,
        **signals: list[Any],
    ) -> "Tensor | Reduction":
        """The rule over a batch ``features`` ``[B, N, D]``: at once (:meth:`batch_rule`) or sample by sample
        (:meth:`rule`, with ``signals`` given per sample), the results stacked."""
        if cls._states("batch_rule"):
            return cls.batch_rule(SelectionInput(features, relevance, query), k, config)
        if not cls._states("rule"):
            raise NotImplementedError(f"method {cls.name!r} needs a model to select tokens; use prunekit.build")
        out = [cls.rule(f, None if relevance is None else relevance[b], k, config,
                        **{name: v[b] for name, v in signals.items()}) for b, f in enumerate(features)]
        if all(isinstance(o, Tensor) for o in out):
            return torch.stack(out)
        return Reduction.from_choices([o if isinstance(o, Choice) else Choice(o) for o in out], features)


#: the attribute of a patched model that holds its :class:`Patch` (a plain attribute: not a submodule, not in the
#: state dict)
PATCH_ATTRIBUTE = "_prunekit_patch"


def patch_of(model: Any) -> Patch | None:
    """The :class:`Patch` that ``prunekit.build`` installed on ``model``, or None."""
    return getattr(model, "__dict__", {}).get(PATCH_ATTRIBUTE)


__all__ = [
    "InsertionPoint", "Stage", "StageContext", "ModelSpec", "Patch", "ModelAdapter", "Method", "PATCH_ATTRIBUTE",
    "patch_of",
    # from prunekit.selection
    "SelectionInput", "Choice", "Reduction", "FusedTerm", "ScorerRun", "Scorer", "Selector",
]
