"""Adapter for ``Qwen2VLForConditionalGeneration`` (Qwen2-VL): dynamic resolution, 2×2 patch merger, M-RoPE.

Images and videos are encoded at their own resolution; every 2×2 group of patches is merged into one visual token,
so token counts differ per image. Position ids are M-RoPE: three rows (time, height, width) per token, computed
by the model for the unpruned sequence. Pruned tokens keep those original positions (``positions="auto"``):
renumbering would put the kept patches at grid places they do not have. Decode steps keep the unpruned
coordinates that ``generate`` (and the model's ``rope_deltas``) use, so nothing shifts after pruning.

The vision encoder has no [CLS] token; methods that need ``cls_attention`` raise. TOPS uses
``text_similarity`` for its stage-I relevance here (see the TOPS page).
"""

from __future__ import annotations

import torch

from prunekit import contracts as C
from prunekit.plugin import MultimodalAdapter, VisualHooks, hookimpl

GRID_ARGUMENT = {C.ENCODE_IMAGES.path: C.ARG_IMAGE_GRID, C.ENCODE_VIDEOS.path: C.ARG_VIDEO_GRID}


class Qwen2VLAdapter(MultimodalAdapter):
    name = "qwen2_vl"
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    rope = "mrope"
    contracts = (C.ARG_IMAGE_GRID, C.ARG_VIDEO_GRID, C.MODEL_PIXEL_VALUES, C.MODEL_PIXEL_VALUES_VIDEOS)
    #: tiny prompts put each video frame in its own group (Qwen3-VL's layout)
    frames_apart = False

    def grids(self, hooks: VisualHooks, visual_counts: list[int]):
        """Per sample, the merged (rows, cols) grid of each image; None for samples with video frames."""
        merge = self.model.config.vision_config.spatial_merge_size
        items = []  # (tokens, grid or None) in encoding order (images, then videos)
        for name, args in hooks.records:
            for t, h, w in torch.as_tensor(GRID_ARGUMENT[name].get(args)).reshape(-1, 3).tolist():
                grid = (h // merge, w // merge)
                items.append((t * grid[0] * grid[1], grid if t == 1 and name == C.ENCODE_IMAGES.path else None))
        out, i = [], 0
        for n in visual_counts:
            grids, total = [], 0
            while total < n and i < len(items):
                grids.append(items[i][1])
                total += items[i][0]
                i += 1
            out.append(grids if total == n and all(g is not None for g in grids) else None)
        return out

    @classmethod
    def _config(cls, num_layers: int):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2),
            text_config=cls._text_config(num_layers),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        )

    @classmethod
    def _text_config(cls, num_layers: int) -> dict:
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        return cls.tiny_text_config(None, num_layers, rope_parameters=rope)

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        import transformers

        config = cls._config(num_layers)
        model_class = getattr(transformers, cls.model_classes[0])
        torch.manual_seed(seed)
        return model_class._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one 8×12-patch image; row 1: two images (12×12 and 4×4 patches); row 2: a 4-frame video."""
        cfg = model.config
        v = cfg.vision_config
        merge, tp, p = v.spatial_merge_size, v.temporal_patch_size, v.patch_size
        pixels_per_patch = v.in_channels * tp * p * p
        rows = []
        for b, (kind, grids) in enumerate((("image", [(1, 8, 12)]), ("image", [(1, 12, 12), (1, 4, 4)]),
                                           ("video", [(2, 8, 8)]))):
            g = torch.Generator().manual_seed(b + 1)
            thw = torch.tensor(grids)
            pixels = torch.randn(int(thw.prod(1).sum()), pixels_per_patch, generator=g)
            token = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids = [3, 4]
            for t, h, w in grids:
                # Qwen3-VL places each video frame apart, after a timestamp (one text token here)
                groups = [(1, [9])] * t if kind == "video" and cls.frames_apart else [(t, [])]
                for frames, before in groups:
                    ids += before + [cfg.vision_start_token_id] + [token] * (frames * h * w // merge**2)
                    ids += [cfg.vision_end_token_id]
            ids = torch.tensor([ids + [5 + b, 6, 7]])
            types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
            row = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}
            if kind == "image":
                row.update(pixel_values=pixels, image_grid_thw=thw)
            else:
                row.update(pixel_values_videos=pixels, video_grid_thw=thw)
            rows.append(row)
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(Qwen2VLAdapter)
