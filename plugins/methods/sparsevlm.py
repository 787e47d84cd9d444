"""SparseVLM (ICML'25, arXiv:2410.04417): text-guided pruning inside the LLM, with token recycling.

At each stage layer, *raters* are the text tokens whose softmax-over-text similarity to the visual tokens is above
its mean; a visual token's relevance is the raters' mean attention to it (layer K-1, recomputed rows). The top
tokens are kept; of the deleted ones the most relevant ``recycle_ratio`` are clustered (density peaks, kNN) into
``m // cluster_size + 1`` groups, and each group comes back as one token: the mean of its hidden states, placed at the
position of the group's centre. Recycled tokens count toward the budget (so counts are exact) and are reported as
merged. Paper schedules (layers 2, 6, 15 of 32) keep 66/30/17 for 64 tokens, 303/110/36 for 128, 300/200/110 for 192;
the one nearest the budget gives the shape, scaled to the exact layer average.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl
from prunekit.config import StrictModel
from prunekit.interfaces import Choice, Reduction
from prunekit.planning import StagePlan, check_layers, make_stages, scale_layers
from prunekit.ops import topk
from prunekit_plugins.methods.common import DecoderStageConfig, rater_rule, stack_choices

#: the paper's per-stage counts on LLaVA-1.5-7B (layers 2, 6, 15), by layer-averaged budget
PAPER_SCHEDULES = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}


def density_peak_clusters(x: Tensor, clusters: int, neighbours: int = 5) -> Tensor:
    """Cluster the rows of ``x`` ``[m, D]`` into ``clusters`` groups by density peaks (DPC-kNN).

    Density ``ρ_i = exp(-mean of squared distances to its kNN)``; ``δ_i`` = distance to the nearest denser row (the
    densest gets the largest distance); centres are the ``clusters`` largest ``ρ·δ``; every row joins its nearest
    centre. Returns ``(centres [c], assignment [m])`` with ``assignment`` indexing ``centres``.
    """
    m = x.shape[0]
    xf = x.float()
    dist = torch.cdist(xf, xf)
    kk = max(1, min(neighbours, m - 1))
    knn = dist.topk(kk + 1, largest=False).values[:, 1:] if m > 1 else dist
    density = torch.exp(-(knn ** 2).mean(-1))
    denser = density[None, :] > density[:, None]
    # ties in density: the lower index counts as denser, so exactly one row is the peak
    tie = (density[None, :] == density[:, None]) & (torch.arange(m)[None, :] < torch.arange(m)[:, None]).to(x.device)
    denser = denser | tie
    delta = dist.masked_fill(~denser, float("inf")).amin(-1)
    delta = torch.where(torch.isinf(delta), dist.amax(), delta)
    centres = topk(density * delta, clusters)
    assignment = dist[:, centres].argmin(-1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def sparsevlm_choice(
    features: Tensor, relevance: Tensor, k: int, recycle: bool = True, recycle_ratio: float = 0.3,
    cluster_size: int = 10,
) -> Choice:
    """Keep ``k`` of ``n`` tokens: top by relevance plus recycled cluster tokens (see the module doc)."""
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    groups = 0
    if recycle:
        recycled = int(round(recycle_ratio * (n - k)))
        groups = min(recycled // cluster_size + 1, k - 1, recycled) if recycled else 0
    kept = topk(relevance, k - groups)
    if not groups:
        return Choice(kept)
    deleted = torch.ones(n, dtype=torch.bool, device=features.device)
    deleted[kept] = False
    deleted_idx = deleted.nonzero().squeeze(1)
    m = max(groups, int(round(recycle_ratio * deleted_idx.numel())))
    pool = deleted_idx[topk(relevance[deleted_idx], m)]
    centres, assignment = density_peak_clusters(features[pool], groups)
    sums = torch.zeros(groups, features.shape[1], device=features.device).index_add_(0, assignment, features[pool].float())
    sizes = torch.bincount(assignment, minlength=groups)
    merged_values = (sums / sizes[:, None]).to(features.dtype)
    indices = torch.cat([kept, pool[centres]])
    values = torch.cat([features[kept], merged_values])
    merged = torch.cat([torch.zeros(kept.numel(), dtype=torch.bool, device=features.device), sizes > 1])
    return Choice(indices, values, merged)


class SparseVLMSelection(StrictModel):
    recycle: bool = Field(True, description="Bring back clustered deleted tokens (the paper's recycling).")
    recycle_ratio: float = Field(0.3, ge=0.0, le=1.0, description="Fraction of the deleted tokens considered for recycling.")
    cluster_size: PositiveInt = Field(10, description="One recycled token per this many considered, plus one.")


class SparseVLMConfig(SparseVLMSelection, DecoderStageConfig):
    raters: Literal["sparsevlm", "last_token", "all_text"] = Field(
        "sparsevlm", description="Rater tokens: sparsevlm (paper), last_token or all_text."
    )
    layers: list[PositiveInt] | None = Field(
        None, min_length=1, description="Stage layers; None: 2, 6, 15 of 32 scaled to depth."
    )


class SparseVLM(Method):
    name = "sparsevlm"
    Config = SparseVLMConfig
    SelectionConfig = SparseVLMSelection
    description = "Text-rater attention top-k at three LLM layers, with recycling of deleted tokens."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layers = check_layers(cfg.layers, spec.num_layers) if cfg.layers else scale_layers((2, 6, 15), spec.num_layers)
        hint = cfg.keep_tokens or (cfg.target(spec.visual_tokens_per_image) if spec.visual_tokens_per_image else 64)
        paper_t = min(PAPER_SCHEDULES, key=lambda t: abs(t - hint))
        shape = [c / paper_t for c in PAPER_SCHEDULES[paper_t]]
        if len(layers) != 3:  # user layers: keep the paper's halving-ish decay
            shape = [0.5 ** i for i in range(len(layers))]

        def choose(ctx):
            relevance = ctx.relevance("text_attention", raters=rater_rule(cfg.raters))
            return [sparsevlm_choice(f, r.float(), k, cfg.recycle, cfg.recycle_ratio, cfg.cluster_size)
                    for f, r, k in zip(ctx.features, relevance, ctx.keep)]

        plans = [StagePlan("decoder_layer", choose, layer, shape=s, label=f"sparsevlm stage {i + 1} (layer {layer})",
                           signals=("text_attention",)) for i, (layer, s) in enumerate(zip(layers, shape))]
        return make_stages(cfg, spec, plans, method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: SparseVLMSelection) -> Reduction:
        if relevance is None:
            raise ValueError("sparsevlm selects by rater attention: pass relevance=[B, N]")
        return stack_choices([
            sparsevlm_choice(f, r, k, config.recycle, config.recycle_ratio, config.cluster_size)
            for f, r in zip(features, relevance)
        ], features)


@hookimpl
def prunekit_register_methods(register):
    register(SparseVLM)
