"""Serve pruned models with vLLM: prunekit's pre-LLM methods as an out-of-tree vLLM plugin.

``pip install "prunekit[vllm]"`` registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point group.
vLLM calls it in every process it starts; it points vLLM's LLaVA architecture at
:class:`PrunedLlavaForConditionalGeneration`, a subclass of vLLM's own LLaVA model. Without a ``prunekit`` block in the
model's config that subclass is vLLM's LLaVA unchanged. With one (saved in the checkpoint's config.json, see
:mod:`prunekit.saved`, or passed as ``hf_overrides={"prunekit": {...}}``):

* the prompt gets ``k`` placeholder tokens per image instead of ``n`` (so its KV slots are sized for ``k``), and
* the image's encoder output keeps the ``k`` rows the method chooses, by the method's own stages run on this model's
  features (:class:`prunekit.integrations.pre_llm.ImagePruner`), so a token kept here is the token
  ``prunekit.build`` keeps on the same features.

A method vLLM cannot serve (it prunes inside the LLM, reads the question, or needs a signal this model does not
compute) is refused when the model is built, with the reason. This module is imported only by vLLM (and tests),
never by ``import prunekit``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, PixtralVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.vision import cls_signals
from ..interfaces import ModelSpec
from .pre_llm import ImagePruner, UnservableMethodError

#: the server's name in error messages
SERVER = "vLLM"
#: vLLM architecture name -> this module's class that serves it
ARCHITECTURES = {"LlavaForConditionalGeneration": "PrunedLlavaForConditionalGeneration"}
#: the [CLS] signals this module computes on a CLIP tower (as prunekit's transformers adapters do)
CLS_SIGNALS = frozenset({"cls_attention", "keys", "cls_feature"})


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve vLLM's LLaVA architecture with prunekit's subclass (loaded
    lazily, by name, when vLLM builds such a model)."""
    from vllm import ModelRegistry

    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{cls}")


