"""Building blocks shared by the baseline methods: pure tensor rules and small config pieces.

Nothing here knows a model; every function works on plain tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from prunekit.config import MethodConfig, StrictModel
from prunekit.interfaces import Choice, Reduction, StageContext
from prunekit.ops import topk


def relevance_topk(signal: str, **options):
    """A stage chooser: per sample, the ``k`` tokens with the highest ``signal``."""

    def choose(ctx: StageContext) -> list[Tensor]:
        relevance = ctx.relevance(signal, **options)
        return [topk(r.float(), k) for r, k in zip(relevance, ctx.keep)]

    return choose


def stack_choices(choices: list[Choice], features: Tensor) -> Reduction:
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


#: the methods' names of the rater rules -> the rules the runtime computes ("sparsevlm": SparseVLM's rule, the text
#: tokens whose softmax-over-text similarity to the visual tokens is above its mean)
RATER_RULES = {"sparsevlm": "above_mean_similarity", "last_token": "last_token", "all_text": "all_text"}


def rater_rule(name: str) -> str:
    """The runtime's rule for a method's ``raters`` setting."""
    return RATER_RULES[name]


class OriginalPositionsConfig(MethodConfig):
    """Base for methods whose official code keeps the kept tokens' original position ids (FastV, DART)."""

    positions: Literal["auto", "renumber", "original"] = Field(
        "original", description="Position ids of kept tokens; the official code keeps the original ones (default).")


class DecoderStageConfig(MethodConfig):
    """Base for methods that prune inside the language model at fixed layers."""

    raters: Literal["last_token", "sparsevlm", "all_text"] = Field(
        "last_token", description="Text tokens whose attention rates the visual tokens."
    )


class SeedSelection(StrictModel):
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1,  # the seeds torch.Generator.manual_seed takes
                      description="Seed of the random choice (the same for every sample, so batches equal rows).")
