"""Analytic prefill FLOPs of a language model's decoder layers, from the visual-token count each layer sees.

A decoder layer with ``s`` tokens in its sequence costs ``2·s·W`` FLOPs in its linear maps (``W``: the
multiply-accumulates one token needs in every ``nn.Linear`` of the layer) and ``4·w·s²`` in attention (scores and
weighted values, ``w`` = heads × head width), counted dense as the attention kernels compute it and as
``torch.utils.flop_counter`` and the FastV paper count it. The vision encoder and
the output head are the same with and without pruning and are not counted. A mixture-of-experts layer is counted as
if every expert ran (an upper bound). ``prunekit bench`` measures FLOPs by counting the operations that run; this is
the closed form a report can give for every prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import contracts as C


@dataclass(frozen=True)
class LayerCost:
    """What one decoder layer costs per token (``weights``) and per query-key pair (``attention_width``)."""

    weights: int
    attention_width: int

    def flops(self, tokens: int) -> int:
        """FLOPs of this layer's prefill over a sequence of ``tokens``."""
        return 2 * tokens * self.weights + 4 * self.attention_width * tokens * tokens


def layer_cost(layer: torch.nn.Module) -> LayerCost:
    """The cost of a decoder layer, read from its linear maps and its attention's query projection."""
    weights = sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
    try:
        width = C.Q_PROJ.get(C.SELF_ATTENTION.get(layer)).out_features
    except C.ContractError:  # no separate query projection (e.g. a fused qkv): the width of its first linear map
        width = int(next(m.in_features for m in layer.modules() if isinstance(m, torch.nn.Linear)))
    return LayerCost(int(weights), int(width))


def prefill_flops(costs: Sequence[LayerCost], tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of a prefill in which decoder layer ``i`` sees ``tokens_per_layer[i]`` tokens."""
    return sum(c.flops(int(s)) for c, s in zip(costs, tokens_per_layer))
