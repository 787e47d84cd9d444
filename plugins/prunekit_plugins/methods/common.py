"""Building blocks shared by the baseline methods: pure tensor rules and small config pieces.

Nothing here knows a model; every function works on plain tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from prunekit.plugin import Choice, MethodConfig, Reduction, StageContext, StrictModel, topk


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


def above_mean_similarity(visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's raters (its section 3.2): ``s`` = softmax over the text tokens of ``V·Tᵀ``, averaged over the
    visual tokens; the raters are the text tokens whose ``s`` is above the mean of ``s``. ``visual`` ``[V, D]``,
    ``text`` ``[T, D]``; returns a ``[T]`` bool mask (every text token when none is above the mean: a single text
    token, or all equal)."""
    s = (visual.float() @ text.float().T).softmax(-1).mean(0)
    above = s > s.mean()
    return above if bool(above.any()) else torch.ones_like(above)


def rater_attention(
    ctx: StageContext, raters: str, layer: str = "previous", from_embeddings: bool = False
) -> list[Tensor]:
    """Per sample, the raters' attention to each visual token of the stage, mean over heads, then over raters.

    ``raters``: ``last_token`` or ``all_text`` (rules the runtime computes), or ``sparsevlm``
    (:func:`above_mean_similarity`), applied here to the whole prompt's visual and instruction tokens: on the
    language model's input embeddings (``from_embeddings``, as SparseVLM's code, which picks them once per prefill:
    the same tokens at every stage) or on the attention layer's own normalised input (a choice per stage).
    ``layer``: whose attention, ``previous`` (K-1's) or ``next`` (K's).
    """
    if raters != "sparsevlm":
        return ctx.relevance("text_attention", raters=raters, layer=layer)
    where = {"layer": "first"} if from_embeddings else {"layer": layer, "input_norm": True}
    visual = ctx.relevance("layer_input", tokens="visual", **where)
    text = ctx.relevance("layer_input", tokens="text", **where)
    columns = ctx.relevance("text_attention", raters="all_text", layer=layer, per_rater=True)  # [n, T'] per sample
    # the raters' text is the tail of the stage's: once an image's tokens are all pruned, the text after the visual
    # tokens still present also holds what followed that image
    return [c[:, c.shape[1] - t.shape[0]:][:, above_mean_similarity(v, t).to(c.device)].mean(1)
            for c, v, t in zip(columns, visual, text)]


def rater_signals(raters: str) -> tuple[str, ...]:
    """The decoder signals :func:`rater_attention` reads for ``raters``."""
    return ("text_attention", "layer_input") if raters == "sparsevlm" else ("text_attention",)


def rater_topk(raters: str, layer: str = "previous"):
    """A stage chooser: per sample, the ``k`` tokens the raters attend to most (:func:`rater_attention`)."""

    def choose(ctx: StageContext) -> list[Tensor]:
        return [topk(r.float(), k) for r, k in zip(rater_attention(ctx, raters, layer), ctx.keep)]

    return choose


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
