"""A method's stages run on one image's encoder output at a time, for servers that prune before the LLM.

A server such as vLLM encodes each image once, sizes the prompt for the tokens the encoder returns, and caches that
output by the image's hash, sharing it between every prompt that holds the image. So a pruning method can run there
only when every stage of its plan

* prunes before the language model (at ``vision_features`` or ``after_projector``: no insertion point that names a
  decoder layer), and
* reads nothing of the prompt's text (no signal its insertion point lists in ``query_signals``),

and the number it keeps is a function of the image alone. :class:`ImagePruner` checks this from the plan the method
makes for the model (never from a list of method names) and runs the stages with the method's own ``choose``
functions, so a token chosen here is the token ``prunekit.build`` chooses on the same features.

Nothing here imports a server; the server's model class (``prunekit.integrations.vllm``) gives the features, the
projector and the signals it can compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..api import make_config
from ..config import MethodConfig
from ..interfaces import ModelSpec, Stage, StageContext
from ..registry import registry
from ..runtime.stages import choose
from ..saved import read_block

#: the insertion points a server can run before its language model, in the order they come in a forward pass
POINTS = ("vision_features", "after_projector")


class UnservableMethodError(ValueError):
    """The method (as configured) cannot run in a server that caches encoder outputs per image."""


@dataclass
class Kept:
    """One image's result: ``indices`` (ascending) into its original visual tokens and the ``rows`` ``[k, D]`` the
    language model reads in their place (projected); ``merged`` marks rows that are a merge of several tokens."""

    indices: Tensor
    rows: Tensor
    merged: Tensor


class ImagePruner:
    """The stages of ``method`` with ``options`` (its config fields, as in a saved block, see :mod:`prunekit.saved`)
    for a model described by ``spec``, checked to be servable per image.

    ``server``: the server's name for error messages; ``signals``: the signals the server's model computes (a
    stage asking for another is refused, naming what is offered); ``positions``: how the server numbers the
    positions of kept tokens (``"renumber"``: contiguous); ``budget_units``: the ``budget_per`` values the model can
    tell apart (as a prunekit adapter's).
    """

    def __init__(self, method: str | MethodConfig, spec: ModelSpec, *, server: str, signals: frozenset[str] = frozenset(),
                 positions: str = "renumber", budget_units: frozenset[str] = frozenset({"prompt", "image"}),
                 options: Mapping[str, Any] | None = None) -> None:
        cls, config = make_config(method, **(options or {}))
        self.method, self.config, self.spec, self.server = cls.name, config, spec, server
        self.stages: list[Stage] = cls(config).plan(spec)
        for stage in self.stages:
            self._check(stage, signals)
        order = [POINTS.index(s.point) for s in self.stages]
        if order != sorted(order):
            raise UnservableMethodError(f"method {self.method!r} prunes at {[s.point for s in self.stages]}: "
                                        f"after_projector before vision_features cannot run in {server}")
        wanted = config.positions if config.positions != "auto" else ("original" if spec.extra.get("rope") == "mrope"
                                                                      else "renumber")
        if wanted != positions:
            raise UnservableMethodError(
                f"positions={config.positions!r} means {wanted!r} positions on {spec.family}, and {server} gives the "
                f"kept image tokens {positions!r} positions; save the method with positions={positions!r}")
        unit = config.budget_per
        if unit == "auto":
            unit = cls.official_budget_per if cls.official_budget_per in budget_units else "prompt"
        if unit not in budget_units or unit not in ("prompt", "image"):
            raise UnservableMethodError(f"budget_per={unit!r} cannot be served on {spec.family}: {server} budgets "
                                        f"each image on its own (budget_per='image', or 'prompt' for one image per "
                                        f"prompt)")
        #: the budget unit ("prompt": every prompt must hold one image, "image": any number)
        self.budget_per = unit

    @classmethod
    def from_config(cls, config: Any, spec: ModelSpec, **kwargs: Any) -> "ImagePruner | None":
        """The pruner the ``prunekit`` block of a model config (or config.json dict) asks for; None without one."""
        block = read_block(config)
        if block is None:
            return None
        return cls(block["method"], spec, options=block.get("options", {}), **kwargs)

    def _check(self, stage: Stage, offered: frozenset[str]) -> None:
        where = f"method {self.method!r} ({stage.label or stage.point})"
        point = registry.get("insertion_points", stage.point)
        if point.needs_layer or stage.layer is not None:
            raise UnservableMethodError(
                f"{where} prunes inside the language model (from decoder layer {stage.layer}); {self.server} runs "
                f"the language model with paged attention, where prunekit cannot drop tokens between layers: only "
                f"methods that prune entirely before the LLM can be served")
        if stage.point not in POINTS:
            raise UnservableMethodError(f"{where} prunes at {stage.point!r}; {self.server} can prune only at "
                                        f"{', '.join(POINTS)}")
        reads_text = sorted(set(stage.signals) & point.query_signals)
        if reads_text:
            raise UnservableMethodError(
                f"{where} reads the question ({', '.join(reads_text)}): {self.server} caches each image's encoder "
                f"output by the image and shares it between every prompt that holds the image, so only "
                f"query-agnostic selections can be served")
        missing = sorted(set(stage.signals) - offered)
        if missing:
            raise UnservableMethodError(
                f"{where} needs the signal(s) {', '.join(missing)}, which prunekit's {self.server} {self.spec.family} "
                f"model does not compute (it offers: {', '.join(sorted(offered)) or 'none'})")

    def kept_count(self, n: int) -> int:
        """How many tokens an image of ``n`` visual tokens keeps (its prompt gets that many placeholders)."""
        k = n
        for stage in self.stages:
            k = min(k, stage.keep(n))
        return k

    def prune(self, features: Tensor, *, project: Callable[[Tensor], Tensor] | None = None,
              grid: tuple[int, int] | None = None,
              signal: Callable[[str, Mapping[str, Any]], Tensor] | None = None) -> Kept:
        """Run the stages on one image.

        ``features`` ``[n, D]``: the image's features at the first stage's point (the vision features when the plan
        starts at ``vision_features``, else the projected ones); ``project`` maps vision features to the language
        model's space (needed when the plan starts at ``vision_features``); ``grid``: the image's (rows, cols) of
        patches; ``signal(name, options)``: a ``[n, ...]`` per-token signal of the image's original tokens.
        """
        n = features.shape[0]
        current = torch.arange(n, device=features.device)
        merged = torch.zeros(n, dtype=torch.bool, device=features.device)
        space = self.stages[0].point if self.stages else "after_projector"
        if space == "vision_features" and project is None:
            raise ValueError(f"method {self.method!r} starts at vision_features: pass project=")
        for i, stage in enumerate(self.stages):
            if stage.point == "after_projector" and space == "vision_features":
                features, space = project(features), "after_projector"
            keep = min(features.shape[0], stage.keep(n))

            def stage_signal(name: str, options: dict, rows: Tensor = current) -> list[Tensor]:
                if signal is None:
                    raise ValueError(f"stage {stage.label!r} asks for {name!r}, and no signal was given")
                return [signal(name, options)[rows]]

            grids = [[grid]] if grid is not None and i == 0 else [None]
            # the runtime's own check of what a stage returns (count, range, repeats), kept in place order
            (idx,), (values,), (flags,), (moved,) = choose(stage, StageContext(stage, [features], [keep],
                                                                                stage_signal, grids=grids))
            if moved:
                raise UnservableMethodError(f"method {self.method!r} reorders tokens, which {self.server} cannot")
            values = features[idx] if values is None else values.to(features)
            features, current, merged = values, current[idx], merged[idx] | flags
        if space == "vision_features":
            features = project(features)
        return Kept(current, features, merged)


__all__ = ["POINTS", "ImagePruner", "Kept", "UnservableMethodError"]
