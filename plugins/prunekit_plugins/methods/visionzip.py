"""VisionZip (CVPR'25, arXiv:2412.04467): dominant tokens by [CLS] attention plus merged contextual tokens.

On the vision features the projector reads, as the official code (dvlab-research/VisionZip) computes them: the
[CLS] token's feature of the feature layer and the ``k - C - 1`` patches with the highest [CLS] attention (that
layer's) are kept as they are (dominant); the other patches, in sequence order, are merged into ``C`` contextual
tokens: ``C`` targets at the uniform stride ``max(1, M // C)`` over those ``M`` remaining patches, every other
remaining patch assigned to the target whose L2-normalised key (feature layer, mean over heads) is most similar,
and a contextual token's value is its target's feature plus the mean of the patches assigned to it. The language
model sees ``[CLS, dominant patches in sequence order, contextual in target order]``. The paper splits 64 as
54 + 10, 128 as 108 + 20 and 192 as 162 + 30 (the [CLS] counted among the dominant), i.e. ``C = round(10/64 · k)``.

prunekit's visual tokens are the model's patch placeholders; the [CLS] feature (the adapter's ``cls_feature``
signal) fills one of their places, marked merged since it is no patch's own value. ``cls_token=False`` keeps
``k - C`` dominant patches instead, and the model-free ``select``/``reduce``, which have no [CLS] feature, always
do (docs/methods/visionzip.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit import BudgetError, PruningError
from prunekit.plugin import (
    Choice,
    Method,
    MethodConfig,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    hookimpl,
    make_stages,
    topk,
    true_indices,
)


def contextual_count(k: int, ratio: float, fixed: int | None) -> int:
    """C for a budget of ``k``: ``fixed``, else ``round(ratio·k)`` kept within ``1 .. k-1``."""
    if k < 2:
        raise BudgetError(f"visionzip keeps at least 2 tokens (one dominant, one contextual), its minimum; got {k}")
    if fixed is not None:
        if fixed >= k:
            raise BudgetError(f"visionzip: contextual_tokens={fixed} leaves no dominant token of a budget of {k}")
        return fixed
    return min(k - 1, max(1, round(ratio * k)))


def visionzip_choice(
    features: Tensor, cls_attention: Tensor, keys: Tensor, k: int, ratio: float = 10 / 64, fixed: int | None = None,
    value: str = "target_plus_mean", order: str = "after", cls_feature: Tensor | None = None,
) -> Choice:
    """One sample: ``features [n, D]``, ``cls_attention [n]``, ``keys [n, d]``; keep ``k``, ``C`` of them merged
    (``C`` from :func:`contextual_count`). Keeping every token merges nothing.

    ``value``: ``"target_plus_mean"`` (official) or ``"mean"`` (the mean of the target and its tokens).
    ``order``: ``"after"`` (official): the kept places, in sequence order, hold the [CLS] feature, the dominant
    tokens in sequence order and then the contextual ones in their targets' order; ``"target"``: every token at
    its own place. ``cls_feature [D]`` (official): it takes one of the ``k - C`` dominant places (its own place,
    under ``"target"``, is the first remaining token that is no target; it is marked merged)."""
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    contextual = contextual_count(k, ratio, fixed)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    patches = k - contextual - (cls_feature is not None)  # dominant patches
    dominant = topk(cls_attention if cls_attention.dtype == torch.float64 else cls_attention.float(), patches)
    # the remaining tokens, in sequence order, and those of them no target: their counts are known on the host
    # (topk's and arange's indices are distinct), so no nonzero or boolean mask reads the device
    rest = torch.ones(n, dtype=torch.bool, device=features.device)
    rest[dominant] = False
    rest = true_indices(rest, n - dominant.numel())
    step = max(1, rest.numel() // contextual)
    targets = torch.arange(0, rest.numel(), step, device=features.device)[:contextual]
    others = torch.ones(rest.numel(), dtype=torch.bool, device=features.device)
    others[targets] = False
    others = true_indices(others, rest.numel() - targets.numel())
    unit = torch.nn.functional.normalize(keys[rest].to(dtype), dim=-1)
    assignment = (unit[others] @ unit[targets].T).argmax(-1)  # first target on ties
    sums = torch.zeros(targets.numel(), features.shape[1], dtype=dtype, device=features.device)
    sums.index_add_(0, assignment, features[rest[others]].to(dtype))
    # tokens per target (bincount would read its output's length from the device; it is the targets')
    sizes = assignment.new_zeros(targets.numel()).index_add_(0, assignment, torch.ones_like(assignment))
    own = features[rest[targets]].to(dtype)
    if value == "target_plus_mean":
        merged_values = own + sums / sizes.clamp_min(1)[:, None]
    else:
        merged_values = (own + sums) / (sizes + 1)[:, None]
    values = torch.cat([features[dominant], merged_values.to(features.dtype)])
    merged = torch.cat([torch.zeros(dominant.numel(), dtype=torch.bool, device=features.device), sizes > 0])
    places = torch.cat([dominant, rest[targets]])
    if cls_feature is not None:  # [CLS] first, in a place of its own: no dominant token's, no target's
        values = torch.cat([cls_feature.to(features.dtype)[None], values])
        merged = torch.cat([merged.new_ones(1), merged])
        places = torch.cat([rest[others][:1], places])
    if order == "after":  # the same places, filled in the official order
        places = places.sort().values
    return Choice(places, values, merged)


def _unit_cls(units: list[Tensor]) -> list[Tensor]:
    """The [CLS] feature of each budget unit from its per-token ``cls_feature`` rows ``[n, D]``: its first token's
    image (or crop). Tokens the model adds (row breaks) come from no image and have zero rows. Whether every unit
    has such a token is read from the device once for all units."""
    found = [(rows != 0).any(-1) for rows in units]
    if units and not all(torch.stack([f.any().to(found[0].device) for f in found]).tolist()):
        raise PruningError("visionzip: no token of this image comes from an encoder pass with a [CLS] token")
    # argmax gives the first of the largest: the first token found
    return [rows.index_select(0, f.to(torch.int8).argmax().view(1))[0] for rows, f in zip(units, found)]


class VisionZipSelection(StrictModel):
    contextual_ratio: float = Field(10 / 64, gt=0.0, lt=1.0, description="C/k when contextual_tokens is None.")
    contextual_tokens: PositiveInt | None = Field(None, description="Fixed number C of contextual tokens.")
    contextual_value: Literal["target_plus_mean", "mean"] = Field(
        "target_plus_mean",
        description="A contextual token's value: its target's feature plus the mean of the tokens assigned to it "
        "(official), or the mean of the target and those tokens.",
    )
    contextual_order: Literal["after", "target"] = Field(
        "after",
        description="'after': the kept places hold the dominant tokens, then the contextual ones (the official "
        "sequence); 'target': each contextual token sits at its target's place.",
    )


class VisionZipConfig(VisionZipSelection, MethodConfig):
    cls_token: bool | Literal["auto"] = Field(
        "auto",
        description="True: the [CLS] token's feature (feature layer, through the projector) takes the first kept "
        "place and k - C - 1 patches are dominant, as the official code; False: k - C dominant patches, no [CLS]; "
        "'auto': True where the model's adapter can give the [CLS] feature, else False.",
    )


class VisionZip(Method):
    name = "visionzip"
    Config = VisionZipConfig
    SelectionConfig = VisionZipSelection
    description = "Dominant tokens by [CLS] attention + contextual tokens merged by key similarity."
    #: the official code reduces every crop to dominant + contextual tokens (clip_encoder.py L46-83)
    official_budget_per = "crop"
    relevance_input = "the [CLS] attention"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: VisionZipSelection, keys: Tensor | None = None,
             cls_feature: Tensor | None = None) -> Choice:
        """``relevance``: the [CLS] attention; ``keys`` (model-free: the features) assign the contextual tokens;
        ``cls_feature`` (a model's [CLS] feature, none model-free) takes a dominant place."""
        return visionzip_choice(features, relevance, features if keys is None else keys, k, config.contextual_ratio,
                                config.contextual_tokens, config.contextual_value, config.contextual_order,
                                cls_feature)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        use_cls = cfg.cls_token if cfg.cls_token != "auto" else "cls_feature" not in spec.unavailable
        signals = {"keys": lambda ctx: ctx.relevance("keys")}
        if use_cls:
            signals["cls_feature"] = lambda ctx: _unit_cls(ctx.relevance("cls_feature"))
        choose = self.chooser(lambda ctx: ctx.relevance("cls_attention"), **signals)

        least = 2 if cfg.contextual_tokens is None else cfg.contextual_tokens + 1
        signals = ("cls_attention", "keys") + (("cls_feature",) if use_cls else ())
        plan = StagePlan("vision_features", choose, label="visionzip", signals=signals)
        return make_stages(cfg, spec, [plan], minimum=lambda n: least, method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(VisionZip)
