"""The public functions: build, remove, disabled, pruning_report, select, list_*."""

from __future__ import annotations

import contextlib
import inspect as _inspect
from typing import Any, Iterator

from torch import Tensor

from . import contracts
from .config import MethodConfig, get_method, make_config
from .errors import UnsupportedModelError
from .interfaces import PATCH_ATTRIBUTE as _ATTR, Method, ModelAdapter, Reduction, patch_of as _patch
from .registry import registry
from .report import PruningReport


def list_methods(pattern: str | None = None) -> list[str]:
    """The registered methods' names, sorted; ``pattern`` (shell-style, e.g. ``"d*"``) keeps the names it matches."""
    return registry.names("methods", pattern)


def list_scorers(pattern: str | None = None) -> list[str]:
    """The registered scorers' names, sorted; ``pattern`` (shell-style, e.g. ``"d*"``) keeps the names it matches."""
    return registry.names("scorers", pattern)


def list_selectors(pattern: str | None = None) -> list[str]:
    """The registered selectors' names, sorted; ``pattern`` (shell-style, e.g. ``"d*"``) keeps the names it matches."""
    return registry.names("selectors", pattern)


def list_adapters(pattern: str | None = None) -> list[str]:
    """The registered model adapters' names, sorted; ``pattern`` (shell-style, e.g. ``"d*"``) keeps the names it matches."""
    return registry.names("adapters", pattern)


def list_insertion_points(pattern: str | None = None) -> list[str]:
    """The registered insertion points' names, sorted; ``pattern`` (shell-style, e.g. ``"d*"``) keeps the names it matches."""
    return registry.names("insertion_points", pattern)


def adapter_for(model: Any) -> ModelAdapter:
    """The registered adapter that handles ``model``'s class, built on ``model`` (nothing is patched).

    Raises :class:`~prunekit.UnsupportedModelError`, listing the supported classes, when no adapter does."""
    classes = registry.classes("adapters")
    for cls in classes:
        if cls.supports(model):
            return cls(model)
    supported = sorted({name for cls in classes for name in cls.model_classes})
    raise UnsupportedModelError(
        f"no prunekit adapter supports {type(model).__name__}; supported classes: {', '.join(supported)}"
    )


#: why a model may lack a budget unit, for the error that refuses it
_NO_UNIT = {
    "crop": "its images are not split into crops",
    "image": "its adapter cannot tell its images or video frames apart",
}


def budget_unit(cls: type[Method], unit: str, adapter: ModelAdapter) -> str:
    """The budget unit a patch runs with: ``unit`` (what the method asks for, :meth:`~prunekit.plugin.Method.budget_per`),
    where ``"auto"`` is the method's official unit (:attr:`~prunekit.plugin.Method.official_budget_per`) when the
    adapter offers it, else ``"prompt"``. A unit the adapter cannot tell apart is an error naming the option and the
    model, never silently replaced."""
    if unit == "auto":
        return cls.official_budget_per if cls.official_budget_per in adapter.budget_units else "prompt"
    if unit not in adapter.budget_units:
        raise ValueError(
            f"budget_per={unit!r} cannot apply to {type(adapter.model).__name__}: "
            f"{_NO_UNIT.get(unit, f'its adapter {adapter.name!r} offers no such unit')} (units it offers: "
            f"{', '.join(sorted(adapter.budget_units))})"
        )
    return unit


def build(method: str | MethodConfig | Any, model: Any = None, **overrides: Any) -> Any:
    """Patch ``model`` in place so that its forward passes (and ``generate``) prune visual tokens; return it.

    ``method`` is a registered method name or a method config; ``overrides`` are config fields. ``build(model)``
    applies the configuration saved with the model (the ``prunekit`` block of its config, :mod:`prunekit.saved`).
    Building on a patched model replaces the old patch. Raises :class:`~prunekit.contracts.UnsupportedTransformersError` outside
    the supported transformers releases, and :class:`~prunekit.contracts.ContractError` when the model breaks a
    contract prunekit relies on.
    """
    if model is None:
        from .saved import KEY, saved_config

        model, method = method, saved_config(method)
        if method is None:
            raise ValueError(f"build(model) applies the pruning configuration saved with the model, and this model's "
                             f"config has no '{KEY}' block: pass a method (build('tops', model, keep_tokens=64)) or "
                             f"save one with prunekit.save_config")
    contracts.check_version()
    cls, config = make_config(method, **overrides)
    adapter = adapter_for(model)
    spec = adapter.describe()
    planner = cls(config)
    stages = planner.plan(spec)
    for stage in stages:
        point = registry.get("insertion_points", stage.point)
        if stage.point not in adapter.insertion_points:
            raise ValueError(
                f"method {cls.name!r} prunes at {stage.point!r}, which adapter {adapter.name!r} does not offer "
                f"(offered: {', '.join(sorted(adapter.insertion_points))})"
            )
        if point.needs_layer and (stage.layer is None or not 1 <= stage.layer < spec.num_layers):
            raise ValueError(f"{stage.label or stage.point}: layer must be in 1..{spec.num_layers - 1}, got {stage.layer}")
        unknown = set(stage.signals) - set(point.signals)
        if unknown:
            raise ValueError(f"{stage.label or stage.point} asks for {sorted(unknown)}; {point.name} offers {sorted(point.signals)}")
    unit = budget_unit(cls, planner.budget_per(spec), adapter)
    remove(model)
    # the adapter reads the resolved unit from the config it is given: a copy, the user's config stays as given
    patch = adapter.patch(stages, config.model_copy(update={"budget_per": unit}), cls.name)
    patch.config = config
    model.__dict__[_ATTR] = patch  # a plain attribute: not a submodule, not in the state dict
    return model