# ---------------------------------------------------------------------------------------------------------
# LLaVA (CLIP or SigLIP tower, MLP projector, any decoder)
# ---------------------------------------------------------------------------------------------------------
def llava_spec(config: Any) -> ModelSpec:
    """What a method may know of a vLLM LLaVA model: the same sizes prunekit's LLaVA adapter describes."""
    vision, text = config.vision_config, config.text_config
    strategy = config.vision_feature_select_strategy
    return ModelSpec(
        family="llava",
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        visual_tokens_per_image=(vision.image_size // vision.patch_size) ** 2 + (strategy == "full"),
        has_cls=_has_cls(config),
        name_or_path=getattr(config, "_name_or_path", ""),
        unavailable={} if _has_cls(config) and isinstance(config.vision_feature_layer, int)
        else {"cls_feature": "its vision encoder has no [CLS] token or its projector reads several layers"},
        extra={"rope": "1d"},
    )


def _has_cls(config: Any) -> bool:
    return isinstance(config.vision_config, CLIPVisionConfig) and config.vision_feature_select_strategy == "default"


def _offered(config: Any) -> frozenset[str]:
    """The signals this module computes for ``config``: the [CLS] ones on a CLIP tower whose projector reads one
    layer."""
    return CLS_SIGNALS if _has_cls(config) and isinstance(config.vision_feature_layer, int) else frozenset()


def llava_pruner(config: Any) -> ImagePruner | None:
    """The pruner the model's ``prunekit`` block asks for (None without one); refuses what vLLM cannot serve."""
    if getattr(config, "prunekit", None) is None:
        return None
    if isinstance(config.vision_config, PixtralVisionConfig):
        raise UnservableMethodError("prunekit does not prune Pixtral-based LLaVA models in vLLM (its images are "
                                    "not fixed grids); remove the 'prunekit' block to serve it unpruned")
    return ImagePruner.from_config(config, llava_spec(config), server=SERVER, signals=_offered(config))


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info, with each image's token count the number the method keeps."""

    def pruner(self) -> ImagePruner | None:
        if "_prunekit_pruner" not in self.__dict__:  # built once: every prompt asks for its image token count
            self._prunekit_pruner = llava_pruner(self.get_hf_config())
        return self._prunekit_pruner

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        pruner = self.pruner()
        return n if pruner is None else pruner.kept_count(n)


class PrunedLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor; a budget per prompt is refused for prompts of several images (each image's tokens
    are chosen from that image alone, so only a budget per image holds there)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        pruner = self.info.pruner()
        images = mm_items.get_count("image", strict=False)
        if pruner is not None and pruner.budget_per == "prompt" and images > 1:
            raise ValueError(f"this prompt holds {images} images and the model's prunekit block budgets per prompt "
                             f"(budget_per={pruner.config.budget_per!r}); vLLM prunes each image on its own: save "
                             f"the method with budget_per='image' to serve prompts of several images")
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


def _llava_info(ctx):
    if isinstance(ctx.get_hf_config().vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return PrunedLlavaProcessingInfo(ctx)


def _llava_processor(info, dummy_inputs, **kwargs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs, **kwargs)
    return PrunedLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


class _ClsSignals:
    """The [CLS] signals of one tower pass, read at the feature layer (the tower's last loaded layer) the way
    prunekit's transformers adapters read them: the layer's attention input (after its first norm) and output."""

    def __init__(self, tower) -> None:
        layer = tower.vision_model.encoder.layers[-1]
        self.attention = layer.self_attn
        self.attention_input: Tensor | None = None
        self.layer_output: Tensor | None = None
        self.recording = False
        self.handles = [
            self.attention.register_forward_pre_hook(self._input, with_kwargs=True),
            layer.register_forward_hook(self._output),
        ]

    def _input(self, module, args, kwargs):
        if self.recording:
            self.attention_input = kwargs.get("hidden_states", args[0] if args else None)

    def _output(self, module, args, output):
        if self.recording:
            self.layer_output = output[0] if isinstance(output, tuple) else output

    def signal(self, b: int, name: str, options: Mapping[str, Any]) -> Tensor:
        """The signal ``name`` for the patches of image ``b`` of the last pass."""
        allowed = {"heads": ("mean", "one"), "layer": ("feature", "last")} if name != "cls_feature" else {}
        for key, value in options.items():
            if key not in allowed or value not in allowed[key]:
                raise UnservableMethodError(
                    f"signal {name!r} with {key}={value!r} is not computed by prunekit's vLLM LLaVA model (options: "
                    f"{ {k: list(v) for k, v in allowed.items()} }; layer reads the feature layer, the tower's last)")
        if name == "cls_feature":
            out = self.layer_output[b]
            return out[:1].expand(out.shape[0] - 1, -1)
        hidden = self.attention_input[b : b + 1]  # [1, L, width]
        qkv, _ = self.attention.qkv_proj(hidden)
        q, k, _ = qkv.chunk(3, dim=-1)
        heads, hd = self.attention.num_heads_per_partition, self.attention.head_dim
        signals = cls_signals(q[:, :1], k, heads, hd)  # the transformers adapters' computation
        return signals["cls" if name == "cls_attention" else "keys"][options.get("heads", "mean")][0]


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_llava_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a ``prunekit`` block in its config, each image's encoder output keeps the rows the method
    chooses (:attr:`prunekit_last_kept` holds the indices of the last images encoded, for tests and reports)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunekit_pruner = llava_pruner(self.config)
        self.prunekit_last_kept: list[Tensor] = []
        needs = {s for stage in self.prunekit_pruner.stages for s in stage.signals} if self.prunekit_pruner else ()
        self._prunekit_signals = _ClsSignals(self.vision_tower) if needs else None

    def _process_image_input(self, image_input):
        pruner = self.prunekit_pruner
        if pruner is None or image_input["type"] != "pixel_values":
            # precomputed image embeddings are sized by their rows and served as given
            return super()._process_image_input(image_input)
        recorder = self._prunekit_signals
        if recorder is not None:
            recorder.recording = True
        try:
            vision = self._process_image_pixels(image_input)
        finally:
            if recorder is not None:
                recorder.recording = False
        images = list(vision)  # one [n, width] tensor per image
        starts_at_vision = bool(pruner.stages) and pruner.stages[0].point == "vision_features"
        if not starts_at_vision:
            sizes = [v.shape[0] for v in images]
            images = list(torch.split(self.multi_modal_projector(torch.cat(images)), sizes))
        out, kept = [], []
        g = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = (g, g) if self.config.vision_feature_select_strategy == "default" else None
        for b, features in enumerate(images):
            signal = None if recorder is None else (lambda name, options, b=b: recorder.signal(b, name, options))
            result = pruner.prune(features, project=self.multi_modal_projector, grid=grid, signal=signal)
            out.append(result.rows)
            kept.append(result.indices.cpu())
        self.prunekit_last_kept = kept
        return tuple(out)


__all__ = ["register", "llava_spec", "llava_pruner", "PrunedLlavaForConditionalGeneration",
           "PrunedLlavaProcessingInfo", "PrunedLlavaMultiModalProcessor", "UnservableMethodError"]
