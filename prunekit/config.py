"""Configuration base: pydantic models that reject unknown fields and out-of-range values."""

from __future__ import annotations

import math
import numbers
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from .interfaces import Method

#: Used when no budget is given: 64 of LLaVA-1.5's 576 tokens, the paper's central setting.
DEFAULT_KEEP_RATIO = 64 / 576


def registered_name(kind: str, value: str) -> str:
    """Validate that ``value`` names a registered plugin of ``kind`` (e.g. "scorers"); the error lists the choices."""
    from .registry import registry

    allowed = registry.names(kind)
    if value not in allowed:
        raise ValueError(f"unknown {kind[:-1]} {value!r}; registered {kind}: {', '.join(allowed)}")
    return value


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))
_KINDS = {int: "an int", float: "a finite number", bool: "a bool", str: "a string"}


def _describe_type(annotation: Any, metadata: tuple = ()) -> str:
    """The values a field of type ``annotation`` (with pydantic/annotated-types ``metadata``) accepts, in words."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _describe_type(args[0], (*args[1:], *metadata))
    if origin in (Union, types.UnionType):
        return ", or ".join(_describe_type(a, () if a is type(None) else metadata) for a in args)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "(" + ", ".join(_describe_type(a) for a in args) + ")"
    if origin in (list, tuple, set, frozenset):
        return f"a list of ({_describe_type(args[0]) if args else 'anything'})"
    bounds = [f"{sign} {getattr(m, attr)}" for m in metadata for kind, attr, sign in _BOUNDS if isinstance(m, kind)]
    text = _KINDS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return text + (" " + " and ".join(bounds) if bounds else "")


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or any(_accepts_bool(a) for a in get_args(annotation))


def _leaves(value: Any):
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


class StrictModel(BaseModel):
    """Base of every config: unknown fields are errors; no field takes a bool unless it is declared bool (no
    ``keep_tokens=True`` meaning 1) and no number may be NaN or infinite. Errors name the field and what it takes.

    A validated config is frozen: assigning a field is an error, so what a user gave is what ``build``, ``select``
    and the report see. A variant is a new config (``cfg.model_copy(update=...)``, or the class called again with
    the changed fields, which validates them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_or_non_finite(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        for leaf in _leaves(value):
            if isinstance(leaf, bool) and not _accepts_bool(field.annotation):
                problem = "a bool"
            elif isinstance(leaf, numbers.Real) and not isinstance(leaf, numbers.Integral) and not math.isfinite(leaf):
                problem = "not finite"
            else:
                continue
            allowed = _describe_type(field.annotation, tuple(field.metadata))
            detail = problem if leaf is value else f"{leaf!r} is {problem}"
            raise ValueError(f"{info.field_name} takes {allowed}; got {value!r} ({detail})")
        return value


class BudgetConfig(StrictModel):
    """How many visual tokens a method keeps. Set at most one of the three fields."""

    keep_tokens: PositiveInt | None = Field(
        None, description="Visual tokens kept: the method's nominal budget T, counted as its paper counts it, or "
        "the layer-averaged count (see budget_meaning)."
    )
    keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="keep_tokens as a fraction of each sample's visual tokens; 1.0 prunes nothing."
    )
    schedule: list[PositiveInt] | None = Field(
        None, min_length=1, description="Explicit visual-token count kept at each stage, in stage order."
    )
    positions: Literal["auto", "renumber", "original"] = Field(
        "auto",
        description="'renumber': kept tokens get contiguous position ids (the papers' choice); "
        "'original': kept tokens keep the position ids they had before pruning; 'auto': renumber on 1-D rotary "
        "positions, original on M-RoPE (Qwen-VL), where renumbering is not defined.",
    )

    budget_meaning: Literal["nominal", "layer_average"] = Field(
        "nominal",
        description="'nominal': keep_tokens (or keep_ratio × tokens) is T as the method's own paper and code count "
        "it (FastV and DART: the count kept from layer K on, DART's pivots added as its code does; a method that "
        "prunes once before the LLM: the count kept), so its published tables can be reproduced; each method page "
        "says what its T is. 'layer_average': T is the layer-averaged visual-token count (the method's stage "
        "proportions scaled to it), to compare methods at equal compute.",
    )

    budget_per: Literal["auto", "prompt", "image", "crop"] = Field(
        "auto",
        description="'prompt': the budget covers all visual tokens of a prompt; 'image': it applies to each image "
        "or video frame separately (LLaVA-Video's per-frame budgets; keep_tokens is then per frame); 'crop': to "
        "each crop of an AnyRes image (LLaVA-NeXT, LLaVA-OneVision: the base view and every tile; keep_tokens is "
        "then per crop, and the row-break tokens, which belong to no crop, are kept outside every budget); "
        "'auto': the unit the method's official code budgets per where the model has it, else 'prompt' (each "
        "method page says which).",
    )

    @model_validator(mode="after")
    def _one_budget(self):
        given = [n for n in ("keep_tokens", "keep_ratio", "schedule") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of keep_tokens, keep_ratio, schedule (got {', '.join(given)})")
        return self

    @field_validator("schedule")
    @classmethod
    def _non_increasing(cls, v):
        if v is not None and any(b > a for a, b in zip(v, v[1:])):
            raise ValueError(f"schedule must be non-increasing (a later stage cannot keep more), got {v}")
        return v

    def target(self, n_visual: int) -> float:
        """The budget ``T`` for a sample with ``n_visual`` visual tokens (nominal or layer-averaged, as
        ``budget_meaning`` says)."""
        if self.keep_tokens is not None:
            return float(self.keep_tokens)
        ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
        return ratio * n_visual


class MethodConfig(BudgetConfig):
    """Base of every method's config."""


def get_method(name: str):
    """The registered method class called ``name``."""
    from .registry import registry

    return registry.get("methods", name)


def make_config(method: str | MethodConfig, **overrides: Any) -> tuple[type[Method], MethodConfig]:
    """Resolve a method name or config object (plus overrides) into the method class and a validated config."""
    from .registry import registry

    if isinstance(method, str):
        cls = get_method(method)
        return cls, cls.Config(**overrides)
    if isinstance(method, MethodConfig):
        for cls in registry.classes("methods"):
            if type(method) is cls.Config:
                data = method.model_dump(exclude_unset=True)
                data.update(overrides)
                return cls, cls.Config(**data)
        raise TypeError(f"{type(method).__name__} is not the config of any registered method")
    raise TypeError(f"method must be a registered name ({', '.join(registry.names('methods'))}) or a method config, "
                    f"got {method!r}")
