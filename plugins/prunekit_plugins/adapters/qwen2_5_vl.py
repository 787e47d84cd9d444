"""Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL-7B in the TOPS paper).

As Qwen2-VL (dynamic resolution, 2×2 merger, M-RoPE, no [CLS]); its vision encoder adds window attention, which
changes nothing for pruning after the merger.
"""

from __future__ import annotations

from prunekit.plugin import hookimpl
from prunekit_plugins.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    @classmethod
    def _config(cls, num_layers: int):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
                               fullatt_block_indexes=[1]),
            text_config=cls._text_config(num_layers),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        )


@hookimpl
def prunekit_register_adapters(register):
    register(Qwen2_5_VLAdapter)
