"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any CLIP/SigLIP + projector + decoder LLaVA).

What is LLaVA-specific: which vision layer feeds the projector (its attention gives the [CLS] signal, read without
eager attention by the shared hooks), and that every image is one square grid of patches.
"""

from __future__ import annotations

from prunekit import contracts as C
from prunekit.plugin import MultimodalAdapter, hookimpl


def _feature_layer_index(feature_layer, num_layers: int) -> int:
    """Index of the encoder layer whose output LLaVA feeds to the projector (hidden_states[f] = layers[f-1])."""
    f = max(feature_layer) if isinstance(feature_layer, (list, tuple)) else feature_layer
    return num_layers + f if f < 0 else f - 1


def clip_layer(adapter, offset: int = 0):
    """``(layer, norm, attention)`` of the CLIP/SigLIP tower layer ``offset`` layers after LLaVA's feature layer
    (:meth:`MultimodalAdapter.vision_layer`); None past the last layer."""
    tower = C.VISION_TOWER.get(adapter.inner)
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel wraps or is the transformer
    i = _feature_layer_index(adapter.model.config.vision_feature_layer, len(layers)) + offset
    if not 0 <= i < len(layers):
        return None
    return layers[i], layers[i].layer_norm1, layers[i].self_attn


class LlavaAdapter(MultimodalAdapter):
    name = "llava"
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    insertion_points = frozenset({"vision_features", "after_projector", "decoder_layer"})

    encoder_methods = (C.ENCODE_IMAGES.path,)
    contracts = (C.VISION_TOWER,)

    def visual_tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (self.model.config.vision_feature_select_strategy == "full")

    def has_cls(self) -> bool:
        cfg = self.model.config
        return cfg.vision_config.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy == "default"

    def feature_attention_module(self):
        tower = C.VISION_TOWER.get(self.inner)
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps or is the transformer
        layers = tower.encoder.layers
        return layers[_feature_layer_index(self.model.config.vision_feature_layer, len(layers))].self_attn

    def vision_layer(self, offset: int = 0):
        return clip_layer(self, offset)

    def grids(self, hooks, visual_counts: list[int]):
        if self.model.config.vision_feature_select_strategy != "default":
            return None  # the [CLS] token sits in front of each grid
        return self.square_grids(visual_counts, self.visual_tokens_per_image())

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from prunekit.testing import tiny_llava

        return tiny_llava(seed=seed, num_layers=num_layers)

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        from prunekit.testing import tiny_llava_inputs

        rows = []
        for b, images in enumerate((1, 2)):
            x = tiny_llava_inputs(model, batch=1, left_pad=(0,), images_per_row=images, seed=b + 1)
            x["input_ids"][:, -3:] += b
            rows.append(x)
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(LlavaAdapter)
