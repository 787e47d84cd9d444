"""The insertion points of a decoder-only multimodal model (every adapter offers a subset)."""

from __future__ import annotations

from prunekit import InsertionPoint, hookimpl


class VisionFeatures(InsertionPoint):
    name = "vision_features"
    description = (
        "On the vision encoder's output, before the projector: features are the vision features the projector "
        "reads; merged values are projected by the model's own projector; dropped tokens leave the LLM's input. "
        "Signals: cls_attention ([CLS] to each patch at the feature layer, mean over heads), keys (that layer's "
        "keys, mean over heads), text_embeddings (the LLM input embeddings of the text after the image), "
        "text_similarity (each visual token's mean cosine similarity to those text embeddings, at the LLM input; "
        "needs no [CLS]), attention_received (the mean attention each patch receives from the other patches at "
        "the feature layer, mean over heads; needs no [CLS])."
    )
    signals = frozenset({"cls_attention", "keys", "text_embeddings", "text_similarity", "attention_received"})


class AfterProjector(InsertionPoint):
    name = "after_projector"
    description = (
        "After the multimodal projector, before the language model: visual tokens are removed from the LLM's input "
        "sequence. Features: projected visual tokens. Signals as at vision_features."
    )
    signals = frozenset({"cls_attention", "keys", "text_embeddings", "text_similarity", "attention_received"})


class DecoderLayer(InsertionPoint):
    name = "decoder_layer"
    description = (
        "Between two decoder layers: visual rows are removed from the hidden states before layer K; features are "
        "layer K-1's output. Signals (recomputed for the needed rows, no eager switch): text_attention "
        "(raters=above_mean_similarity|last_token|all_text; layer=previous: K-1's attention on its input, next: K's on its "
        "input), keys (tokens=visual|text; rope=True: after the rotary embedding), states (tokens=visual|text; "
        "final_norm=True: through the final norm), positions (tokens=visual|text: sequence positions), "
        "text_states."
    )
    signals = frozenset({"text_attention", "keys", "states", "positions", "text_states"})
    needs_layer = True


@hookimpl
def prunekit_register_insertion_points(register):
    register(VisionFeatures)
    register(AfterProjector)
    register(DecoderLayer)
