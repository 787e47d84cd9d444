"""Adapter for ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6: AnyRes).

Each image becomes a base view plus a grid of crops, all encoded by a CLIP tower; crop features are unpadded to
the image's aspect ratio and a learned newline token ends every row, so up to 2,880 visual tokens (7B/13B at
672×672). Visual tokens are the image placeholders, newline tokens included: they take part in selection like
any token, with zero [CLS] attention (they come from no patch).

The [CLS] attention of every crop is mapped to the packed tokens by running the model's own
``pack_image_features`` on patch indices instead of features, so the mapping follows transformers exactly. The
same run tells each token's crop, for budgets per crop (``budget_per="crop"``: the base view and every tile are
units of their own, and the row breaks, which belong to no crop, are kept outside every budget).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit import PruningError
from prunekit.plugin import MultimodalAdapter, VisualHooks, hookimpl
from prunekit_plugins.adapters.llava import _feature_layer_index, clip_layer


class LlavaNextAdapter(MultimodalAdapter):
    name = "llava_next"
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    encoder_methods = (C.ENCODE_IMAGES.path,)
    insertion_points = frozenset({"vision_features", "after_projector", "decoder_layer"})
    contracts = (C.ARG_IMAGE_SIZES, C.PACK_IMAGE_FEATURES, C.NEXT_NUM_PATCHES, C.VISION_TOWER)
    budget_units = frozenset({"prompt", "image", "crop"})

    def has_cls(self) -> bool:
        cfg = self.model.config
        return cfg.vision_config.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy == "default"

    def feature_attention_module(self):
        if not self.has_cls():
            return None
        tower = C.VISION_TOWER.get(self.inner)
        tower = getattr(tower, "vision_model", tower)
        layers = tower.encoder.layers
        return layers[_feature_layer_index(self.model.config.vision_feature_layer, len(layers))].self_attn

    def vision_layer(self, offset: int = 0):
        return clip_layer(self, offset) if self.has_cls() else None

    def _packed_patches(self, hooks: VisualHooks) -> tuple[Tensor, int, int]:
        """Each image token of the recorded encodings (in order): the index of its crop patch among all crops'
        patches, or -1 for a row break; the patches per crop; and the patches of all crops."""
        image_size_to_num_patches = C.NEXT_NUM_PATCHES.get()
        cfg = self.model.config
        sizes = [C.ARG_IMAGE_SIZES.get(r) for name, r in hooks.records if name == C.ENCODE_IMAGES.path]
        if not sizes:
            raise PruningError("LLaVA-NeXT images must be encoded by the patched model in this call")
        sizes = torch.cat([torch.as_tensor(s).reshape(-1, 2) for s in sizes])
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        index, start = [], 0
        for size in sizes:
            crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            index.append(torch.arange(start, start + crops * side * side, dtype=torch.float64).view(crops, side * side, 1))
            start += crops * side * side
        packed, _ = C.PACK_IMAGE_FEATURES.get(self.inner)(
            index, sizes, cfg.vision_feature_select_strategy, image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        return torch.cat(packed)[:, 0].long(), side * side, start

    def token_sources(self, hooks: VisualHooks, visual_counts: list[int], num_patches: int) -> list[Tensor]:
        flat, _, held = self._packed_patches(hooks)
        if held != num_patches:
            raise PruningError(f"recorded {num_patches} patches for images that hold {held}")
        if flat.shape[0] != sum(visual_counts):
            raise PruningError(f"packed {flat.shape[0]} image tokens but the prompt holds {sum(visual_counts)}")
        return list(flat[:, None].split(visual_counts))

    def image_crops(self, hooks: VisualHooks) -> tuple[Tensor, int]:
        """The base view and every tile are crops of ``side²`` patches; the row breaks belong to none."""
        flat, per_crop, _ = self._packed_patches(hooks)
        return torch.where(flat >= 0, flat.div(per_crop, rounding_mode="floor"), -1), per_crop

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=16, patch_size=4, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=2048)
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=127,
                                 image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
        torch.manual_seed(seed)
        return LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        from prunekit.testing import prompt_ids

        image_size_to_num_patches = C.NEXT_NUM_PATCHES.get()

        cfg = model.config
        rows = []
        for b, sizes in enumerate(([(16, 30)], [(32, 32), (10, 12)])):
            g = torch.Generator().manual_seed(b + 1)
            crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, 16) for s in sizes]
            pixels = torch.zeros(len(sizes), max(crops), 3, 16, 16)
            for i, c in enumerate(crops):
                pixels[i, :c] = torch.randn(c, 3, 16, 16, generator=g)
            image_sizes = torch.tensor(sizes)
            feats = C.ENCODED_TOKENS.get(model.model.get_image_features(pixels, image_sizes))
            ids = prompt_ids(model, [f.shape[0] for f in feats], cfg.image_token_id, question=(5 + b, 6, 7))
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                         "image_sizes": image_sizes})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(LlavaNextAdapter)
