"""Information coverage: the marginal gain of the facility-location function on cosine similarity."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import Scorer, ScorerRun, SelectionInput, hookimpl
from prunekit.interfaces import max_similarity_to_set


class _FacilityLocationRun(ScorerRun):
    def __init__(self, similarity: Tensor) -> None:
        self.sim = similarity  # [B, N, N]
        self.best: Tensor | None = None  # m_j: max similarity of token j to the chosen set
        self.chosen = torch.zeros(similarity.shape[:2], dtype=torch.bool, device=similarity.device)

    def gains(self) -> Tensor:
        # c_i = sum over unchosen j of max(0, F[i, j] - m_j); with nothing chosen yet m = 0.
        baseline = torch.zeros_like(self.sim[:, 0]) if self.best is None else self.best
        excess = (self.sim - baseline[:, None, :]).clamp_min(0)
        return (excess * (~self.chosen)[:, None, :]).sum(-1)

    def update(self, picked: Tensor) -> None:
        self.best = max_similarity_to_set(self.sim, self.best, picked)
        self.chosen[torch.arange(picked.shape[0], device=picked.device), picked] = True


class FacilityLocationCoverage(Scorer):
    """``c_i = Σ_{j∉S} max(0, F_ij − m_j)``, ``m_j = max_{s∈S} F_js``: how much new content token ``i`` covers."""

    name = "facility_location"

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _FacilityLocationRun(inputs.similarity)


@hookimpl
def prunekit_register_scorers(register):
    register(FacilityLocationCoverage)
