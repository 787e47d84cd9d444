"""Adapter for ``LlavaOnevisionForConditionalGeneration``: LLaVA-OneVision (images) and LLaVA-Video-7B (video,
``llava-hf/LLaVA-Video-7B-Qwen2-hf``), the TOPS paper's video backbone.

SigLIP encoder (no [CLS]), Qwen2 decoder. Images: AnyRes crops with newline tokens, as LLaVA-NeXT. Videos: every
frame's 27×27 patches are pooled 2×2 to 14×14 = 196 tokens (LLaVA-Video's 169 = 13×13 at 384 px / 14 px with its
own pooling; the count follows the config), then one newline token ends the video. With ``budget_per="image"``
each frame is its own budget unit (the newline joins the last frame), which is the paper's per-frame setting.
"""

from __future__ import annotations

import torch

from prunekit import contracts as C
from prunekit import PruningError
from prunekit.plugin import MultimodalAdapter, hookimpl


class LlavaOnevisionAdapter(MultimodalAdapter):
    name = "llava_onevision"
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    contracts = (C.ARG_VIDEO_PIXELS, C.ONEVISION_NUM_PATCHES, C.ONEVISION_VIDEO_NEWLINE, C.ARG_IMAGE_SIZES,
                 C.ARG_VISION_ASPECT_RATIO, C.PACK_IMAGE_FEATURES)
    budget_units = frozenset({"prompt", "image", "crop"})

    def prompt_tokens(self, encoder_method: str, arguments: dict, output) -> list[int]:
        counts = super().prompt_tokens(encoder_method, arguments, output)
        if encoder_method == C.ENCODE_VIDEOS.path and C.ONEVISION_VIDEO_NEWLINE.value == "forward":
            counts = [n + 1 for n in counts]  # the model's forward appends the newline that ends each video
        return counts

    def unit_sizes(self, encoder_method: str, arguments: dict, output) -> list[int]:
        if encoder_method != C.ENCODE_VIDEOS.path:
            return super().unit_sizes(encoder_method, arguments, output)
        frames = C.ARG_VIDEO_PIXELS.get(arguments).shape[1]
        sizes = []
        for tokens in self.prompt_tokens(encoder_method, arguments, output):
            per_frame = (tokens - 1) // frames
            sizes += [per_frame] * (frames - 1) + [tokens - per_frame * (frames - 1)]
        return sizes

    def image_crops(self, hooks) -> tuple[torch.Tensor, int]:
        """Images: the base view and every tile are crops (an image of a several-image prompt is one crop); the row
        breaks belong to none. The model's own ``pack_image_features`` runs on one-hot crop labels, so unpadding and
        the ``anyres_max`` downsizing follow transformers; a downsized token blending several crops goes to the one
        that weighs most in it (the first on a tie)."""
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        num_patches = C.ONEVISION_NUM_PATCHES.get()
        pack = C.PACK_IMAGE_FEATURES.get(self.inner)
        out, offset = [], 0
        for (name, args), counts in zip(hooks.records, hooks.units_of):
            if name != C.ENCODE_IMAGES.path:
                continue
            aspect = C.ARG_VISION_ASPECT_RATIO.get(args) or cfg.vision_aspect_ratio
            sizes = torch.as_tensor(C.ARG_IMAGE_SIZES.get(args)).reshape(-1, 2)
            for size, tokens in zip(sizes, counts):
                # split into crops, unless its prompt holds several images: the packed length tells which
                for crops in (num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size), 1):
                    labels = torch.eye(crops, dtype=torch.float64).repeat_interleave(side * side, 0)
                    packed, _ = pack([labels.view(crops, side * side, crops)], size[None],
                                     image_newline=torch.zeros(crops, dtype=torch.float64), vision_aspect_ratio=aspect)
                    if packed[0].shape[0] == tokens:
                        break
                else:
                    raise PruningError(f"cannot map the {tokens} tokens of a {tuple(size.tolist())} image to its crops")
                weight, crop = packed[0].max(1)
                out.append(torch.where(weight > 0, crop + offset, -1))
                offset += crops
        return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)), side * side

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        config = LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4),
            text_config=cls.tiny_text_config("qwen2", num_layers),
            image_token_index=120, video_token_index=121, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
            vision_feature_layer=-1,
        )
        torch.manual_seed(seed)
        return LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one image; row 1: a 3-frame video; row 2: an image and a 3-frame video (a batch's videos share
        their frame count, as the model needs)."""
        image_size_to_num_patches = C.ONEVISION_NUM_PATCHES.get()
        cfg = model.config
        g = torch.Generator().manual_seed(1)
        rows = []
        for b, (size, frames) in enumerate((((16, 30), 0), (None, 3), ((32, 32), 3))):
            ids, row = [3, 4], {}
            if size is not None:
                crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, 16)
                row["pixel_values"] = torch.randn(1, crops, 3, 16, 16, generator=g)
                row["image_sizes"] = torch.tensor([size])
                feats = model.model.get_image_features(row["pixel_values"], row["image_sizes"])
                ids += [cfg.image_token_index] * C.ENCODED_TOKENS.get(feats)[0].shape[0]
            if frames:
                row["pixel_values_videos"] = torch.randn(1, frames, 3, 16, 16, generator=g)
                encoded = model.model.get_video_features(row["pixel_values_videos"])
                n = cls(model).prompt_tokens(C.ENCODE_VIDEOS.path, {}, encoded)[0]
                ids += [cfg.video_token_index] * n
            ids = torch.tensor([ids + [5 + b, 6, 7]])
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), **row})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(LlavaOnevisionAdapter)
