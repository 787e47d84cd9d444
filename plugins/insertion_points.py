"""The two insertion points every decoder-only multimodal model has."""

from __future__ import annotations

from prunekit import InsertionPoint, hookimpl


class AfterProjector(InsertionPoint):
    name = "after_projector"
    description = (
        "After the multimodal projector, before the language model: visual tokens are removed from the LLM's input "
        "sequence. Features: projected visual tokens."
    )
    signals = frozenset({"cls_attention"})


class DecoderLayer(InsertionPoint):
    name = "decoder_layer"
    description = (
        "Between two decoder layers: visual rows are removed from the hidden states before layer K; features are "
        "layer K-1's output and attention is layer K-1's, recomputed for the needed query rows (no eager switch)."
    )
    signals = frozenset({"text_attention"})
    needs_layer = True


@hookimpl
def prunekit_register_insertion_points(register):
    register(AfterProjector)
    register(DecoderLayer)
