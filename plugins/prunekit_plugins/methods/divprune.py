"""DivPrune (CVPR'25, arXiv:2503.02175): the max-min diverse subset of the projected visual tokens.

Distance is ``1 − cos``. The first token is the one whose nearest neighbour is farthest (scorer ``isolation``); each
next token maximises its distance to the nearest chosen token (scorer ``diversity``): TOPS's greedy engine with one
scorer and a seed.
"""

from __future__ import annotations

from typing import Literal

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


class DivPruneSelection(StrictModel):
    def selector(self) -> Selector:
        """The registered ``greedy`` selector on the ``diversity`` scorer alone, seeded by ``isolation``."""
        return registry.get("selectors", "greedy")([(registry.get("scorers", "diversity")(), 1.0)], normalize="none",
                                                   seed=registry.get("scorers", "isolation")())


class DivPruneConfig(DivPruneSelection, MethodConfig):
    insertion_point: Literal["after_projector", "vision_features"] = Field(
        "after_projector", description="Diversity of the projected tokens (paper) or of the vision features."
    )


class DivPrune(Method):
    name = "divprune"
    Config = DivPruneConfig
    SelectionConfig = DivPruneSelection
    description = "Greedy max-min cosine-distance subset."

    @classmethod
    def batch_rule(cls, inputs: SelectionInput, k: int, config: DivPruneSelection) -> Tensor:
        """Reads the features only (a relevance given to ``prunekit.select`` is not used)."""
        return config.selector().select(SelectionInput(inputs.features), k)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        self.config.selector()  # a selector or scorer plugin that is not registered fails here, at build
        plan = StagePlan(self.config.insertion_point, self.chooser(), label="divprune")
        return make_stages(self.config, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(DivPrune)
