"""Semantic diversity: cosine distance of a token to its nearest chosen token."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.plugin import FusedTerm, Scorer, ScorerRun, SelectionInput, hookimpl


class _DiversityRun(ScorerRun):
    def __init__(self, inputs: SelectionInput) -> None:
        self.inputs = inputs
        self.best: Tensor | None = None  # m_j: max similarity of token j to the chosen set
        self._one = torch.ones((), dtype=inputs.features.dtype)  # a host scalar: no device work

    def gains(self) -> Tensor:
        if self.best is None:  # nothing chosen: every token is equally far from the (empty) set
            return torch.ones_like(self.inputs.features[..., 0])
        return 1.0 - self.best

    def gains_into(self, out: Tensor) -> None:
        if self.best is None:
            out.fill_(1.0)
        else:  # 1 − m in m's dtype, then widened: as gains() followed by a copy, in one operation
            torch.sub(self._one, self.best, out=out)

    def update(self, picked: Tensor) -> None:
        column = self.inputs.similarity_to(picked)
        if self.best is None:
            self.best = column.clone()  # updated in place from now on; the column is shared with other scorers
        else:
            torch.maximum(self.best, column, out=self.best)

    def fused(self) -> FusedTerm | None:
        if self.best is None or self.inputs.streamed:  # a fused loop reads a held matrix
            return None
        return FusedTerm("nearest", similarity=self.inputs.similarity, best=self.best)


class SemanticDiversity(Scorer):
    """``d_i = 1 − max_{s∈S} F_is``. Greedy argmax of this alone is DivPrune's max-min rule."""

    name = "diversity"
    capturable = True

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _DiversityRun(inputs)


@hookimpl
def prunekit_register_scorers(register):
    register(SemanticDiversity)
