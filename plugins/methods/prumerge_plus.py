"""PruMerge+ (arXiv:2403.15388): [CLS]-attention outliers plus spatial samples, each absorbing its neighbours.

On the vision features: the tokens whose [CLS] attention is an IQR outlier (above ``Q3 + iqr_factor·IQR``) are
kept first, most attended first, up to the budget; the rest of the budget is filled with spatially uniform samples
(evenly spaced over the remaining tokens in sequence order). Each kept token's value then becomes the
[CLS]-attention-weighted mean of itself and its ``neighbours`` most key-similar tokens. The paper's count is
adaptive (about 25 %); prunekit meets the budget you ask for exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl
from prunekit.config import MethodConfig, StrictModel
from prunekit.interfaces import Choice, Reduction
from prunekit.planning import StagePlan, make_stages
from prunekit.ops import cosine
from prunekit_plugins.methods.common import stack_choices


def prumerge_plus_choice(
    features: Tensor, cls_attention: Tensor, keys: Tensor, k: int, neighbours: int = 32, iqr_factor: float = 1.5
) -> Choice:
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    attn = cls_attention.float()
    q1, q3 = torch.quantile(attn, 0.25), torch.quantile(attn, 0.75)
    outliers = (attn > q3 + iqr_factor * (q3 - q1)).nonzero().squeeze(1)
    outliers = outliers[torch.sort(attn[outliers], descending=True, stable=True).indices][:k]
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    chosen[outliers] = True
    left = k - outliers.numel()
    if left:
        rest = (~chosen).nonzero().squeeze(1)
        places = torch.linspace(0, rest.numel() - 1, left, device=features.device).round().long()
        chosen[rest[places]] = True
    kept = chosen.nonzero().squeeze(1)
    sim = cosine(keys[kept], keys)  # [k, n]
    sim[torch.arange(kept.numel(), device=features.device), kept] = float("-inf")
    nn = sim.topk(min(neighbours, n - 1), dim=-1).indices  # [k, m]
    group = torch.cat([kept[:, None], nn], 1)  # [k, 1 + m]
    w = attn[group]
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    values = (w[..., None] * features[group].float()).sum(1).to(features.dtype)
    return Choice(kept, values, torch.ones(kept.numel(), dtype=torch.bool, device=features.device))


class PruMergePlusSelection(StrictModel):
    neighbours: PositiveInt = Field(32, description="Key-nearest tokens each kept token absorbs.")
    iqr_factor: float = Field(1.5, gt=0.0, description="Outlier threshold Q3 + factor·IQR on [CLS] attention.")


class PruMergePlusConfig(PruMergePlusSelection, MethodConfig):
    pass


class PruMergePlus(Method):
    name = "prumerge_plus"
    Config = PruMergePlusConfig
    SelectionConfig = PruMergePlusSelection
    description = "[CLS]-attention outliers + spatial samples, merged with their key neighbours."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config

        def choose(ctx):
            attn, keys = ctx.relevance("cls_attention"), ctx.relevance("keys")
            return [prumerge_plus_choice(f, a, kk, k, cfg.neighbours, cfg.iqr_factor)
                    for f, a, kk, k in zip(ctx.features, attn, keys, ctx.keep)]

        plan = StagePlan("vision_features", choose, label="prumerge_plus", signals=("cls_attention", "keys"))
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: PruMergePlusSelection) -> Reduction:
        """Model-free: ``relevance`` is the [CLS] attention; the features double as keys."""
        if relevance is None:
            raise ValueError("prumerge_plus needs the [CLS] attention: pass relevance=[B, N]")
        return stack_choices([prumerge_plus_choice(f, r, f, k, config.neighbours, config.iqr_factor)
                              for f, r in zip(features, relevance)], features)


@hookimpl
def prunekit_register_methods(register):
    register(PruMergePlus)
