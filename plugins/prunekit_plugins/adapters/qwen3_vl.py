"""Adapter for ``Qwen3VLForConditionalGeneration`` (Qwen3-VL, e.g. ``Qwen/Qwen3-VL-8B-Instruct``).

As Qwen2.5-VL (dynamic resolution, 2×2 merger, M-RoPE positions kept, no [CLS]), plus *deepstack*: features
from several vision layers are added to the visual tokens' hidden states after the first decoder layers
(``visual_pos_masks``, ``deepstack_visual_embeds``). Pruning before the LLM prunes those features and masks
alike; pruning inside the LLM must start above the deepstack layers (an earlier layer is refused with the
reason), where no deepstack feature is added any more.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit.plugin import VisualHooks, hookimpl
from prunekit_plugins.adapters.qwen2_vl import Qwen2VLAdapter


class _DeepstackHooks(VisualHooks):
    def prune_inputs(self, kwargs: dict, kept: list[Tensor], visual_positions: list[Tensor], length: int) -> None:
        masks, embeds = C.LM_VISUAL_POS_MASKS.get(kwargs), C.LM_DEEPSTACK_EMBEDS.get(kwargs)
        if masks is None or embeds is None:
            return
        counts = masks.sum(1).tolist()  # rows of the deepstack features follow the visual tokens, row-major
        offsets = [sum(counts[:b]) for b in range(len(counts))]
        rows = torch.cat([k.to(embeds[0].device) + o for k, o in zip(kept, offsets)])
        C.LM_DEEPSTACK_EMBEDS.set(kwargs, [e[rows] for e in embeds])
        new = torch.zeros(masks.shape[0], length, dtype=torch.bool, device=masks.device)
        for b, pos in enumerate(visual_positions):
            new[b, pos] = True
        C.LM_VISUAL_POS_MASKS.set(kwargs, new)


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    frames_apart = True
    hooks_class = _DeepstackHooks
    contracts = Qwen2VLAdapter.contracts + (C.LM_VISUAL_POS_MASKS, C.LM_DEEPSTACK_EMBEDS)

    def deepstack_layers(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def check(self, stages) -> None:
        super().check(stages)
        low = [s.layer for s in stages if s.layer is not None and s.layer <= self.deepstack_layers()]
        if low:
            raise ValueError(
                f"Qwen3-VL adds deepstack visual features after each of its first {self.deepstack_layers()} decoder "
                f"layers; in-LLM pruning must start at layer {self.deepstack_layers() + 1} or later, got layers {low}"
            )

    @classmethod
    def _config(cls, num_layers: int):
        from transformers import Qwen3VLConfig

        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}
        return Qwen3VLConfig(
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=[0]),
            text_config=cls.tiny_text_config(None, num_layers, head_dim=16, rope_parameters=rope),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        )


@hookimpl
def prunekit_register_adapters(register):
    register(Qwen3VLAdapter)
