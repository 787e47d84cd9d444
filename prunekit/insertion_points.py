"""The insertion points: the three places in a decoder-only multimodal model where prunekit's runtime prunes.

They are defined here, in the library, and are not a plugin kind: each describes what the runtime and the adapter
base classes implement (where the sequence is cut, what the stage's features are, which signals are computed
there), so a point registered from outside could be named by a method but never run. An adapter offers a subset
(``ModelAdapter.insertion_points``); a method's stages name them; ``build`` checks a stage against its point (a
decoder layer where one is needed, only the signals offered there). ``prunekit.list_insertion_points()`` lists
them, and the registry answers for them under the kind ``"insertion_points"`` like for any other kind.
"""

from __future__ import annotations

from .interfaces import InsertionPoint


#: the signals offered before the language model (vision_features and after_projector alike) ...
BEFORE_LLM_SIGNALS = frozenset({"cls_attention", "keys", "text_embeddings", "text_similarity", "attention_received",
                                "cls_feature"})
#: ... of which these read the question (a server that caches encoder outputs per image cannot serve them)
QUERY_SIGNALS = frozenset({"text_embeddings", "text_similarity"})


class VisionFeatures(InsertionPoint):
    name = "vision_features"
    description = (
        "On the vision encoder's output, before the projector: features are the vision features the projector "
        "reads; merged values are projected by the model's own projector; dropped tokens leave the LLM's input. "
        "Signals: cls_attention ([CLS] to each patch at the feature layer, mean over heads; heads=one: all heads "
        "as one head over the whole width), keys (that layer's keys, mean over heads, or heads=one: the whole "
        "width), text_embeddings (the LLM input embeddings of the text after the image), "
        "text_similarity (each visual token's mean cosine similarity to those text embeddings, at the LLM input; "
        "needs no [CLS]), attention_received (the mean attention each patch receives from the other patches at "
        "the feature layer, mean over heads; needs no [CLS]), cls_feature (per token, the [CLS] row of the "
        "feature layer's output for the image or crop the token comes from, in the projector's input space). "
        "cls_attention, keys and attention_received take layer=feature|next|last: next reads the encoder layer "
        "after the feature layer (its norm and q/k on the feature layer's output), last the encoder's last layer "
        "(the feature layer or the next one)."
    )
    signals = BEFORE_LLM_SIGNALS
    query_signals = QUERY_SIGNALS


class AfterProjector(InsertionPoint):
    name = "after_projector"
    description = (
        "After the multimodal projector, before the language model: visual tokens are removed from the LLM's input "
        "sequence. Features: projected visual tokens. Signals as at vision_features."
    )
    signals = BEFORE_LLM_SIGNALS
    query_signals = QUERY_SIGNALS


class DecoderLayer(InsertionPoint):
    name = "decoder_layer"
    description = (
        "Between two decoder layers: visual rows are removed from the hidden states before layer K; features are "
        "layer K-1's output. Signals (recomputed for the needed rows, no eager switch): text_attention "
        "(raters=last_token|all_text, mean over heads and raters, or per_rater=True: one column per rater; "
        "layer=previous: K-1's attention on its input, next: K's on its input), keys (tokens=visual|text; rope=True: "
        "after the rotary embedding), states (tokens=visual|text; final_norm=True: through the final norm), "
        "positions (tokens=visual|text: sequence positions), text_states, layer_input (tokens=visual|text, for the "
        "whole prompt: the input of layer=first (the LLM's input embeddings), previous (K-1) or next (K); "
        "input_norm=True: through that layer's input norm)."
    )
    signals = frozenset({"text_attention", "keys", "states", "positions", "text_states", "layer_input"})
    needs_layer = True


#: every insertion point, by name
INSERTION_POINTS: dict[str, type[InsertionPoint]] = {
    cls.name: cls for cls in (VisionFeatures, AfterProjector, DecoderLayer)
}
