"""Building blocks shared by the baseline methods: pure tensor rules and small config pieces.

Nothing here knows a model; every function works on plain tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit.config import MethodConfig, StrictModel
from prunekit.interfaces import Choice, StageContext


def topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores along the last dim (ties go to the lower index), ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(-1).values


def cosine(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarity of the rows of ``x`` ``[..., n, d]`` with those of ``y`` (default ``x``), in float32+."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.nn.functional.normalize(x.to(dtype), dim=-1)
    b = a if y is None else torch.nn.functional.normalize(y.to(dtype), dim=-1)
    return a @ b.transpose(-1, -2)


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise the last dim to [0, 1] (a constant row becomes all ones)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(x))


def relevance_topk(signal: str, **options):
    """A stage chooser: per sample, the ``k`` tokens with the highest ``signal``."""

    def choose(ctx: StageContext) -> list[Tensor]:
        relevance = ctx.relevance(signal, **options)
        return [topk(r.float(), k) for r, k in zip(relevance, ctx.keep)]

    return choose


def stack_choices(choices: list[Choice], features: Tensor) -> "Reduction":
    """Batch per-sample :class:`Choice` objects of equal size into a :class:`Reduction`."""
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
    return Reduction(idx, values, merged)


class Reduction:
    """Model-free result of a merging method: kept ``indices`` ``[B, k]`` (ascending), their ``values``
    ``[B, k, D]`` and ``merged`` flags ``[B, k]``."""

    def __init__(self, indices: Tensor, values: Tensor, merged: Tensor) -> None:
        self.indices, self.values, self.merged = indices, values, merged

    def __repr__(self) -> str:
        return f"Reduction(indices={tuple(self.indices.shape)}, merged={int(self.merged.sum())})"


class DecoderStageConfig(MethodConfig):
    """Base for methods that prune inside the language model at fixed layers."""

    raters: Literal["last_token", "sparsevlm", "all_text"] = Field(
        "last_token", description="Text tokens whose attention rates the visual tokens."
    )


class SeedSelection(StrictModel):
    seed: int = Field(0, description="Seed of the random choice (the same for every sample, so batches equal rows).")


__all__ = [
    "topk", "cosine", "minmax", "relevance_topk", "stack_choices", "Reduction", "DecoderStageConfig",
    "SeedSelection", "PositiveInt",
]
