"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any CLIP/SigLIP + projector + decoder LLaVA).

Model-specific knowledge lives here and only here: where the image placeholders are, which vision layer feeds
the projector, and how to read that layer's [CLS] attention without eager attention.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from prunekit import ModelSpec, Stage, hookimpl
from prunekit.runtime.decoder import ModelHooks, PruningError, brings_images
from prunekit_plugins.adapters.common import MultimodalAdapter


def _feature_layer_index(feature_layer, num_layers: int) -> int:
    """Index of the encoder layer whose output LLaVA feeds to the projector (hidden_states[f] = layers[f-1])."""
    f = max(feature_layer) if isinstance(feature_layer, (list, tuple)) else feature_layer
    return num_layers + f if f < 0 else f - 1


class _LlavaHooks(ModelHooks):
    def __init__(self, model, inner, want_vision_signals: bool, want_features: bool) -> None:
        self.model = model
        self.inner = inner
        self.config = inner.config
        self._visual: Tensor | None = None
        self._brings = False
        self._cls: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._features: list[Tensor] = []
        self.handles = [inner.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        if want_vision_signals:
            tower = inner.vision_tower
            tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps or is the transformer
            encoder_layers = tower.encoder.layers
            idx = _feature_layer_index(self.config.vision_feature_layer, len(encoder_layers))
            attn = encoder_layers[idx].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._capture_attention, with_kwargs=True))
        if want_features:
            self.handles.append(inner.multi_modal_projector.register_forward_pre_hook(self._capture_features))

    # the outer forward sees input_ids; the language model only sees embeddings
    def _capture_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._brings = brings_images(kwargs)
        image_id = self.config.image_token_id
        if input_ids is not None:
            self._visual = input_ids == image_id
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            ref = module.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
            self._visual = (embeds == ref).all(-1)
        return None

    def _drop_cls(self, x: Tensor) -> Tensor:
        return x[:, 1:] if self.config.vision_feature_select_strategy == "default" else x

    def _capture_attention(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n, L, _ = hidden.shape
        q = module.q_proj(hidden[:, :1]).view(n, 1, module.num_heads, module.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(n, L, module.num_heads, module.head_dim).transpose(1, 2)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * module.scale).softmax(-1)  # [n, H, 1, L]
        self._cls.append(self._drop_cls(probs.mean(1)[:, 0]))  # [CLS] → every token, mean over heads
        self._keys.append(self._drop_cls(k.mean(1)))  # [n, L, head_dim], mean over heads
        return None

    def _capture_features(self, module, args):
        self._features.append(args[0])
        return None

    def images_in_call(self) -> bool:
        return self._brings

    def take_visual_mask(self) -> Tensor | None:
        visual, self._visual = self._visual, None
        return visual

    @staticmethod
    def _split(captured: list[Tensor], visual_counts: list[int], what: str) -> list[Tensor]:
        if not captured:
            raise PruningError(
                f"no {what} was recorded: the images must be encoded by the patched model in this call "
                "(precomputed image features bypass the vision tower)"
            )
        flat = torch.cat([a.reshape(-1, *a.shape[2:]) for a in captured])
        if flat.shape[0] != sum(visual_counts):
            raise PruningError(
                f"{what} covers {flat.shape[0]} patches but the prompt holds {sum(visual_counts)} image tokens"
            )
        return list(flat.split(visual_counts))

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        if name == "cls_attention":
            return self._split(self._cls, visual_counts, "[CLS] attention")
        if name == "keys":
            return self._split(self._keys, visual_counts, "vision keys")
        raise PruningError(
            f"signal {name!r} is not available before the LLaVA language model (offered: cls_attention, keys, "
            "text_embeddings)"
        )

    def vision_features(self, visual_counts: list[int]) -> list[Tensor]:
        return self._split(self._features, visual_counts, "vision feature")

    def project(self, values: Tensor) -> Tensor:
        projector = self.inner.multi_modal_projector
        return projector(values.to(next(projector.parameters()).dtype))

    def grids(self, visual_counts: list[int]):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        if self.config.vision_feature_select_strategy != "default":
            return None  # the [CLS] token sits in front of each grid
        return [[(side, side)] * (n // (side * side)) if n % (side * side) == 0 else None for n in visual_counts]

    def units(self, visual_counts: list[int]) -> list[list[int]]:
        vision = self.config.vision_config
        per_image = (vision.image_size // vision.patch_size) ** 2
        if self.config.vision_feature_select_strategy != "default":
            per_image += 1
        if any(n % per_image for n in visual_counts):
            raise PruningError(f"visual-token counts {visual_counts} are not whole images of {per_image} tokens")
        return [[per_image] * (n // per_image) for n in visual_counts]

    def end_of_prefill(self) -> None:
        self._cls, self._keys, self._features = [], [], []

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config.text_config)


class LlavaAdapter(MultimodalAdapter):
    name = "llava"
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    insertion_points = frozenset({"vision_features", "after_projector", "decoder_layer"})

    def describe(self) -> ModelSpec:
        cfg = self.model.config
        vision, text = cfg.vision_config, cfg.text_config
        patches = (vision.image_size // vision.patch_size) ** 2
        has_cls = vision.model_type in ("clip_vision_model",)
        if cfg.vision_feature_select_strategy == "full" and has_cls:
            patches += 1
        return ModelSpec(
            family="llava",
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            visual_tokens_per_image=patches,
            has_cls=has_cls,
            name_or_path=getattr(cfg, "_name_or_path", ""),
        )

    def make_hooks(self, stages: Sequence[Stage]) -> ModelHooks:
        if not self.describe().has_cls and any("cls_attention" in s.signals for s in stages):
            raise PruningError("this LLaVA's vision encoder has no [CLS] token, so 'cls_attention' is unavailable")
        pre = [s for s in stages if s.layer is None]
        return _LlavaHooks(
            self.model, self.inner,
            want_vision_signals=any({"cls_attention", "keys"} & set(s.signals) for s in pre),
            want_features=any(s.point == "vision_features" for s in pre),
        )

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        from prunekit.testing import tiny_llava

        return tiny_llava(seed=seed, num_layers=num_layers)

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        from prunekit.testing import tiny_llava_inputs

        rows = []
        for b, images in enumerate((1, 2)):
            x = tiny_llava_inputs(model, batch=1, left_pad=(0,), images_per_row=images, seed=b + 1)
            x["input_ids"][:, -3:] += b
            rows.append(x)
        return rows


@hookimpl
def prunekit_register_adapters(register):
    register(LlavaAdapter)
