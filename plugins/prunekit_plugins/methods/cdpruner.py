"""CDPruner (NeurIPS'25, arXiv:2506.10967): conditional diversity by a DPP over the projected visual tokens.

The kernel is ``L = diag(r)·S·diag(r)``: ``S`` the cosine similarity of the projected tokens, ``r`` their relevance to
the instruction; the kept set is the DPP's greedy MAP (selector ``dpp``, O(k²·N)), in sequence order. As in the
official code (Theia-4869/CDPruner, ``llava_arch.py``), ``r`` is the *negated* image–text similarity, min-max
normalised as ``(r − min + 1e-6) / (max − min)``; ``negate_relevance=False`` takes the paper's sign instead.
LLaVA has no CLIP text tower, so the similarity comes from a registered scorer: by default ``query_similarity``, the
mean cosine between each visual token and the instruction's language-model input embeddings (the space the
projector maps into). Any scorer can be named instead; ``relevance_scorer="relevance"`` with
``prunekit.select(..., relevance=...)`` takes a similarity you computed yourself (e.g. with a CLIP text model).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from prunekit.plugin import (
    Method,
    MethodConfig,
    ModelSpec,
    SelectionInput,
    Stage,
    StagePlan,
    StrictModel,
    hookimpl,
    make_stages,
    registered_name,
    registry,
)


class CDPrunerSelection(StrictModel):
    relevance_scorer: str = Field(
        "query_similarity", description="Registered scorer giving r (needs the instruction when it reads a query)."
    )
    negate_relevance: bool = Field(
        True, description="Negate the similarity before normalising it, as the official code does; False: the "
        "paper's sign (the tokens most similar to the instruction are the most relevant)."
    )
    theta: float | None = Field(
        None, gt=0.0, lt=1.0, description="The official code's optional relevance weight (commented out there): "
        "r ← exp(θ/(2(1−θ))·r); None: off, as by default there."
    )

    @field_validator("relevance_scorer")
    @classmethod
    def _registered(cls, v):
        return registered_name("scorers", v)

    def relevance(self, inputs: SelectionInput) -> Tensor:
        r = registry.get("scorers", self.relevance_scorer)().start(inputs).gains()
        r = -r if self.negate_relevance else r
        lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
        # the official normalisation; a constant row (a division by zero there) becomes all ones
        r = torch.where(hi > lo, (r - lo + 1e-6) / (hi - lo).clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
        return r if self.theta is None else torch.exp(self.theta / (2 * (1 - self.theta)) * r)


class CDPrunerConfig(CDPrunerSelection, MethodConfig):
    pass


class CDPruner(Method):
    name = "cdpruner"
    Config = CDPrunerConfig
    SelectionConfig = CDPrunerSelection
    description = "DPP greedy MAP over cosine similarity weighted by instruction relevance."
    #: the official code keeps `visual_token_num` tokens of every crop (llava_arch.py L141-187)
    official_budget_per = "crop"

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        registry.get("selectors", "dpp")  # a selector plugin that is not registered fails here, at build
        scorer = registry.get("scorers", cfg.relevance_scorer)
        needs_query = scorer.requires_query
        if scorer.requires_relevance:
            raise ValueError(
                f"relevance_scorer={cfg.relevance_scorer!r} reads an external relevance vector, which a model does not "
                "give CDPruner; use it with prunekit.select(..., relevance=...)"
            )

        choose = self.chooser(query=(lambda ctx: ctx.relevance("text_embeddings")) if needs_query else None)
        plan = StagePlan("after_projector", choose, label="cdpruner",
                         signals=("text_embeddings",) if needs_query else ())
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def batch_rule(cls, inputs: SelectionInput, k: int, config: CDPrunerSelection) -> Tensor:
        """The registered ``dpp`` selector, its relevance the normalised scorer gains."""
        dpp = registry.get("selectors", "dpp")()
        return dpp.select(SelectionInput(inputs.features, config.relevance(inputs)), k)

    @classmethod
    def check_selection(cls, relevance: Tensor | None, query: Tensor | None, config: CDPrunerSelection) -> None:
        scorer = registry.get("scorers", config.relevance_scorer)
        if scorer.requires_query and query is None:
            raise ValueError(f"cdpruner's relevance scorer {config.relevance_scorer!r} needs query=[B, Q, D]")
        if scorer.requires_relevance and relevance is None:
            raise ValueError(f"cdpruner's relevance scorer {config.relevance_scorer!r} needs relevance=[B, N]")

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: CDPrunerSelection,
               query: Tensor | None = None) -> Tensor:
        """Model-free, with the instruction as ``query`` where the relevance scorer reads one."""
        cls.check_selection(relevance, query, config)
        return cls.apply_rule(features, relevance, k, config, query=query)


@hookimpl
def prunekit_register_methods(register):
    register(CDPruner)
