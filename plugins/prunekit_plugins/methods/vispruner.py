"""VisPruner (ICCV'25, arXiv:2412.01818v2): important tokens by [CLS] attention, then diverse ones by de-duplication.

On the vision features, as the official code (Theia-4869/VisPruner, ``llava/model/llava_arch.py``) computes them:
the tokens are ordered by descending [CLS] attention; the first ``int(k·r)`` are important, the others form the
residual. While the residual holds more than the ``k - int(k·r)`` diverse tokens wanted: split it into
``A = residual[0::2]`` and ``B = residual[1::2]``, score each token of A by its highest cosine similarity to B, drop
the ``min(step, excess)`` highest-scoring tokens of A, and let the new residual be the rest of A by descending score
followed by B. The kept tokens stay in sequence order.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit.plugin import (
    Method,
    MethodConfig,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    cosine,
    hookimpl,
    make_stages,
)


def remove_duplicates(features: Tensor, residual: Tensor, keep: int, step: int = 8) -> Tensor:
    """Thin ``residual`` (indices into ``features``, in the order that splits it) to ``keep`` tokens by repeated
    bipartite de-duplication; returns the remaining indices in the loop's final order."""
    while residual.numel() > keep:
        a, b = residual[0::2], residual[1::2]
        # the official count is min(step, excess); a count above A's size (only near the end of very small
        # budgets, where the official indexing fails) is capped at it
        drop = min(step, residual.numel() - keep, a.numel())
        scores = cosine(features[a], features[b]).amax(-1)
        order = torch.sort(scores, descending=True, stable=True).indices
        residual = torch.cat([a[order[drop:]], b])
    return residual


def vispruner_select(features: Tensor, cls_attention: Tensor, k: int, important_ratio: float = 0.5, step: int = 8) -> Tensor:
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    important = int(k * important_ratio)
    scores = cls_attention if cls_attention.dtype == torch.float64 else cls_attention.float()
    ranked = torch.sort(scores, descending=True, stable=True).indices  # ties: the lower index first
    kept = ranked[:important]
    if k > important:
        kept = torch.cat([kept, remove_duplicates(features, ranked[important:], k - important, step)])
    return kept.sort().values


class VisPrunerSelection(StrictModel):
    important_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="r: share of the budget chosen by [CLS] attention (int(k·r) tokens)."
    )
    step: PositiveInt = Field(8, description="Most tokens dropped per de-duplication round.")


class VisPrunerConfig(VisPrunerSelection, MethodConfig):
    pass


class VisPruner(Method):
    name = "vispruner"
    Config = VisPrunerConfig
    SelectionConfig = VisPrunerSelection
    description = "Important tokens by [CLS] attention + diverse tokens by iterative de-duplication."
    #: the official code keeps `visual_token_num` tokens of every crop (llava_arch.py L141-186)
    official_budget_per = "crop"
    relevance_input = "the [CLS] attention"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: VisPrunerSelection) -> Tensor:
        return vispruner_select(features, relevance, k, config.important_ratio, config.step)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        choose = self.chooser(lambda ctx: ctx.relevance("cls_attention"))
        plan = StagePlan("vision_features", choose, label="vispruner", signals=("cls_attention",))
        return make_stages(self.config, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(VisPruner)
