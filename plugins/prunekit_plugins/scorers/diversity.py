"""Semantic diversity: cosine distance of a token to its nearest chosen token."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.plugin import Scorer, ScorerRun, SelectionInput, hookimpl


class _DiversityRun(ScorerRun):
    def __init__(self, inputs: SelectionInput) -> None:
        self.inputs = inputs
        self.best: Tensor | None = None  # m_j: max similarity of token j to the chosen set

    def gains(self) -> Tensor:
        if self.best is None:  # nothing chosen: every token is equally far from the (empty) set
            return torch.ones_like(self.inputs.features[..., 0])
        return 1.0 - self.best

    def update(self, picked: Tensor) -> None:
        column = self.inputs.similarity_to(picked)
        self.best = column if self.best is None else torch.maximum(self.best, column)


class SemanticDiversity(Scorer):
    """``d_i = 1 − max_{s∈S} F_is``. Greedy argmax of this alone is DivPrune's max-min rule."""

    name = "diversity"

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _DiversityRun(inputs)


@hookimpl
def prunekit_register_scorers(register):
    register(SemanticDiversity)
