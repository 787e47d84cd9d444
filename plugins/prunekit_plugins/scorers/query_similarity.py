"""Query similarity: how close each visual token is to the instruction (CDPruner's relevance, substituted)."""

from __future__ import annotations

import torch

from prunekit.plugin import Scorer, ScorerRun, SelectionInput, cosine, hookimpl, minmax
from prunekit_plugins.scorers.relevance import _Constant


class QuerySimilarity(Scorer):
    """``r_i = minmax_i( mean_q cos(x_i, q) )`` over the query tokens ``q`` (``inputs.query``, ``[B, Q, D]``).

    In a model the query is the instruction's language-model input embeddings, which live in the same space as
    the projected visual tokens. With no query tokens every token is equally relevant (all ones).
    """

    name = "query_similarity"
    requires_query = True

    def start(self, inputs: SelectionInput) -> ScorerRun:
        if inputs.query is None:
            raise ValueError("the 'query_similarity' scorer needs query tokens ([B, Q, D]); none were given")
        if inputs.query.shape[1] == 0:
            return _Constant(torch.ones_like(inputs.features[..., 0]))
        return _Constant(minmax(cosine(inputs.features, inputs.query).mean(-1)))


@hookimpl
def prunekit_register_scorers(register):
    register(QuerySimilarity)
