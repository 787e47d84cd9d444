"""SparseVLM (ICML'25, arXiv:2410.04417): text-guided pruning inside the LLM, with token recycling.

As its official code does it (github.com/Gumpest/SparseVLMs, version 1.0, the default there):

1. *Raters*, once per prefill, on the language model's input embeddings: ``s`` = softmax over the instruction's
   tokens of ``V·Tᵀ``, averaged over the visual tokens; the raters are the instruction tokens whose ``s`` is above
   its mean (:func:`~prunekit_plugins.methods.common.above_mean_similarity`).
2. At each stage layer ℓ (2, 6 and 15 of 32) the layer runs on every token present, and its own attention ranks the
   visual tokens: the raters' rows, mean over heads, then mean over the raters. The top ``keep`` go on (at most all
   but one). prunekit's stage is at ℓ+1 (3, 7, 16: the first layers that see fewer tokens) and reads layer ℓ's
   attention.
3. Recycling: of the ``d`` deleted tokens, the ``int(0.3·d) + 1`` most relevant are clustered by density peaks
   (DPC-kNN, :func:`density_peak_clusters`) into ``m // 10 + 1`` groups (``m`` clustered tokens); each group comes
   back as one token, the mean of its members' layer-ℓ outputs (:func:`merge_clusters`). They come on top of
   ``keep`` and are appended after the kept tokens, in the order of their centres' scores.

Budgets. Nominally (the default) ``keep_tokens=T`` is the official code's ``RETAIN_TOKN``: each stage keeps the
official count for T (64: 66/30/17, 96: 238/48/26, 128: 303/110/36, 192: 300/200/110; another T: the nearest
listed T's counts scaled by T / T_ref) plus its recycled tokens, so a stage's count is ``keep + clusters``. With
``budget_meaning="layer_average"`` the nearest listed schedule's shape is scaled so that the layer average is T,
and the recycled tokens count toward each stage's count, as they do with an explicit ``schedule``; such a count is
divided by :func:`split_count` (the most tokens kept by relevance that leave room for their recycled tokens).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit.plugin import (
    Choice,
    Method,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    check_layers,
    hookimpl,
    make_stages,
    scale_layers,
    topk,
    true_indices,
)
from prunekit_plugins.methods.common import DecoderStageConfig, rater_attention, rater_signals

#: the official per-stage counts on LLaVA-1.5-7B (``score.py``, version 1.0), by nominal budget ``RETAIN_TOKN``
PAPER_SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
#: first decoder layers that see each stage's count on 32 layers: the official code prunes after layers 2, 6, 15
OFFICIAL_LAYERS = (3, 7, 16)


def recycled_count(deleted: int, recycle_ratio: float = 0.3, cluster_size: int = 10) -> tuple[int, int]:
    """``(m, clusters)`` for ``deleted`` tokens: the ``m = int(deleted · recycle_ratio) + 1`` most relevant are
    clustered (at most ``deleted``) into ``m // cluster_size + 1`` groups (at most ``m``); ``(0, 0)`` when
    nothing was deleted."""
    if deleted <= 0:
        return 0, 0
    m = min(deleted, int(deleted * recycle_ratio) + 1)
    return m, min(m, m // cluster_size + 1)


def split_count(n: int, total: int, recycle: bool = True, recycle_ratio: float = 0.3,
                cluster_size: int = 10) -> tuple[int, int]:
    """How a stage keeping ``total`` of ``n`` tokens splits its count: ``(kept by relevance, recycled)``.

    The kept count is the largest ``t < n`` whose ``t`` plus the recycled tokens of the ``n - t`` deleted ones is at
    most ``total`` (it is then exactly ``total``: each token more deleted adds at most one group). No recycling when
    ``total >= n`` (nothing is pruned) or when not even the recycled tokens of keeping none fit."""
    if not recycle or total >= n:
        return min(total, n), 0
    for t in range(min(total, n - 1), -1, -1):
        clusters = recycled_count(n - t, recycle_ratio, cluster_size)[1]
        if t + clusters <= total:
            return t, clusters
    return total, 0


def official_schedule(n: int, budget: float, config: "SparseVLMConfig", stages: int = 3) -> list[tuple[int, int]]:
    """The nominal stages for a budget ``T`` of ``n`` visual tokens, as ``(kept by relevance, recycled on top)``:
    the official counts for T (the nearest listed T's scaled by T / T_ref, rounded half up, otherwise); each stage
    keeps at most all but one of the tokens present, as the official code does, plus its recycled tokens
    (``recycle_on_top``; else the count includes them, and :func:`split_count` divides it)."""
    if budget >= n:
        return [(n, 0)] * stages
    ref = min(PAPER_SCHEDULES, key=lambda t: (abs(t - budget), t))
    counts = PAPER_SCHEDULES[ref] if budget == ref else [int(c * budget / ref + 0.5) for c in PAPER_SCHEDULES[ref]]
    out, present = [], n
    for count in counts:
        if config.recycle and config.recycle_on_top:
            keep = max(1, min(count, present - 1))
            out.append((keep, recycled_count(present - keep, config.recycle_ratio, config.cluster_size)[1]))
        else:
            out.append((max(1, min(count, present)), 0))
        present = sum(out[-1])
    return out


def official_counts(n: int, budget: float, config: "SparseVLMConfig", stages: int = 3) -> list[int]:
    """The nominal per-stage counts (recycled tokens included) for a budget ``T`` of ``n`` visual tokens."""
    return [keep + recycled for keep, recycled in official_schedule(n, budget, config, stages)]


def density_peak_clusters(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` ``[m, C]`` into ``clusters`` groups by density peaks with k nearest neighbours.

    Distances are Euclidean divided by √C. A row's density is ``exp(-mean squared distance to its k nearest rows)``,
    itself included, with ``k = clusters``; ``δ`` is the distance to the nearest denser row (the largest distance of
    all for the densest); the centres are the ``clusters`` rows of largest ``δ·density``, in that order (ties: the
    earlier row first), and every row joins its nearest centre (a centre itself). Rows of equal density are not
    denser than each other (with k = 2 a pair of mutual nearest neighbours always ties): the official code adds
    noise below 1e-6 to the densities, which its half-precision runs round away; prunekit adds none. Returns
    ``(centres [clusters], assignment [m])``, ``assignment`` indexing ``centres``.
    """
    width = x.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dtype)[None]
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist")[0] / width ** 0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: row j is denser than row i
    delta = torch.where(denser, dist, dist.max()).amin(-1)
    centres = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]
    assignment = dist[centres].argmin(0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def merge_clusters(x: Tensor, assignment: Tensor, clusters: int) -> Tensor:
    """Each group's merged token, ``[clusters, C]``: the mean of its rows, as the official code forms it (each row
    weighted by ``1 / (size + 1e-6)``, then summed)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ones = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    sizes = torch.zeros(clusters, dtype=dtype, device=x.device).index_add_(0, assignment, ones) + 1e-6
    weighted = x.to(dtype) * (ones / sizes[assignment])[:, None]
    return torch.zeros(clusters, x.shape[1], dtype=dtype, device=x.device).index_add_(0, assignment, weighted)


def sparsevlm_choice(
    features: Tensor, relevance: Tensor, k: int, recycle: bool = True, recycle_ratio: float = 0.3,
    cluster_size: int = 10, top: int | None = None,
) -> Choice:
    """Keep ``k`` of ``n`` tokens: the ``top`` most relevant, then the recycled cluster tokens (see the module doc);
    ``top`` (None: :func:`split_count`) must leave room for exactly its recycled tokens.

    The result is an ordered :class:`Choice`: the kept tokens in sequence order, then the recycled ones in the
    order of their centres' scores, each at the index of its centre (a deleted token)."""
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    clusters = recycled_count(n - top, recycle_ratio, cluster_size)[1] if recycle and top is not None else None
    if clusters is None or top + clusters != k:
        top, clusters = split_count(n, k, recycle, recycle_ratio, cluster_size)
    kept = topk(relevance, top)
    if not clusters:
        return Choice(kept)
    deleted = torch.ones(n, dtype=torch.bool, device=features.device)
    deleted[kept] = False
    deleted = true_indices(deleted, n - top)  # topk's indices are distinct: no read of their count
    m = recycled_count(deleted.numel(), recycle_ratio, cluster_size)[0]
    pool = deleted[torch.sort(relevance[deleted], descending=True, stable=True).indices[:m]]
    centres, assignment = density_peak_clusters(features[pool], clusters)
    recycled = merge_clusters(features[pool], assignment, clusters).to(features.dtype)
    # tokens per cluster (bincount would read its output's length from the device; it is the clusters')
    sizes = assignment.new_zeros(clusters).index_add_(0, assignment, torch.ones_like(assignment))
    merged = torch.cat([torch.zeros(top, dtype=torch.bool, device=features.device), sizes > 1])
    return Choice(torch.cat([kept, pool[centres]]), torch.cat([features[kept], recycled]), merged, ordered=True)


class SparseVLMSelection(StrictModel):
    recycle: bool = Field(True, description="Bring back clustered deleted tokens (the paper's recycling).")
    recycle_ratio: float = Field(
        0.3, ge=0.0, le=1.0, description="int(ratio × deleted) + 1 of the deleted tokens, the most relevant, are "
        "clustered for recycling.")
    cluster_size: PositiveInt = Field(10, description="m clustered tokens make m // cluster_size + 1 recycled tokens.")


class SparseVLMConfig(SparseVLMSelection, DecoderStageConfig):
    raters: Literal["sparsevlm", "last_token", "all_text"] = Field(
        "sparsevlm", description="Rater tokens: sparsevlm (the paper's rule), last_token or all_text."
    )
    rater_states: Literal["embeddings", "stage"] = Field(
        "embeddings", description="What the sparsevlm rule reads: 'embeddings' = the LLM's input embeddings, once per "
        "prefill (the official code); 'stage' = each stage's attention layer's normalised input (prunekit's earlier "
        "choice, TOPS's).",
    )
    recycle_on_top: bool = Field(
        True, description="Nominal budgets: recycled tokens come on top of the official per-stage counts (the "
        "official code); False: they count toward them. Layer-averaged budgets and schedules always count them.",
    )
    layers: list[PositiveInt] | None = Field(
        None, min_length=1, description="First decoder layers that see each stage's count; None: 3, 7, 16 of 32 "
        "(the official code prunes after layers 2, 6, 15), scaled to depth.",
    )


class SparseVLM(Method):
    name = "sparsevlm"
    Config = SparseVLMConfig
    SelectionConfig = SparseVLMSelection
    description = "Text-rater attention top-k at three LLM layers, with recycling of deleted tokens."
    relevance_input = "the rater attention"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: SparseVLMSelection,
             top: int | None = None) -> Choice:
        """``relevance``: the raters' attention; ``top``: the count kept by relevance where a nominal stage fixed it
        (None: :func:`split_count`)."""
        return sparsevlm_choice(features, relevance, k, config.recycle, config.recycle_ratio, config.cluster_size,
                                top=top)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layers = check_layers(cfg.layers, spec.num_layers) if cfg.layers else scale_layers(OFFICIAL_LAYERS,
                                                                                             spec.num_layers)
        hint = cfg.keep_tokens or (cfg.target(spec.visual_tokens_per_image) if spec.visual_tokens_per_image else 64)
        paper_t = min(PAPER_SCHEDULES, key=lambda t: (abs(t - hint), t))
        shape = [c / paper_t for c in PAPER_SCHEDULES[paper_t]]
        if len(layers) != 3:  # user layers: keep the paper's halving-ish decay
            shape = [0.5 ** i for i in range(len(layers))]
        from_embeddings = cfg.rater_states == "embeddings"
        # (stage, tokens present, stage count) -> kept by relevance, for nominal stages whose recycled tokens come
        # on top (a count can be reached by two splits; the official one is the one the schedule was built from)
        splits: dict[tuple[int, int, int], int] = {}

        def nominal(n: int, budget: float) -> list[int]:
            schedule = official_schedule(n, budget, cfg)
            present = n
            for i, (keep, recycled) in enumerate(schedule):
                splits[(i, present, keep + recycled)] = keep
                present = keep + recycled
            return [keep + recycled for keep, recycled in schedule]

        def relevance(ctx):
            return [r.float() for r in rater_attention(ctx, cfg.raters, from_embeddings=from_embeddings)]

        def chooser(i: int):
            return self.chooser(relevance, top=lambda ctx: [splits.get((i, f.shape[0], k))
                                                            for f, k in zip(ctx.features, ctx.keep)])

        plans = [StagePlan("decoder_layer", chooser(i), layer, shape=s, signals=rater_signals(cfg.raters),
                           label=f"sparsevlm stage {i + 1} (layer {layer})")
                 for i, (layer, s) in enumerate(zip(layers, shape))]
        # the official schedules have three stages; with other layers T is the layer average
        return make_stages(cfg, spec, plans, method=self.name, nominal=nominal if len(layers) == 3 else None)


@hookimpl
def prunekit_register_methods(register):
    register(SparseVLM)
