"""DART (EMNLP'25, arXiv:2502.11494): keep the visual tokens that duplicate the pivots least.

After decoder layer K-1: pivots are the ``image_pivots`` visual tokens and ``text_pivots`` instruction tokens whose
layer K-1 keys have the largest L1 norm. The visual pivots are kept; every pivot then claims ``⌊r/P⌋`` of the
remaining budget ``r`` (``P`` pivots), in pivot order, as the not yet chosen visual tokens least cosine-similar to
it (layer K-1 output states); what is left of ``r`` goes to the tokens least similar to their most similar pivot.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl
from prunekit.config import MethodConfig, StrictModel
from prunekit.planning import StagePlan, check_layers, make_stages
from prunekit.ops import cosine, topk


def dart_select(
    features: Tensor, visual_key_norms: Tensor, k: int, text_states: Tensor | None = None,
    text_key_norms: Tensor | None = None, image_pivots: int = 4, text_pivots: int = 4,
) -> Tensor:
    """DART's rule for one sample: ``features [n, D]``, key norms ``[n]`` (and the text's), budget ``k``."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    p_img = min(image_pivots, k)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    img_pivots = topk(visual_key_norms.float(), p_img) if p_img else visual_key_norms.new_zeros(0).long()
    chosen[img_pivots] = True
    pivot_feats = [features[img_pivots]]
    if text_states is not None and text_states.shape[0] and text_pivots:
        t = topk(text_key_norms.float(), min(text_pivots, text_states.shape[0]))
        pivot_feats.append(text_states[t])
    pivots = torch.cat(pivot_feats)
    if pivots.shape[0] == 0:
        return topk(visual_key_norms.float(), k)
    sim = cosine(pivots, features)  # [P, n]
    remaining = k - p_img
    quota = remaining // pivots.shape[0]
    for p in range(pivots.shape[0]):
        if quota == 0:
            break
        score = (-sim[p]).masked_fill(chosen, float("-inf"))
        chosen[topk(score, quota)] = True
    left = k - int(chosen.sum())
    if left:
        score = (-sim.amax(0)).masked_fill(chosen, float("-inf"))
        chosen[topk(score, left)] = True
    return chosen.nonzero().squeeze(1)


class DartSelection(StrictModel):
    image_pivots: NonNegativeInt = Field(4, description="Visual pivots (largest key L1 norm), kept.")
    text_pivots: NonNegativeInt = Field(4, description="Instruction pivots (largest key L1 norm).")


class DartConfig(DartSelection, MethodConfig):
    layer: PositiveInt = Field(2, description="K: first decoder layer that sees the pruned tokens (paper: 2).")


class Dart(Method):
    name = "dart"
    Config = DartConfig
    SelectionConfig = DartSelection
    description = "Pivot tokens by key norm; keep the visual tokens least similar to the pivots."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layer = check_layers([cfg.layer], spec.num_layers, "layer")[0]

        def choose(ctx):
            vkeys = ctx.relevance("keys", tokens="visual")
            tkeys = ctx.relevance("keys", tokens="text")
            texts = ctx.relevance("text_states")
            return [
                dart_select(f, vk.float().abs().sum(-1), k, ts, tk.float().abs().sum(-1), cfg.image_pivots,
                            cfg.text_pivots)
                for f, vk, tk, ts, k in zip(ctx.features, vkeys, tkeys, texts, ctx.keep)
            ]

        plan = StagePlan("decoder_layer", choose, layer, label=f"dart (layer {layer})", signals=("keys", "text_states"))
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: DartSelection) -> Tensor:
        """Model-free: ``relevance`` stands for the visual tokens' key norms (no text pivots)."""
        if relevance is None:
            raise ValueError("dart picks pivots by key norm: pass relevance=[B, N] (the visual tokens' key norms)")
        return torch.stack([dart_select(f, r, k, None, None, config.image_pivots, 0)
                            for f, r in zip(features, relevance)])


@hookimpl
def prunekit_register_methods(register):
    register(Dart)
