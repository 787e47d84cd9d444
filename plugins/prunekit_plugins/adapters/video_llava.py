"""Adapter for ``VideoLlavaForConditionalGeneration`` (Video-LLaVA-7B, ``LanguageBind/Video-LLaVA-7B-hf``).

Separate CLIP towers for images and videos; an image gives 256 tokens, a video 8 frames × 257 (each frame keeps
its [CLS] row). [CLS]-attention signals are not wired here (the two towers and the frames' [CLS] rows would need
their own mapping), so relevance before the LLM is ``text_similarity`` and the ``vision_features`` methods are
not offered. ``budget_per="image"`` treats every frame as its own budget.
"""

from __future__ import annotations

import torch

from prunekit import contracts as C
from prunekit.plugin import MultimodalAdapter, hookimpl


class VideoLlavaAdapter(MultimodalAdapter):
    name = "video_llava"
    family = "video_llava"
    model_classes = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")
    contracts = (C.MODEL_PIXEL_VALUES_IMAGES, C.MODEL_PIXEL_VALUES_VIDEOS)

    def unit_sizes(self, encoder_method: str, arguments: dict, output) -> list[int]:
        return [int(x.shape[0]) for x in C.ENCODED_TOKENS.get(output)]  # one unit per image or per frame

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

        config = VideoLlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4,
                               projection_dim=32),
            text_config=cls.tiny_text_config("llama", num_layers),
            image_token_index=120, video_token_index=121, image_seq_length=16, video_seq_length=4 * 17,
        )
        torch.manual_seed(seed)
        return VideoLlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one image; row 1: a 4-frame video; row 2: an image and a 4-frame video."""
        cfg = model.config
        g = torch.Generator().manual_seed(1)
        per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        rows = []
        for b, (image, frames) in enumerate(((True, 0), (False, 4), (True, 4))):
            ids, row = [3, 4], {}
            if image:
                row[C.MODEL_PIXEL_VALUES_IMAGES.key] = torch.randn(1, 3, 16, 16, generator=g)
                ids += [cfg.image_token_index] * per_image
            if frames:
                row["pixel_values_videos"] = torch.randn(1, frames, 3, 16, 16, generator=g)
                ids += [cfg.video_token_index] * frames * (per_image + 1)
            ids = torch.tensor([ids + [5 + b, 6, 7]])
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), **row})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(VideoLlavaAdapter)
