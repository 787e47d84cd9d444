"""Isolation: how far a token is from its nearest neighbour (DivPrune's first pick)."""

from __future__ import annotations

import torch

from prunekit import Scorer, ScorerRun, SelectionInput, hookimpl
from prunekit_plugins.scorers.relevance import _Constant


class Isolation(Scorer):
    """``1 − max_{j≠i} F_ij``: the cosine distance of token ``i`` to its nearest other token. Set-independent."""

    name = "isolation"

    def start(self, inputs: SelectionInput) -> ScorerRun:
        sim = inputs.similarity
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        return _Constant(1.0 - sim.masked_fill(eye, float("-inf")).amax(-1))


@hookimpl
def prunekit_register_scorers(register):
    register(Isolation)
