"""VisPruner (ICCV'25, arXiv:2412.01818v2): important tokens by [CLS] attention, then diverse ones by de-duplication.

On the vision features: the ``round(k·r)`` tokens with the highest [CLS] attention are important; the rest are
thinned until ``k - round(k·r)`` remain: split them (in sequence order) into alternating halves A (even places) and
B (odd places), drop the up to ``step`` tokens of A most cosine-similar to B, and repeat, swapping the roles of the
halves each round.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl
from prunekit.config import MethodConfig, StrictModel
from prunekit.planning import StagePlan, make_stages
from prunekit.ops import cosine, topk


def remove_duplicates(features: Tensor, candidates: Tensor, keep: int, step: int = 8) -> Tensor:
    """Thin ``candidates`` (indices into ``features``, ascending) to ``keep`` by repeated bipartite de-duplication."""
    rest = candidates
    swap = False
    while rest.numel() > keep:
        a, b = (rest[1::2], rest[0::2]) if swap else (rest[0::2], rest[1::2])
        if b.numel() == 0:  # one token left in a half: drop from the other
            a, b = b, a
        drop = min(step, rest.numel() - keep, a.numel())
        sim = cosine(features[a], features[b]).amax(-1)
        dropped = a[topk(sim, drop)]
        rest = rest[~torch.isin(rest, dropped)]
        swap = not swap
    return rest


def vispruner_select(features: Tensor, cls_attention: Tensor, k: int, important_ratio: float = 0.5, step: int = 8) -> Tensor:
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    important = topk(cls_attention.float(), int(round(k * important_ratio)))
    rest = torch.ones(n, dtype=torch.bool, device=features.device)
    rest[important] = False
    diverse = remove_duplicates(features, rest.nonzero().squeeze(1), k - important.numel(), step)
    return torch.cat([important, diverse]).sort().values


class VisPrunerSelection(StrictModel):
    important_ratio: float = Field(0.5, ge=0.0, le=1.0, description="r: share of the budget chosen by [CLS] attention.")
    step: PositiveInt = Field(8, description="Most tokens dropped per de-duplication round.")


class VisPrunerConfig(VisPrunerSelection, MethodConfig):
    pass


class VisPruner(Method):
    name = "vispruner"
    Config = VisPrunerConfig
    SelectionConfig = VisPrunerSelection
    description = "Important tokens by [CLS] attention + diverse tokens by iterative de-duplication."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config

        def choose(ctx):
            attn = ctx.relevance("cls_attention")
            return [vispruner_select(f, a, k, cfg.important_ratio, cfg.step)
                    for f, a, k in zip(ctx.features, attn, ctx.keep)]

        plan = StagePlan("vision_features", choose, label="vispruner", signals=("cls_attention",))
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: VisPrunerSelection) -> Tensor:
        if relevance is None:
            raise ValueError("vispruner needs the [CLS] attention: pass relevance=[B, N]")
        return torch.stack([vispruner_select(f, r, k, config.important_ratio, config.step)
                            for f, r in zip(features, relevance)])


@hookimpl
def prunekit_register_methods(register):
    register(VisPruner)
