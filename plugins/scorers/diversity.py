"""Semantic diversity: cosine distance of a token to its nearest chosen token."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import Scorer, ScorerRun, SelectionInput, hookimpl
from prunekit.interfaces import max_similarity_to_set


class _DiversityRun(ScorerRun):
    def __init__(self, similarity: Tensor) -> None:
        self.sim = similarity
        self.best: Tensor | None = None

    def gains(self) -> Tensor:
        if self.best is None:  # nothing chosen: every token is equally far from the (empty) set
            return torch.ones_like(self.sim[:, 0])
        return 1.0 - self.best

    def update(self, picked: Tensor) -> None:
        self.best = max_similarity_to_set(self.sim, self.best, picked)


class SemanticDiversity(Scorer):
    """``d_i = 1 − max_{s∈S} F_is``. Greedy argmax of this alone is DivPrune's max-min rule."""

    name = "diversity"

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _DiversityRun(inputs.similarity)


@hookimpl
def prunekit_register_scorers(register):
    register(SemanticDiversity)
