"""SCOPE (NeurIPS'25): greedy saliency × coverage on the vision features.

Each step picks the token maximising ``coverage_gain(i) · cls_attention(i)^α``, where the coverage gain is the
facility-location gain ``Σ_j max(0, sim(j, i) − m_j)`` of the cosine similarity (``m_j``: best similarity of ``j`` to the
chosen set, never below 0: the official running maximum starts from zeros). It is TOPS's greedy engine with the
shared scorers combined by product instead of a weighted sum.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from prunekit.plugin import (
    Method,
    MethodConfig,
    ModelSpec,
    SelectionInput,
    Selector,
    Stage,
    StagePlan,
    StrictModel,
    hookimpl,
    make_stages,
    registry,
)


class ScopeSelection(StrictModel):
    alpha: float = Field(1.0, ge=0.0, description="α, exponent of the saliency ([CLS] attention).")

    def selector(self) -> Selector:
        """The registered ``greedy`` selector, coverage gain × saliency^α."""
        coverage = registry.get("scorers", "facility_location")(floor=0.0)  # SCOPE's running maximum starts at 0
        saliency = registry.get("scorers", "relevance")()
        return registry.get("selectors", "greedy")([(coverage, 1.0), (saliency, self.alpha)], combine="product",
                                                   normalize="none")


class ScopeConfig(ScopeSelection, MethodConfig):
    pass


class Scope(Method):
    name = "scope"
    Config = ScopeConfig
    SelectionConfig = ScopeSelection
    description = "Greedy coverage gain × [CLS]-attention saliency^α."
    #: the official code selects in every crop alone, int(T / crops) tokens each (clip_encoder.py L120-129)
    official_budget_per = "crop"
    relevance_input = "the saliency ([CLS] attention)"

    @classmethod
    def batch_rule(cls, inputs: SelectionInput, k: int, config: ScopeSelection) -> Tensor:
        return config.selector().select(inputs, k)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        self.config.selector()  # a selector or scorer plugin that is not registered fails here, at build
        choose = self.chooser(lambda ctx: ctx.relevance("cls_attention"))
        plan = StagePlan("vision_features", choose, label="scope", signals=("cls_attention",))
        return make_stages(self.config, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(Scope)
