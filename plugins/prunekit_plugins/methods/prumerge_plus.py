"""PruMerge+ (arXiv:2403.15388): [CLS]-attention outliers plus spatial samples, each absorbing its neighbours.

What its official code computes (``token_prune_merge_advanced_plus`` in 42Shawn/LLaVA-PruMerge), and prunekit by
default, on the vision features ``x`` (before the projector):

1. ``a``: the [CLS] attention of the encoder's last layer (LLaVA-1.5: ``layers[23]``, the layer after the one the
   projector reads, whose input is that layer's output; where the projector reads the last layer, that layer
   itself), its q and k taken as *one* head over the whole width (scaled by width^-1/2, softmax over every token),
   and that layer's keys over the whole width;
2. the tokens whose ``a`` is an IQR outlier (``> Q3 + 1.5·IQR``) are kept, most attended first; then the positions
   ``0, s, 2s, …`` below the last one that are not outliers, with ``s = ⌊⌊1/r⌋/3⌋`` for the outlier ratio ``r``;
3. each kept token ``i`` becomes ``x_i + Σ_j a_j·x_j`` over its 32 most key-similar other tokens (cosine; not
   normalised), and one extra token ``Σ_j a_j·x_j`` over the pruned tokens follows the kept ones.

The official count is adaptive; a prunekit stage keeps exactly its budget, the extra token included. Where the
budget equals the official count the result is the official one; otherwise the outliers still come first and the
spatial samples are thinned (or taken from a finer stride) evenly to fill the budget. A result fills places: the
kept tokens' own and, for the extra token, the last pruned token's. ``order="official"`` (the model default) fills
them with the official sequence, which under renumbered positions is the sequence the official code gives the LLM;
``order="sequence"`` puts every value at its own place. ``attention_layer="feature"`` always reads the feature
layer's own q/k (prunekit's earlier reading), ``attention_layer="next"`` always the layer after it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from prunekit.plugin import (
    Choice,
    Method,
    MethodConfig,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    cosine,
    hookimpl,
    make_stages,
    true_indices,
)


def iqr_outliers(attn: Tensor, factor: float = 1.5) -> Tensor:
    """Indices of the tokens whose ``attn`` is above ``Q3 + factor·IQR``, most attended first (the test in float32
    with linear quantiles, as the official code does it in numpy)."""
    a = attn.float()
    q1, q3 = torch.quantile(a, 0.25), torch.quantile(a, 0.75)
    out = (a > q3 + factor * (q3 - q1)).nonzero().squeeze(1)
    return out[torch.sort(attn[out], descending=True, stable=True).indices]


def sample_stride(outliers: int, n: int) -> int:
    """The official spatial stride ``⌊⌊1/r⌋/3⌋`` for ``r = outliers / n`` (at least 1; ``n`` when none is an outlier,
    where the official code divides by zero)."""
    if outliers == 0:
        return n
    return max(1, int(int(1 / (outliers / n)) / 3))


def spatial_samples(n: int, taken: Tensor, m: int, stride: int) -> Tensor:
    """``m`` positions spread over ``0, s, 2s, … < n - 1`` that are not ``taken``, ascending.

    ``s`` is ``stride`` when that grid has ``m`` free positions or more (exactly ``m``: the official samples),
    else the largest smaller stride that has; its positions are thinned evenly to ``m``."""
    if m <= 0:
        return torch.zeros(0, dtype=torch.long, device=taken.device)
    free = torch.ones(n, dtype=torch.bool, device=taken.device)
    free[taken] = False
    if m > 1:  # a grid of stride s >= (n - 1) / (m - 1) has fewer than m positions: start below that
        stride = min(stride, (n - 1) // (m - 1) + 1)
    # the free positions of the grid of every stride tried (stride, stride - 1, ..., 1), [strides, n - 1], and
    # their counts with all free positions' last: one read of the device, not one per stride tried
    strides = torch.arange(max(1, stride), 0, -1, device=taken.device)
    on_grid = (torch.arange(n - 1, device=taken.device) % strides[:, None] == 0) & free[None, :n - 1]
    counts = torch.cat([on_grid.sum(1), free.sum()[None]]).tolist()
    tried = next((i for i, c in enumerate(counts[:-1]) if c >= m), None)
    if tried is None:  # even stride 1 stops before the last position
        grid = true_indices(free, counts[-1])
    else:
        grid = true_indices(on_grid[tried], counts[tried])
    return grid[torch.linspace(0, grid.numel() - 1, m, device=taken.device).round().long()]


def prumerge_plus_choice(
    features: Tensor, cls_attention: Tensor, keys: Tensor, k: int, neighbours: int = 32, iqr_factor: float = 1.5,
    extra_token: bool = True, order: Literal["sequence", "official"] = "sequence",
) -> Choice:
    """One sample: ``features`` ``[n, D]`` (merged), ``cls_attention`` ``[n]``, ``keys`` ``[n, Dk]``, budget ``k``."""
    n = features.shape[0]
    device = features.device
    if k >= n:
        return Choice(torch.arange(n, device=device))
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x, attn = features.to(dtype), cls_attention.to(dtype)
    real = k - 1 if extra_token else k  # the extra token takes one place of the budget
    outliers = iqr_outliers(attn, iqr_factor)
    kept = outliers[:real]
    kept = torch.cat([kept, spatial_samples(n, kept, real - kept.numel(), sample_stride(outliers.numel(), n))])

    values = x[kept]
    if kept.numel() and n > 1:
        sim = cosine(keys[kept], keys)  # [real, n]
        sim[torch.arange(kept.numel(), device=device), kept] = float("-inf")  # a token is not its own neighbour
        near = sim.topk(min(neighbours, n - 1), dim=-1).indices  # [real, m]
        values = values + (attn[near][..., None] * x[near]).sum(1)
    places = kept
    if extra_token:
        pruned = torch.ones(n, dtype=torch.bool, device=device)
        pruned[kept] = False
        pruned = true_indices(pruned, n - kept.numel())  # the kept indices are distinct: no read of their count
        values = torch.cat([values, (attn[pruned][:, None] * x[pruned]).sum(0, keepdim=True)])
        places = torch.cat([kept, pruned[-1:]])  # the extra token takes the place of the last pruned token
    if order == "official":  # the official sequence, laid into the places in sequence order
        places = places.sort().values
    return Choice(places, values.to(features.dtype), torch.ones(k, dtype=torch.bool, device=device))


class PruMergePlusSelection(StrictModel):
    neighbours: PositiveInt = Field(32, description="Key-nearest tokens each kept token absorbs.")
    iqr_factor: float = Field(1.5, gt=0.0, description="Outlier threshold Q3 + factor·IQR on [CLS] attention.")
    extra_token: bool = Field(
        True, description="One place of the budget holds Σ a_j·x_j over the pruned tokens (the official code's "
        "extra token); False: every place holds a kept token."
    )


class PruMergePlusConfig(PruMergePlusSelection, MethodConfig):
    attention_layer: Literal["last", "next", "feature"] = Field(
        "last", description="The vision layer whose q/k give the [CLS] attention and the keys: 'last', the "
        "encoder's last layer, as the official code (layers[23] of CLIP-L's 24; on LLaVA-1.5 the layer after the "
        "one the projector reads, applied to that layer's output); 'next': the layer after the one the projector "
        "reads; 'feature': the layer the projector reads."
    )
    order: Literal["official", "sequence"] = Field(
        "official", description="'official': the LLM sees the official sequence (outliers by attention, then the "
        "spatial samples, then the extra token), laid into the kept places; 'sequence': each kept token in its "
        "own place, in sequence order."
    )

    @model_validator(mode="after")
    def _official_order_needs_renumbering(self):
        if self.order == "official" and self.positions == "original":
            raise ValueError("order='official' fills the kept places with the official sequence, which the LLM sees "
                             "as such only under renumbered positions; with positions='original' use order='sequence'")
        return self


class PruMergePlus(Method):
    name = "prumerge_plus"
    Config = PruMergePlusConfig
    SelectionConfig = PruMergePlusSelection
    description = "[CLS]-attention outliers + spatial samples, merged with their key neighbours."
    relevance_input = "the [CLS] attention"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: PruMergePlusSelection,
             keys: Tensor | None = None) -> Choice:
        """``relevance``: the [CLS] attention; ``keys`` (model-free: the features) find the neighbours. The values
        fill the places in sequence order unless the full config asks for the official order."""
        return prumerge_plus_choice(features, relevance, features if keys is None else keys, k, config.neighbours,
                                    config.iqr_factor, config.extra_token, getattr(config, "order", "sequence"))

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        where = dict(heads="one", layer=cfg.attention_layer)
        choose = self.chooser(lambda ctx: ctx.relevance("cls_attention", **where),
                              keys=lambda ctx: ctx.relevance("keys", **where))
        plan = StagePlan("vision_features", choose, label="prumerge_plus", signals=("cls_attention", "keys"))
        return make_stages(cfg, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(PruMergePlus)
