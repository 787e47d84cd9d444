"""Isolation: how far a token is from its nearest neighbour (DivPrune's first pick)."""

from __future__ import annotations

import torch

from prunekit.plugin import Scorer, ScorerRun, SelectionInput, hookimpl
from prunekit_plugins.scorers.relevance import _Constant


class Isolation(Scorer):
    """``1 − max_{j≠i} F_ij``: the cosine distance of token ``i`` to its nearest other token. Set-independent.

    Read a block of rows of F at a time (:meth:`SelectionInput.block_rows`), so it holds no N×N matrix of its own."""

    name = "isolation"
    capturable = True

    def start(self, inputs: SelectionInput) -> ScorerRun:
        B, N = inputs.batch_size, inputs.num_tokens
        nearest = torch.empty(B, N, dtype=inputs.features.dtype, device=inputs.features.device)
        step = inputs.block_rows(8 + 2 * inputs.features.element_size())  # rows as made, and a copy
        for start in range(0, N, step):
            end = min(N, start + step)
            rows = inputs.similarity_block(start, end)
            rows = rows if inputs.streamed else rows.clone()  # a held matrix's rows are a view: leave F alone
            rows.diagonal(offset=start, dim1=-2, dim2=-1).fill_(float("-inf"))  # F[i, i] is not a neighbour
            nearest[:, start:end] = rows.amax(-1)
            del rows  # before the next block is made: one block at a time
        return _Constant(1.0 - nearest)


@hookimpl
def prunekit_register_scorers(register):
    register(Isolation)
