"""Shared planning helpers for methods: turning a budget and a list of stages into :class:`Stage` objects.

Every method states where it prunes (insertion point, decoder layer) and the relative size of each stage's
count (its *shape*); :func:`make_stages` scales the shape so that the layer-averaged count is the budget's
target (see :mod:`prunekit.budget`), or uses the explicit ``schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .budget import BudgetError, StagePlacement, resolve_counts
from .config import BudgetConfig
from .interfaces import ModelSpec, Stage, StageContext

#: Decoder depth of LLaVA-1.5-7B, the model the baselines' default layers were chosen on.
REFERENCE_DEPTH = 32


@dataclass
class StagePlan:
    """One stage of a method before budgets are resolved."""

    point: str
    choose: Callable[[StageContext], list]
    layer: int | None = None
    shape: float = 1.0
    label: str = ""
    signals: tuple[str, ...] = ()


def scale_layers(layers: Sequence[int], num_layers: int, reference: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Decoder layers chosen on a ``reference``-layer model, moved to the same relative depth of ``num_layers``.

    Rounded, then pushed apart so they stay strictly increasing inside ``1 .. num_layers - 1``.
    """
    if num_layers == reference:
        return tuple(layers)
    out: list[int] = []
    for layer in layers:
        scaled = max(1, int(layer * num_layers / reference + 0.5))
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        out.append(scaled)
    if out and out[-1] > num_layers - 1:
        raise ValueError(
            f"layers {list(layers)} (chosen on {reference} layers) do not fit a {num_layers}-layer decoder; set them"
        )
    return tuple(out)


def check_layers(layers: Sequence[int], num_layers: int, field: str = "layers") -> tuple[int, ...]:
    """Validate user- or preset-given decoder layers: strictly increasing, inside ``1 .. num_layers - 1``."""
    layers = tuple(int(x) for x in layers)
    if any(b <= a for a, b in zip(layers, layers[1:])) or not all(1 <= x <= num_layers - 1 for x in layers):
        raise ValueError(
            f"{field}={list(layers)} does not fit a {num_layers}-layer decoder: need strictly increasing layers in "
            f"1..{num_layers - 1}"
        )
    return layers


def make_stages(
    cfg: BudgetConfig,
    spec: ModelSpec,
    plans: Sequence[StagePlan],
    minimum: Callable[[int], int] | None = None,
    method: str = "",
    nominal: Callable[[int, float], Sequence[int]] | None = None,
) -> list[Stage]:
    """Stages whose counts follow ``cfg.schedule``, the method's nominal accounting or the layer-averaged target.

    ``nominal(n, T)``: the per-stage counts the method's own paper and code keep for a budget ``T`` of ``n``
    visual tokens (used when ``cfg.budget_meaning == "nominal"``); without it the nominal ``T`` is the
    layer-averaged count (true for a method with one stage before the LLM). ``minimum(n)``: the least count the
    method can keep at a stage (e.g. VisionZip needs one dominant and one contextual token); a budget that would go
    below it is an error, never a silent change.
    """
    if cfg.schedule is not None and len(cfg.schedule) != len(plans):
        raise ValueError(
            f"schedule has {len(cfg.schedule)} counts but {method or 'this method'} prunes at {len(plans)} stages here"
        )
    placements = [StagePlacement(0 if p.layer is None else p.layer, p.shape) for p in plans]
    cache: dict[int, list[int]] = {}

    def counts(n: int) -> list[int]:
        if n not in cache:
            if cfg.schedule is not None:
                out = [min(n, k) for k in cfg.schedule]
            elif nominal is not None and cfg.budget_meaning == "nominal":
                target = cfg.target(n)
                if target > n:
                    raise BudgetError(f"keep_tokens={target:g} is more than the {n} visual tokens present")
                out, cap = [], n
                for k in nominal(n, target):
                    cap = max(1, min(cap, int(k)))
                    out.append(cap)
                if len(out) != len(plans):
                    raise ValueError(f"{method}: nominal counts {out} do not match its {len(plans)} stages")
            else:
                out = resolve_counts(n, cfg.target(n), placements, spec.num_layers)
            if minimum is not None:
                least = minimum(n)
                for plan, k in zip(plans, out):
                    if k < min(least, n):
                        raise BudgetError(
                            f"{method or 'the method'} keeps {k} of {n} visual tokens at {plan.label or plan.point}, "
                            f"below its minimum of {least}; ask for more tokens"
                        )
            cache[n] = out
        return cache[n]

    return [
        Stage(point=p.point, layer=p.layer, label=p.label or p.point, keep=lambda n, i=i: counts(n)[i],
              choose=p.choose, signals=p.signals)
        for i, p in enumerate(plans)
    ]