def is_patched(model: Any) -> bool:
    """Whether ``model`` carries a prunekit patch (from :func:`build`, until :func:`remove`)."""
    return _patch(model) is not None


def remove(model: Any) -> Any:
    """Remove prunekit's patch (if any); the model then computes exactly what it did before ``build``."""
    patch = _patch(model)
    if patch is not None:
        patch.remove()
        del model.__dict__[_ATTR]
    return model


@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
    """Temporarily run the patched model without pruning."""
    patch = _patch(model)
    if patch is None:
        raise ValueError("model is not patched by prunekit (call prunekit.build first)")
    previous, patch.enabled = patch.enabled, False
    try:
        yield model
    finally:
        patch.enabled = previous


def pruning_report(model: Any) -> PruningReport | None:
    """The pruning report of the model's last prefill (None before the first forward)."""
    patch = _patch(model)
    if patch is None:
        raise ValueError("model is not patched by prunekit (call prunekit.build first)")
    return patch.report


def _run_select(method: str, features: Tensor, relevance: Tensor | None, k: int, query: Tensor | None, config: dict):
    """Validate the arguments of :func:`select` / :func:`reduce` (each error names the argument and what it takes),
    then run the method's model-free selection."""
    import torch

    cls = get_method(method)
    if cls.SelectionConfig is None:
        raise ValueError(f"method {method!r} needs a model to select tokens; use prunekit.build")
    cfg = cls.SelectionConfig(**config)

    floating: dict[str, Tensor] = {}  # checked for NaN and ±inf together: one read of the device

    def check(name: str, value: Any, shape: str, dims: int) -> None:
        if not isinstance(value, Tensor) or value.dim() != dims:
            raise ValueError(f"{name} must be a tensor of shape {shape}, got {getattr(value, 'shape', value)!r}")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must hold real numbers (a floating or integer tensor), got {value.dtype}")
        if value.is_floating_point() and value.numel():
            floating[name] = value

    def check_finite() -> None:
        # NaN and ±inf show in a min or a max (two reductions, no copy): counted only then, for the message
        if not floating:
            return
        ends = [end.float().to(features.device) for value in floating.values() for end in torch.aminmax(value)]
        if bool(torch.isfinite(torch.stack(ends)).all()):
            return
        for name, value in floating.items():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"{name} must be finite (no NaN or ±inf); got {bad} non-finite value(s) of "
                                 f"{value.numel()}")

    check("features", features, "[B, N, D]", 3)
    B, N, D = features.shape
    if not (B and N and D):
        raise ValueError(f"features must have at least one sample, token and channel (B, N, D >= 1); "
                         f"got shape {tuple(features.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in 1..{N} (the tokens present), got {k!r}")
    if relevance is not None:
        check("relevance", relevance, f"[B, N] = {[B, N]}", 2)
        if relevance.shape != features.shape[:2]:
            raise ValueError(f"relevance must have shape [B, N] = {[B, N]}, got {list(relevance.shape)}")
    if query is not None:
        if "query" not in _inspect.signature(cls.select).parameters:
            raise ValueError(f"method {method!r} does not read a query")
        check("query", query, f"[B, Q, D] = [{B}, Q, {D}]", 3)
        if query.shape[0] != B or query.shape[2] != D:
            raise ValueError(f"query must have shape [B, Q, D] = [{B}, Q, {D}], got {list(query.shape)}")
        check_finite()
        return cls.select(features, relevance, k, cfg, query=query)
    check_finite()
    return cls.select(features, relevance, k, cfg)


def select(
    method: str, features: Tensor, relevance: Tensor | None = None, *, k: int, query: Tensor | None = None,
    **config: Any,
) -> Tensor:
    """Model-free selection: kept indices ``[B, k]`` (ascending, LongTensor) of ``features`` ``[B, N, D]``.

    ``relevance`` ``[B, N]`` and ``query`` ``[B, Q, D]`` feed methods that read them. For merging methods the
    indices are the positions of the kept and merged tokens; :func:`reduce` also returns their values.
    """
    out = _run_select(method, features, relevance, k, query, config)
    return (out if isinstance(out, Tensor) else out.indices).long()


def reduce(
    method: str, features: Tensor, relevance: Tensor | None = None, *, k: int, query: Tensor | None = None,
    **config: Any,
):
    """Model-free reduction: a ``Reduction`` with ``indices`` ``[B, k]``, ``values`` ``[B, k, D]`` (merged values
    where the method merges, else the kept features) and ``merged`` ``[B, k]`` flags."""
    out = _run_select(method, features, relevance, k, query, config)
    if isinstance(out, Reduction):
        return out
    idx = out.long()
    values = features.gather(1, idx[..., None].expand(-1, -1, features.shape[-1]))
    return Reduction(idx, values, idx.new_zeros(idx.shape, dtype=bool))
