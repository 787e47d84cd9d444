"""DART (EMNLP'25, arXiv:2502.11494): keep the visual tokens that duplicate the pivots least.

As the official code does it, between decoder layers K-1 and K: the pivots are the ``image_pivots`` visual tokens
and ``text_pivots`` tokens after the image whose layer K-1 keys (after the rotary embedding, all heads side by
side) have the largest L1 norm. The visual pivots are kept. Pivots are visited in the order of a Python set of
their sequence positions (the official loop iterates ``set(image_pivots + text_pivots)``); each claims the
``⌊r/P⌋`` not yet claimed, non-pivot visual tokens least cosine-similar to it, on the layer K-1 output passed
through the language model's final norm (``P`` pivots, ``r`` the budget left after the visual pivots). For a
budget "B" the official code keeps ``P·(B // P) + image_pivots`` tokens (132 for 128), and so does prunekit's
nominal budget (the default); with ``budget_meaning="layer_average"`` or an explicit ``schedule`` the stage keeps
exactly its count and any remainder of ``r`` goes to the tokens least similar to their most similar pivot. The
kept tokens keep their original positions.
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor

from prunekit.plugin import (
    Method,
    ModelSpec,
    Stage,
    StagePlan,
    StrictModel,
    check_layers,
    cosine,
    hookimpl,
    make_stages,
    topk,
    true_indices,
)
from prunekit_plugins.methods.common import OriginalPositionsConfig


def _largest(norms: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest norms, largest first (``torch.topk``'s order)."""
    return torch.sort(norms.float(), descending=True, stable=True).indices[:k]


def dart_select(
    features: Tensor, visual_key_norms: Tensor, k: int, text_states: Tensor | None = None,
    text_key_norms: Tensor | None = None, image_pivots: int = 4, text_pivots: int = 4,
    visual_positions: Tensor | None = None, text_positions: Tensor | None = None,
) -> Tensor:
    """DART's rule for one sample: ``features [n, D]``, key norms ``[n]`` (and the text's), budget ``k``.
    With sequence positions, pivots are visited in the official (Python set) order; without, visual pivots then
    text pivots, each by descending key norm."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    p_img = min(image_pivots, k)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    img = _largest(visual_key_norms, p_img)
    chosen[img] = True
    # the pivots' features (visual pivots, then text pivots, each by descending norm) and sequence positions
    rows, positions = [features[img]], [visual_positions[img] if visual_positions is not None else None]
    if text_states is not None and text_states.shape[0] and text_pivots:
        txt = _largest(text_key_norms, min(text_pivots, text_states.shape[0]))
        rows.append(text_states[txt])
        positions.append(text_positions[txt] if text_positions is not None else None)
    pivots = torch.cat(rows)
    if pivots.shape[0] == 0:
        return topk(visual_key_norms.float(), k)
    if all(p is not None for p in positions):
        # the official loop visits set(image pivots + text pivots), each list by descending norm: the Python set's
        # order of the positions, so they reach the host (all of the sample's in one read). The set is built
        # from the list, as the official one is (one built from a dict is sized up front: another order)
        at_host = torch.cat(positions).tolist()
        last = {p: i for i, p in enumerate(at_host)}  # a position's pivot: the last one there, as a dict keeps it
        pivots = torch.stack([pivots[last[p]] for p in set(at_host)])
    sim = cosine(pivots, features)  # [P, n]
    quota = (k - p_img) // pivots.shape[0]
    for p in range(pivots.shape[0]):
        if quota == 0:
            break
        score = (-sim[p]).masked_fill(chosen, float("-inf"))
        chosen[topk(score, quota)] = True
    # counted on the host: each pivot claimed ``quota`` tokens not chosen before (k < n leaves more than enough, and
    # only the chosen ones score -inf), so k - p_img - P·quota are left to fill, and then k are chosen
    left = k - p_img - quota * pivots.shape[0]
    if left:
        score = (-sim.amax(0)).masked_fill(chosen, float("-inf"))
        chosen[topk(score, left)] = True
    return true_indices(chosen, k)


def official_count(n: int, budget: float, config: "DartSelection") -> list[int]:
    """The official code's count for a budget ``B``: each of the ``P`` pivots claims ``B // P`` tokens, and the
    visual pivots are kept on top. A budget that covers every token keeps every token (``keep_ratio=1.0`` prunes
    nothing, where the official count could fall one pivot group short of ``n``)."""
    pivots = config.image_pivots + config.text_pivots
    b = int(budget + 0.5)  # keep_ratio x tokens is fractional: the nearest count
    if b >= n:
        return [n]
    return [pivots * (b // pivots) + config.image_pivots if pivots else b]


class DartSelection(StrictModel):
    image_pivots: NonNegativeInt = Field(4, description="Visual pivots (largest key L1 norm), kept.")
    text_pivots: NonNegativeInt = Field(4, description="Instruction pivots (largest key L1 norm).")


class DartConfig(DartSelection, OriginalPositionsConfig):
    layer: PositiveInt = Field(2, description="K: first decoder layer that sees the pruned tokens (paper: 2).")
    official_signals: bool = Field(
        True, description="Keys after the rotary embedding and final-normed states, as the official code; False: "
        "keys before the rotary embedding and raw layer outputs (prunekit's earlier reading of the paper).")


class Dart(Method):
    name = "dart"
    Config = DartConfig
    SelectionConfig = DartSelection
    description = "Pivot tokens by key norm; keep the visual tokens least similar to the pivots."
    relevance_input = "the visual tokens' key norms (its pivots are picked by key norm)"

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor, k: int, config: DartSelection,
             text_states: Tensor | None = None, text_key_norms: Tensor | None = None,
             visual_positions: Tensor | None = None, text_positions: Tensor | None = None) -> Tensor:
        """``relevance``: the visual tokens' key norms. The text pivots come from ``text_states`` (none model-free)."""
        return dart_select(features, relevance, k, text_states, text_key_norms, config.image_pivots,
                           config.text_pivots if text_states is not None else 0, visual_positions, text_positions)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layer = check_layers([cfg.layer], spec.num_layers, "layer")[0]

        official = cfg.official_signals

        def key_norms(tokens: str):
            return lambda ctx: [k.float().abs().sum(-1) for k in ctx.relevance("keys", tokens=tokens, rope=official)]

        choose = self.chooser(
            key_norms("visual"),
            features=lambda ctx: ctx.relevance("states", tokens="visual", final_norm=official),
            text_states=lambda ctx: ctx.relevance("states", tokens="text", final_norm=official),
            text_key_norms=key_norms("text"),
            visual_positions=lambda ctx: ctx.relevance("positions", tokens="visual"),
            text_positions=lambda ctx: ctx.relevance("positions", tokens="text"),
        )

        plan = StagePlan("decoder_layer", choose, layer, label=f"dart (layer {layer})",
                         signals=("keys", "states", "positions"))
        return make_stages(cfg, spec, [plan], method=self.name, nominal=partial(official_count, config=cfg))


@hookimpl
def prunekit_register_methods(register):
    register(Dart)
