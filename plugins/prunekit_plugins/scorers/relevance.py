"""Task relevance: the externally supplied relevance of each token (e.g. [CLS] or text-rater attention)."""

from __future__ import annotations

from torch import Tensor

from prunekit.plugin import FusedTerm, Scorer, ScorerRun, SelectionInput, hookimpl, same_buffer


class _Constant(ScorerRun):
    def __init__(self, values: Tensor) -> None:
        self._values = values
        self._written: Tensor | None = None

    def gains(self) -> Tensor:
        return self._values

    def gains_into(self, out: Tensor) -> None:
        # constant gains: a selector passes the same buffer at every step, so one copy is enough
        if not same_buffer(self._written, out):
            out.copy_(self._values)
            self._written = out

    def fused(self) -> FusedTerm:
        return FusedTerm("constant")


class Relevance(Scorer):
    """``r_i``: set-independent; the signal itself comes from the insertion point (see the method's config)."""

    name = "relevance"
    capturable = True
    requires_relevance = True

    def start(self, inputs: SelectionInput) -> ScorerRun:
        if inputs.relevance is None:
            raise ValueError("the 'relevance' scorer needs relevance scores ([B, N]); none were given")
        return _Constant(inputs.relevance)


@hookimpl
def prunekit_register_scorers(register):
    register(Relevance)
