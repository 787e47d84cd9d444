"""CDPruner (NeurIPS'25, arXiv:2506.10967): conditional diversity by a DPP over the projected visual tokens.

The kernel is ``L = diag(r)·S·diag(r)``: ``S`` the cosine similarity of the projected tokens, ``r`` their relevance to
the instruction, min-max normalised; the kept set is the DPP's greedy MAP (selector ``dpp``, O(k²·N)).
LLaVA has no CLIP text tower, so relevance comes from a registered scorer: by default ``query_similarity``, the
mean cosine between each visual token and the instruction's language-model input embeddings (the space the
projector maps into). Any scorer can be named instead; ``relevance_scorer="relevance"`` with
``prunekit.select(..., relevance=...)`` takes a relevance you computed yourself (e.g. with a CLIP text model).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from torch import Tensor

from prunekit import Method, ModelSpec, Stage, hookimpl, registry
from prunekit.config import MethodConfig, StrictModel, registered_name
from prunekit.interfaces import SelectionInput
from prunekit.planning import StagePlan, make_stages
from prunekit.ops import minmax
from prunekit_plugins.selectors.dpp import DppSelector


class CDPrunerSelection(StrictModel):
    relevance_scorer: str = Field(
        "query_similarity", description="Registered scorer giving r (needs the instruction when it reads a query)."
    )
    negate_relevance: bool = Field(
        False, description="Use 1 − r (the official code negates the similarity before averaging)."
    )

    @field_validator("relevance_scorer")
    @classmethod
    def _registered(cls, v):
        return registered_name("scorers", v)

    def relevance(self, inputs: SelectionInput) -> Tensor:
        r = registry.get("scorers", self.relevance_scorer)().start(inputs).gains()
        r = minmax(r)
        return 1.0 - r if self.negate_relevance else r

    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        return DppSelector().select(SelectionInput(inputs.features, self.relevance(inputs)), k)


class CDPrunerConfig(CDPrunerSelection, MethodConfig):
    pass


class CDPruner(Method):
    name = "cdpruner"
    Config = CDPrunerConfig
    SelectionConfig = CDPrunerSelection
    description = "DPP greedy MAP over cosine similarity weighted by instruction relevance."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        scorer = registry.get("scorers", cfg.relevance_scorer)
        needs_query = scorer.requires_query
        if scorer.requires_relevance:
            raise ValueError(
                f"relevance_scorer={cfg.relevance_scorer!r} reads an external relevance vector, which a model does not "
                "give CDPruner; use it with prunekit.select(..., relevance=...)"
            )

        def choose(ctx):
            query = ctx.relevance("text_embeddings") if needs_query else None
            return ctx.select_grouped(None, cfg.select, query=query)

        plan = StagePlan("after_projector", choose, label="cdpruner",
                         signals=("text_embeddings",) if needs_query else ())
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: CDPrunerSelection,
               query: Tensor | None = None) -> Tensor:
        scorer = registry.get("scorers", config.relevance_scorer)
        if scorer.requires_query and query is None:
            raise ValueError(f"cdpruner's relevance scorer {config.relevance_scorer!r} needs query=[B, Q, D]")
        if scorer.requires_relevance and relevance is None:
            raise ValueError(f"cdpruner's relevance scorer {config.relevance_scorer!r} needs relevance=[B, N]")
        return config.select(SelectionInput(features, relevance, query), k)


@hookimpl
def prunekit_register_methods(register):
    register(CDPruner)
