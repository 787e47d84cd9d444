"""A tiny random-weight Qwen2.5-VL or Qwen2-VL checkpoint that vLLM's CPU build serves (test environment only).

``save(folder, family)`` writes the model (built from a config, nothing downloaded), the word-level tokenizer and chat
template of tests/lmms_families.py, and the family's processor with the PIL image processor (32x32 to 64x64 pixels:
16 to 64 merged tokens per image). The decoder differs from the Qwen adapters' tiny models in one way: vLLM's CPU
attention needs a head size of at least 32 (2 heads of width 32; M-RoPE sections [4, 6, 6]). Weights are drawn with a
wider initializer than the default so that greedy answers are not decided by rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: lmms_families



def prompt(question: str, images: int = 1) -> str:
    """One question about ``images`` images, in the tiny chat template's layout."""
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    return f"<|im_start|>user\n{image * images}{question}<|im_end|>\n<|im_start|>assistant\n"


#: family -> (transformers' model class, processor class)
FAMILIES = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
            "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")}


def config(family: str = "qwen2_5_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048,
                rope_parameters=rope, initializer_range=0.2)
    tokens = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    if family == "qwen2_vl":  # its merger's output width is the vision config's hidden_size
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
        return Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=16, out_hidden_size=64, fullatt_block_indexes=[1],
                  initializer_range=0.2)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)


def save(folder: Path, family: str = "qwen2_5_vl", seed: int = 0):
    """Write the ``family`` checkpoint to ``folder``; returns the model."""
    import torch
    import transformers as T

    import lmms_families as F

    torch.manual_seed(seed)
    model_class, processor_class = (getattr(T, name) for name in FAMILIES[family])
    model = model_class._from_config(config(family), attn_implementation="sdpa").eval()
    tokenizer = F.build_tokenizer(F.FAMILIES[family])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    v = model.config.vision_config
    sizes = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                 min_pixels=1024, max_pixels=4096)
    # vLLM loads the family's processor, which needs a video processor (torchvision's Python part imports here)
    processor = processor_class(image_processor=T.Qwen2VLImageProcessorPil(**sizes),
                                video_processor=T.Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer,
                                chat_template=F.chat_template(F.FAMILIES[family].image_text))
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
