"""Configuration base: pydantic models that reject unknown fields and out-of-range values."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

#: Used when no budget is given: 64 of LLaVA-1.5's 576 tokens, the paper's central setting.
DEFAULT_KEEP_RATIO = 64 / 576


def registered_name(kind: str, value: str) -> str:
    """Validate that ``value`` names a registered plugin of ``kind`` (e.g. "scorers"); the error lists the choices."""
    from .registry import registry

    allowed = registry.names(kind)
    if value not in allowed:
        raise ValueError(f"unknown {kind[:-1]} {value!r}; registered {kind}: {', '.join(allowed)}")
    return value


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BudgetConfig(StrictModel):
    """How many visual tokens a method keeps. Set at most one of the three fields."""

    keep_tokens: PositiveInt | None = Field(
        None, description="Layer-averaged number of visual tokens kept (the count papers quote)."
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

    budget_per: Literal["prompt", "image"] = Field(
        "prompt",
        description="'prompt': the budget covers all visual tokens of a prompt; 'image': it applies to each image "
        "or video frame separately (LLaVA-Video's per-frame budgets; keep_tokens is then per frame).",
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
        """The layer-averaged count this budget asks for, for a sample with ``n_visual`` visual tokens."""
        if self.keep_tokens is not None:
            return float(self.keep_tokens)
        ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
        return ratio * n_visual


class MethodConfig(BudgetConfig):
    """Base of every method's config."""
