"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any CLIP/SigLIP + projector + decoder LLaVA).

Model-specific knowledge lives here and only here: where the image placeholders are, which vision layer feeds
the projector, and how to read that layer's [CLS] attention without eager attention.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from prunekit import ModelAdapter, ModelSpec, Stage, hookimpl
from prunekit.runtime.decoder import DecoderPruner, ModelHooks, PruningError


def _feature_layer_index(feature_layer, num_layers: int) -> int:
    """Index of the encoder layer whose output LLaVA feeds to the projector (hidden_states[f] = layers[f-1])."""
    f = max(feature_layer) if isinstance(feature_layer, (list, tuple)) else feature_layer
    return num_layers + f if f < 0 else f - 1


class _LlavaHooks(ModelHooks):
    def __init__(self, model, inner, want_cls: bool) -> None:
        self.model = model
        self.inner = inner
        self.config = inner.config
        self._visual: Tensor | None = None
        self._cls: list[Tensor] = []
        self.handles = [inner.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        if want_cls:
            tower = inner.vision_tower
            tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps or is the transformer
            encoder_layers = tower.encoder.layers
            idx = _feature_layer_index(self.config.vision_feature_layer, len(encoder_layers))
            attn = encoder_layers[idx].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._capture_cls, with_kwargs=True))

    # the outer forward sees input_ids; the language model only sees embeddings
    def _capture_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        image_id = self.config.image_token_id
        if input_ids is not None:
            self._visual = input_ids == image_id
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            ref = module.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
            self._visual = (embeds == ref).all(-1)
        if self._visual is not None and not bool(self._visual.any()):
            self._cls = []
        return None

    def _capture_cls(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n, L, _ = hidden.shape
        q = module.q_proj(hidden[:, :1]).view(n, 1, module.num_heads, module.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(n, L, module.num_heads, module.head_dim).transpose(1, 2)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * module.scale).softmax(-1)  # [n, H, 1, L]
        attn = probs.mean(1)[:, 0]  # [n, L]: [CLS] → every token, mean over heads
        if self.config.vision_feature_select_strategy == "default":
            attn = attn[:, 1:]
        self._cls.append(attn)
        return None

    def take_visual_mask(self) -> Tensor | None:
        visual, self._visual = self._visual, None
        return visual

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        if name != "cls_attention":
            raise PruningError(f"signal {name!r} is not available after the LLaVA projector (offered: cls_attention)")
        if not self._cls:
            raise PruningError(
                "no [CLS] attention was recorded: the images must be encoded by the patched model in this call "
                "(precomputed image features bypass the vision tower)"
            )
        flat = torch.cat([a.flatten() for a in self._cls])
        self._cls = []
        if flat.numel() != sum(visual_counts):
            raise PruningError(
                f"[CLS] attention covers {flat.numel()} patches but the prompt holds {sum(visual_counts)} image tokens"
            )
        return list(flat.split(visual_counts))

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config.text_config)


class LlavaAdapter(ModelAdapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    insertion_points = frozenset({"after_projector", "decoder_layer"})

    @property
    def inner(self):
        return self.model.model if type(self.model).__name__ == "LlavaForConditionalGeneration" else self.model

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

    def patch(self, stages: Sequence[Stage], config, method: str) -> DecoderPruner:
        inner = self.inner
        if not self.describe().has_cls and any("cls_attention" in s.signals for s in stages):
            raise PruningError("this LLaVA's vision encoder has no [CLS] token, so 'cls_attention' is unavailable")
        hooks = _LlavaHooks(self.model, inner, want_cls=any("cls_attention" in s.signals for s in stages))
        lm = inner.language_model
        return DecoderPruner(
            method=method,
            language_model=lm,
            layers=lm.layers,
            rotary=lambda hidden, pos: lm.rotary_emb(hidden, position_ids=pos),
            stages=stages,
            positions=config.positions,
            hooks=hooks,
            extra_handles=hooks.handles,
        )


@hookimpl
def prunekit_register_adapters(register):
    register(LlavaAdapter)
