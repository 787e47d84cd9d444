"""Adapter for ``Gemma3ForConditionalGeneration`` (Gemma 3 4B/12B/27B, e.g. ``google/gemma-3-4b-it``): pruning
before the language model only.

SigLIP encoder (no [CLS]); each image is pooled to 256 tokens. The model builds its attention masks before the
language model — causal, sliding-window on most layers, bidirectional inside each image — so after pruning the
adapter rebuilds them with the model's own ``create_masks_for_generate`` on the shorter sequence (kept tokens
of an image stay one bidirectional block), and maps the 2-D mask of every decode step onto the pruned cache
before the model builds that step's masks.

In-LLM pruning is refused: five of every six layers attend through a sliding window whose cache keeps the
last ``sliding_window`` positions; dropping rows inside the decoder would leave those layers' caches and masks
counting positions that no longer exist, so decode steps would attend to the wrong window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit.plugin import MultimodalAdapter, PerThread, VisualHooks, hookimpl, pad_left


class _Gemma3Hooks(VisualHooks):
    pruner = None  # set by the adapter once the pruner exists
    _mask_2d: Tensor | None = PerThread()  # the 2-D mask and token types of the model's current call
    _token_types: Tensor | None = PerThread()

    def capture_inputs(self, module, args, kwargs):
        super().capture_inputs(module, args, kwargs)
        self._mask_2d = C.MODEL_ATTENTION_MASK.get(kwargs)
        self._token_types = C.MODEL_TOKEN_TYPE_IDS.get(kwargs)
        mask = self._mask_2d
        gen = None if self.pruner is None else self.pruner.generation_for(C.MODEL_CACHE.get(kwargs))
        if gen is not None and isinstance(mask, Tensor) and mask.dim() == 2 and gen.mask is not None:
            C.MODEL_ATTENTION_MASK.set(kwargs, self.pruner.map_decode_mask(mask, gen))  # masks are built from this
            return args, kwargs
        return None

    def input_mask_2d(self):
        return self._mask_2d

    def prepared_masks(self, kwargs: dict, mask_2d: Tensor, keep_rows: list[Tensor], length: int):
        types = self._token_types
        if types is not None:
            types = pad_left([types[b, r] for b, r in enumerate(keep_rows)], length, 0)
        return C.GEMMA3_MASKS.get()(
            config=self.adapter.model.config, inputs_embeds=C.LM_INPUTS_EMBEDS.get(kwargs), attention_mask=mask_2d,
            **{C.MODEL_CACHE.key: C.LM_CACHE.get(kwargs)}, position_ids=C.LM_POSITION_IDS.get(kwargs),
            token_type_ids=types,
        )


class Gemma3Adapter(MultimodalAdapter):
    name = "gemma3"
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    insertion_points = frozenset({"after_projector", "decoder_layer"})
    encoder_methods = (C.ENCODE_IMAGES.path,)
    hooks_class = _Gemma3Hooks
    contracts = (C.MODEL_ATTENTION_MASK, C.MODEL_TOKEN_TYPE_IDS, C.MODEL_CACHE, C.GEMMA3_MASKS, C.VISION_TOWER,
                 C.PROJECTOR)
    no_decoder_pruning = (
        "Gemma3 cannot be pruned inside its language model: its sliding-window layers keep a cache of the last "
        "sliding_window positions, and dropping rows between layers would leave those caches and masks counting "
        "positions that no longer exist; prune before the LLM (insertion_points=['after_projector'])"
    )

    def feature_attention_module(self):
        tower = C.VISION_TOWER.get(self.inner)
        return getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn  # the projector reads the last

    def token_sources(self, hooks, visual_counts, num_patches):
        """Each token averages a k×k block of patches (the projector's average pooling)."""
        proj = C.PROJECTOR.get(self.inner)
        side, k = proj.patches_per_image, proj.kernel_size
        grid = torch.arange(num_patches).view(-1, side // k, k, side // k, k)  # image, row, dy, col, dx
        groups = grid.permute(0, 1, 3, 2, 4).reshape(-1, k * k)
        return list(groups.split(visual_counts))

    def grids(self, hooks, visual_counts):
        return self.square_grids(visual_counts, self.model.config.mm_tokens_per_image)

    def patch(self, stages, config, method):
        patch = super().patch(stages, config, method)
        patch.hooks.pruner = patch
        return patch

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        config = Gemma3Config(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4),
            text_config=cls.tiny_text_config(None, num_layers, head_dim=16, sliding_window=8,
                                             sliding_window_pattern=2),
            mm_tokens_per_image=16, image_token_index=120, boi_token_index=121, eoi_token_index=122,
        )
        torch.manual_seed(seed)
        return Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Row 0: one image; row 1: two images (each between its begin/end-of-image tokens)."""
        cfg = model.config
        rows = []
        for b, images in enumerate((1, 2)):
            g = torch.Generator().manual_seed(b + 1)
            ids = [3, 4]
            for _ in range(images):
                ids += [cfg.boi_token_index] + [cfg.image_token_index] * cfg.mm_tokens_per_image + [cfg.eoi_token_index]
            ids = torch.tensor([ids + [5 + b, 6, 7]])
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "token_type_ids": (ids == cfg.image_token_index).long(),
                         "pixel_values": torch.randn(images, 3, 32, 32, generator=g)})
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(Gemma3Adapter)
