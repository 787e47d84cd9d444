"""TRIM (COLING'25, arXiv:2409.10994): the visual tokens most related to the question, plus one mean token.

As the official code (FreedomIntelligence/TRIM, ``llava/model/multimodal_encoder/clip_encoder.py``) computes it, on
the vision features the projector reads: each token's similarity ``s`` to the question is turned into scores
``softmax(−s)`` over the image's tokens (the official code negates the similarity); the ``k − 1`` best-scored tokens
are kept in sequence order and every other token is averaged into one extra token, which the language model sees
after them. The official code measures ``s`` with CLIP's text tower, which a LLaVA checkpoint does not contain:
prunekit's default substitute is the ``text_similarity`` signal, each visual token's mean cosine similarity to the
instruction's input embeddings at the LLM input (as CDPruner and TOPS use for the same purpose); a similarity
computed elsewhere (e.g. with a CLIP text model) can be given to ``prunekit.select``/``reduce`` as ``relevance``.

The official code's adaptive count (the IQR outliers of the scores, ``TRIM:-1``) depends on the image; prunekit
keeps the count its budget asks for, and :func:`iqr_count` gives the official count for a model-free call
(docs/methods/trim.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from prunekit.plugin import (
    Choice,
    Method,
    MethodConfig,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    hookimpl,
    make_stages,
    topk,
    true_indices,
)


def trim_scores(similarity: Tensor, negate: bool = True) -> Tensor:
    """The official scores: ``softmax`` over the last dim of the similarity, negated first when ``negate``."""
    s = similarity if similarity.dtype == torch.float64 else similarity.float()
    return torch.softmax(-s if negate else s, dim=-1)


def iqr_count(similarity: Tensor, negate: bool = True, factor: float = 1.5) -> Tensor:
    """The official adaptive count per row of ``similarity`` (``[..., N]``): how many scores lie above
    ``Q3 + factor·IQR`` (quartiles interpolated linearly, as ``numpy.percentile``). The official code then keeps
    those tokens plus the mean token: pass ``k = iqr_count(s) + 1``."""
    scores = trim_scores(similarity, negate)
    q1, q3 = torch.quantile(scores, 0.25, dim=-1, keepdim=True), torch.quantile(scores, 0.75, dim=-1, keepdim=True)
    return (scores > q3 + factor * (q3 - q1)).sum(-1)


def trim_choice(features: Tensor, similarity: Tensor, k: int, negate: bool = True, mean_token: bool = True,
                order: str = "after") -> Choice:
    """One sample: ``features [n, D]``, ``similarity [n]``; keep ``k`` tokens: the ``k − 1`` best-scored and the
    mean of all the others (or the ``k`` best-scored when ``mean_token`` is False). Keeping every token merges
    nothing.

    The mean token needs a place among the kept ones: that of the last token it averages. ``order="after"``
    (official) fills the kept places, in sequence order, with the selected tokens and then the mean token;
    ``"last_rest"`` leaves every token at its own place."""
    n = features.shape[0]
    if k >= n:
        return Choice(torch.arange(n, device=features.device))
    scores = trim_scores(similarity, negate)
    if not mean_token:
        return Choice(topk(scores, k))
    chosen = topk(scores, k - 1)  # ascending: sequence order
    rest = torch.ones(n, dtype=torch.bool, device=features.device)
    rest[chosen] = False
    rest = true_indices(rest, n - chosen.numel())  # topk's indices are distinct: no read of their count
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    mean = features[rest].to(dtype).mean(0, keepdim=True).to(features.dtype)
    places = torch.cat([chosen, rest[-1:]])
    if order == "after":
        places = places.sort().values
    merged = torch.zeros(k, dtype=torch.bool, device=features.device)
    merged[-1] = True
    return Choice(places, torch.cat([features[chosen], mean]), merged)


class TrimSelection(StrictModel):
    negate_similarity: bool = Field(
        True, description="Score softmax(−s) as the official code does; False: softmax(s), the tokens most similar "
        "to the question first."
    )
    mean_token: bool = Field(
        True, description="Average the unselected tokens into one kept token (TRIM); False: keep the k best-scored "
        "tokens only."
    )
    mean_order: Literal["after", "last_rest"] = Field(
        "after",
        description="'after': the kept places hold the selected tokens, then the mean token (the official "
        "sequence); 'last_rest': the mean token sits at the place of the last token it averages.",
    )


class TrimConfig(TrimSelection, MethodConfig):
    similarity: Literal["text_similarity", "cls_attention", "attention_received"] = Field(
        "text_similarity",
        description="Signal standing in for CLIP's patch-question similarity: 'text_similarity' (each token's mean "
        "cosine to the instruction's input embeddings); 'cls_attention' and 'attention_received' are query-free "
        "ablations (use them with negate_similarity=False).",
    )
    insertion_point: Literal["vision_features", "after_projector"] = Field(
        "vision_features",
        description="'vision_features' (official): on the features the projector reads, the mean token projected "
        "by the model's projector; 'after_projector': on the projected tokens, for adapters without that point.",
    )


class Trim(Method):
    name = "trim"
    Config = TrimConfig
    SelectionConfig = TrimSelection
    description = "Top-k by (negated) question similarity, softmax-scored, + one mean token of the rest."
    relevance_input = "each token's similarity to the question (e.g. CLIP patch-text)"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: TrimSelection) -> Choice:
        """``relevance``: each token's similarity to the question."""
        return trim_choice(features, relevance, k, config.negate_similarity, config.mean_token, config.mean_order)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        choose = self.chooser(lambda ctx: ctx.relevance(cfg.similarity))
        plan = StagePlan(cfg.insertion_point, choose, label="trim", signals=(cfg.similarity,))
        return make_stages(cfg, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(Trim)
