"""Task relevance: the externally supplied relevance of each token (e.g. [CLS] or text-rater attention)."""

from __future__ import annotations

from torch import Tensor

from prunekit.plugin import Scorer, ScorerRun, SelectionInput, hookimpl


class _Constant(ScorerRun):
    def __init__(self, values: Tensor) -> None:
        self._values = values

    def gains(self) -> Tensor:
        return self._values


class Relevance(Scorer):
    """``r_i``: set-independent; the signal itself comes from the insertion point (see the method's config)."""

    name = "relevance"
    requires_relevance = True

    def start(self, inputs: SelectionInput) -> ScorerRun:
        if inputs.relevance is None:
            raise ValueError("the 'relevance' scorer needs relevance scores ([B, N]); none were given")
        return _Constant(inputs.relevance)


@hookimpl
def prunekit_register_scorers(register):
    register(Relevance)
