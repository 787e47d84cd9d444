"""VisionZip (CVPR'25, arXiv:2412.04467): dominant tokens by [CLS] attention plus merged contextual tokens.

On the vision features the projector reads: the ``k - C`` tokens with the highest [CLS] attention are kept as they
are (dominant); the rest are merged into ``C`` contextual tokens: ``C`` targets at a uniform stride among them, and
every other remaining token joins the target whose L2-normalised key (feature layer, mean over heads) is most
similar; a target's value becomes the mean of its group. The paper splits 64 as 54 + 10, 128 as 108 + 20 and 192 as
162 + 30, i.e. ``C ≈ 10/64 · k``. Contextual tokens sit at their target's position (the official code appends them
after the dominant ones).
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl
from prunekit.budget import BudgetError
from prunekit.config import MethodConfig, StrictModel
from prunekit.interfaces import Choice, Reduction
from prunekit.planning import StagePlan, make_stages
from prunekit.ops import topk
from prunekit_plugins.methods.common import stack_choices


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
    features: Tensor, cls_attention: Tensor, keys: Tensor, k: int, ratio: float = 10 / 64, fixed: int | None = None
) -> Choice:
    """One sample: ``features [n, D]``, ``cls_attention [n]``, ``keys [n, d]``; keep ``k``, ``C`` of them merged
    (``C`` from :func:`contextual_count`). Keeping every token merges nothing."""
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    contextual = contextual_count(k, ratio, fixed)
    dominant = topk(cls_attention.float(), k - contextual)
    rest = torch.ones(n, dtype=torch.bool, device=features.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)
    step = max(1, rest.numel() // contextual)
    targets = torch.arange(0, rest.numel(), step, device=features.device)[:contextual]
    unit = torch.nn.functional.normalize(keys[rest].float(), dim=-1)
    assignment = (unit @ unit[targets].T).argmax(-1)
    assignment[targets] = torch.arange(targets.numel(), device=features.device)
    sums = torch.zeros(targets.numel(), features.shape[1], device=features.device)
    sums.index_add_(0, assignment, features[rest].float())
    sizes = torch.bincount(assignment, minlength=targets.numel())
    values = torch.cat([features[dominant], (sums / sizes[:, None]).to(features.dtype)])
    merged = torch.cat([torch.zeros(dominant.numel(), dtype=torch.bool, device=features.device), sizes > 1])
    return Choice(torch.cat([dominant, rest[targets]]), values, merged)


class VisionZipSelection(StrictModel):
    contextual_ratio: float = Field(10 / 64, gt=0.0, lt=1.0, description="C/k when contextual_tokens is None.")
    contextual_tokens: PositiveInt | None = Field(None, description="Fixed number C of contextual tokens.")


class VisionZipConfig(VisionZipSelection, MethodConfig):
    pass


class VisionZip(Method):
    name = "visionzip"
    Config = VisionZipConfig
    SelectionConfig = VisionZipSelection
    description = "Dominant tokens by [CLS] attention + contextual tokens merged by key similarity."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config

        def choose(ctx):
            cls_attn = ctx.relevance("cls_attention")
            keys = ctx.relevance("keys")
            return [visionzip_choice(f, a, kk, k, cfg.contextual_ratio, cfg.contextual_tokens)
                    for f, a, kk, k in zip(ctx.features, cls_attn, keys, ctx.keep)]

        least = 2 if cfg.contextual_tokens is None else cfg.contextual_tokens + 1
        plan = StagePlan("vision_features", choose, label="visionzip", signals=("cls_attention", "keys"))
        return make_stages(cfg, spec, [plan], minimum=lambda n: least, method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: VisionZipSelection) -> Reduction:
        """Model-free: ``relevance`` is the [CLS] attention; the features double as keys."""
        if relevance is None:
            raise ValueError("visionzip needs the [CLS] attention: pass relevance=[B, N]")
        return stack_choices([visionzip_choice(f, r, f, k, config.contextual_ratio, config.contextual_tokens)
                              for f, r in zip(features, relevance)], features)


@hookimpl
def prunekit_register_methods(register):
    register(VisionZip)
