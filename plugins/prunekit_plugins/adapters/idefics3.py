"""Adapter for ``Idefics3ForConditionalGeneration`` (Idefics3-8B, ``HuggingFaceM4/Idefics3-8B-Llama3``) and
``SmolVLMForConditionalGeneration`` (SmolVLM, ``HuggingFaceTB/SmolVLM-Instruct``).

SigLIP encoder (no [CLS]) on each image split plus a global view; the connector's pixel shuffle folds patches
into 64 (SmolVLM: 81) tokens per split; a Llama decoder. Padding images (all zeros) that a batch adds are dropped by
the model, and only real images' tokens are placeholders, so nothing changes for pruning.
"""

from __future__ import annotations

import torch

from prunekit import contracts as C
from prunekit.plugin import MultimodalAdapter, hookimpl


class Idefics3Adapter(MultimodalAdapter):
    name = "idefics3"
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "Idefics3Model",
                     "SmolVLMForConditionalGeneration", "SmolVLMModel")
    encoder_methods = (C.ENCODE_IMAGES.path,)

    contracts = (C.TEXT_MODEL, C.VISION_MODEL, C.CONNECTOR_PIXEL_SHUFFLE)

    def language_model(self):
        return C.TEXT_MODEL.get(self.inner)

    def feature_attention_module(self):
        return C.VISION_MODEL.get(self.inner).encoder.layers[-1].self_attn  # the connector reads the last layer

    def token_sources(self, hooks, visual_counts, num_patches):
        """The patches of each token, from the connector's own pixel shuffle run on patch indices."""
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        index = torch.arange(num_patches, dtype=torch.float64).view(-1, side * side, 1)
        groups = C.CONNECTOR_PIXEL_SHUFFLE.get(self.inner)(index, self.model.config.scale_factor)
        return list(groups.reshape(-1, groups.shape[-1]).long().split(visual_counts))

    def grids(self, hooks, visual_counts):
        cfg = self.model.config
        v = cfg.vision_config
        return self.square_grids(visual_counts, (v.image_size // v.patch_size) ** 2 // cfg.scale_factor**2)

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        config = Idefics3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=4),
            text_config=cls.tiny_text_config("llama", num_layers),
            image_token_id=120, scale_factor=2,
        )
        torch.manual_seed(seed)
        return Idefics3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one image; row 1: three images (as splits would be)."""
        from prunekit.testing import prompt_ids

        cfg = model.config
        v = cfg.vision_config
        per_image = (v.image_size // v.patch_size) ** 2 // cfg.scale_factor**2
        rows = []
        for b, images in enumerate((1, 3)):
            g = torch.Generator().manual_seed(b + 1)
            pixels = torch.randn(1, images, 3, v.image_size, v.image_size, generator=g)
            ids = prompt_ids(model, [per_image] * images, cfg.image_token_id, question=(5 + b, 6, 7))
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(Idefics3Adapter)
