"""Building blocks shared by the baseline methods: pure tensor rules, a shared rule's home and small config pieces.

Nothing here knows a model; every function works on plain tensors or on a stage's context.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from prunekit.plugin import Method, MethodConfig, StageContext, StrictModel, topk


class KeepMostRelevant(Method):
    """Base of the methods whose rule keeps the ``k`` most relevant tokens, ties to the lower index (FastV,
    PyramidDrop, FasterVLM): they differ only in where they prune and which signal is the relevance."""

    SelectionConfig = StrictModel

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config) -> Tensor:
        return topk(relevance, k)


def above_mean_similarity(visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's raters (its section 3.2): ``s`` = softmax over the text tokens of ``V·Tᵀ``, averaged over the
    visual tokens; the raters are the text tokens whose ``s`` is above the mean of ``s``. ``visual`` ``[V, D]``,
    ``text`` ``[T, D]``; returns a ``[T]`` bool mask (every text token when none is above the mean: a single text
    token, or all equal). Batched: ``[B, V, D]`` and ``[B, T, D]`` give ``[B, T]``."""
    s = (visual.float() @ text.float().transpose(-1, -2)).softmax(-1).mean(-2)
    above = s > s.mean(-1, keepdim=True)
    return above | ~above.any(-1, keepdim=True)  # on the device: deciding on the host would read it


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
    if _stackable(visual, text):  # every sample the same sizes: the batch at once (the same operations, batched)
        raters = list(above_mean_similarity(torch.stack(visual), torch.stack(text)).to(columns[0].device).unbind(0))
    else:
        raters = [above_mean_similarity(v, t).to(c.device) for c, v, t in zip(columns, visual, text)]
    # the mean over each sample's raters as a masked sum over its text columns by their count: how many raters a
    # sample has stays on the device (taking them out would read it; the same values, summed in another order)
    if _stackable(columns, text):
        tails = torch.stack([c[:, c.shape[1] - t.shape[0]:] for c, t in zip(columns, text)])  # [B, n, T]
        chosen = torch.stack(raters).to(tails.dtype)  # [B, T]
        return list(((tails @ chosen[..., None])[..., 0] / chosen.sum(-1, keepdim=True)).unbind(0))
    return [c[:, c.shape[1] - t.shape[0]:] @ r.to(c.dtype) / r.sum() for c, t, r in zip(columns, text, raters)]


def _stackable(*groups: list[Tensor]) -> bool:
    """Whether each group's per-sample tensors can be stacked: several samples, all of one shape."""
    return all(len(g) > 1 and len({t.shape for t in g}) == 1 for g in groups)


def rater_signals(raters: str) -> tuple[str, ...]:
    """The decoder signals :func:`rater_attention` reads for ``raters``."""
    return ("text_attention", "layer_input") if raters == "sparsevlm" else ("text_attention",)


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
