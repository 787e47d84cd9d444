"""Adapter for ``InternVLForConditionalGeneration`` (InternVL3-8B in the TOPS paper, ``OpenGVLab/InternVL3-8B-hf``).

Each image is split into 448×448 tiles (plus a thumbnail); InternViT encodes each tile with a [CLS] token, and a
pixel shuffle folds every 2×2 group of patches into one token: 256 tokens per tile. The [CLS] attention of a
token is the mean over its four patches; the grouping is taken from the model's own ``pixel_shuffle`` run on
patch indices, so it follows transformers exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit import PruningError
from prunekit.plugin import MultimodalAdapter, VisualHooks, hookimpl
from prunekit_plugins.adapters.llava import _feature_layer_index


class InternVLAdapter(MultimodalAdapter):
    name = "internvl"
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    encoder_methods = (C.ENCODE_IMAGES.path,)
    insertion_points = frozenset({"vision_features", "after_projector", "decoder_layer"})
    contracts = (C.VISION_TOWER, C.PIXEL_SHUFFLE)

    def has_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"

    def visual_tokens_per_image(self) -> int | None:
        return self.model.config.image_seq_length  # per tile

    def feature_attention_module(self):
        if not self.has_cls():
            return None
        layers = C.VISION_TOWER.get(self.inner).encoder.layer
        return layers[_feature_layer_index(self.model.config.vision_feature_layer, len(layers))].attention

    def vision_layer(self, offset: int = 0):
        if not self.has_cls():
            return None
        layers = C.VISION_TOWER.get(self.inner).encoder.layer
        i = _feature_layer_index(self.model.config.vision_feature_layer, len(layers)) + offset
        return (layers[i], layers[i].layernorm_before, layers[i].attention) if 0 <= i < len(layers) else None

    def cls_feature_unavailable(self) -> str | None:
        return ("its projector reads pixel-shuffled groups of patch features, and the [CLS] token's feature is in "
                "none of them")

    def _side(self) -> int:
        v = self.model.config.vision_config
        size, patch = v.image_size, v.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return size // patch

    def token_sources(self, hooks: VisualHooks, visual_counts: list[int], num_patches: int) -> list[Tensor]:
        side = self._side()
        if num_patches % (side * side):
            raise PruningError(f"recorded {num_patches} patches, not a whole number of {side}×{side} tiles")
        tiles = num_patches // (side * side)
        index = torch.arange(num_patches, dtype=torch.float64).view(tiles, side, side, 1)
        shuffled = C.PIXEL_SHUFFLE.get(self.inner)(index, scale_factor=self.model.config.downsample_ratio)
        flat = shuffled.reshape(-1, shuffled.shape[-1]).long()  # [tokens, 4]
        if flat.shape[0] != sum(visual_counts):
            raise PruningError(f"{tiles} tiles give {flat.shape[0]} tokens but the prompt holds {sum(visual_counts)}")
        return list(flat.split(visual_counts))

    def feature_sources(self, hooks: VisualHooks, visual_counts: list[int], num_rows: int) -> list[Tensor]:
        if num_rows != sum(visual_counts):  # the projector reads one pixel-shuffled row per token
            raise PruningError(f"the projector read {num_rows} rows for {sum(visual_counts)} image tokens")
        return list(torch.arange(num_rows).split(visual_counts))

    def grids(self, hooks: VisualHooks, visual_counts: list[int]):
        return self.square_grids(visual_counts, self.model.config.image_seq_length)

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        config = InternVLConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=[16, 16], patch_size=[2, 2]),
            text_config=cls.tiny_text_config("qwen2", num_layers),
            image_token_id=120, image_seq_length=16,
        )
        torch.manual_seed(seed)
        return InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one image of one tile; row 1: two images of two and one tiles."""
        from prunekit.testing import prompt_ids

        cfg = model.config
        rows = []
        for b, tiles in enumerate(([1], [2, 1])):
            g = torch.Generator().manual_seed(b + 1)
            pixels = torch.randn(sum(tiles), 3, 16, 16, generator=g)
            ids = prompt_ids(model, [t * cfg.image_seq_length for t in tiles], cfg.image_token_id, question=(5 + b, 6, 7))
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(InternVLAdapter)
