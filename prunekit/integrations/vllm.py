"""Serve pruned models with vLLM: prunekit's pre-LLM methods as an out-of-tree vLLM plugin.

``pip install "prunekit[vllm]"`` registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point group.
vLLM calls it in every process it starts; it points vLLM's LLaVA, Qwen2-VL and Qwen2.5-VL architectures at
:class:`PrunedLlavaForConditionalGeneration`, :class:`PrunedQwen2VLForConditionalGeneration` and
:class:`PrunedQwen2_5_VLForConditionalGeneration`, subclasses of vLLM's own models. Without a ``prunekit`` block in
the model's config a subclass is vLLM's model unchanged. With one (saved in the checkpoint's config.json, see
:mod:`prunekit.saved`, or passed as ``hf_overrides={"prunekit": {...}}``):

* the prompt gets ``k`` placeholder tokens per image instead of ``n`` (so its KV slots are sized for ``k``), and
* the image's encoder output keeps the ``k`` rows the method chooses, by the method's own stages run on this model's
  features (:class:`prunekit.integrations.pre_llm.ImagePruner`), so a token kept here is the token
  ``prunekit.build`` keeps on the same features;
* on Qwen2-VL and Qwen2.5-VL the kept tokens keep their original M-RoPE positions (see :class:`_PrunedQwenVL`).

A method vLLM cannot serve (it prunes inside the LLM, reads the question, or needs a signal this model does not
compute) is refused when the model is built, with the reason. This module is imported only by vLLM (and tests),
never by ``import prunekit``.
"""

from __future__ import annotations

from typing import Any, Mapping

from collections import OrderedDict, deque

import numpy as np
import torch
from blake3 import blake3
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
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..adapters.vision import cls_signals
from ..interfaces import ModelSpec
from .pre_llm import ImagePruner, UnservableMethodError

#: the server's name in error messages
SERVER = "vLLM"
#: vLLM architecture name -> this module's class that serves it
ARCHITECTURES = {"LlavaForConditionalGeneration": "PrunedLlavaForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration": "PrunedQwen2VLForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration": "PrunedQwen2_5_VLForConditionalGeneration"}
#: the [CLS] signals this module computes on a CLIP tower (as prunekit's transformers adapters do)
CLS_SIGNALS = frozenset({"cls_attention", "keys", "cls_feature"})


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve vLLM's LLaVA, Qwen2-VL and Qwen2.5-VL architectures with
    prunekit's subclasses (loaded lazily, by name, when vLLM builds such a model)."""
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



# ---------------------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL (dynamic resolution, 2x2 patch merger, M-RoPE, no [CLS]): one implementation, as mixins
# placed before vLLM's classes of each family
# ---------------------------------------------------------------------------------------------------------
#: entries of the caches below (see _PrunedQwenVL)
KEPT_CACHE = 4096
ROWS_CACHE = 256
#: prunekit family -> the name messages give it
QWEN_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}


def _qwen_spec(config: Any, family: str) -> ModelSpec:
    text = config.text_config
    return ModelSpec(
        family=family,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        visual_tokens_per_image=None,
        has_cls=False,
        name_or_path=getattr(config, "_name_or_path", ""),
        unavailable={"cls_feature": "its vision encoder has no [CLS] token"},
        extra={"rope": "mrope"},
    )


def _qwen_pruner(config: Any, family: str) -> ImagePruner | None:
    pruner = ImagePruner.from_config(config, _qwen_spec(config, family), server=SERVER, positions="original")
    if pruner is not None and any(stage.point != "after_projector" for stage in pruner.stages):
        raise UnservableMethodError(
            f"method {pruner.method!r} prunes at {[s.point for s in pruner.stages]}; on {QWEN_NAMES[family]} prunekit "
            f"prunes only after the patch merger (after_projector), as its transformers adapter does")
    return pruner


def qwen2_vl_spec(config: Any) -> ModelSpec:
    """What a method may know of a vLLM Qwen2-VL model: what prunekit's Qwen2-VL adapter describes (each image has
    its own token count; M-RoPE positions; no [CLS] token)."""
    return _qwen_spec(config, "qwen2_vl")


def qwen2_5_vl_spec(config: Any) -> ModelSpec:
    """What a method may know of a vLLM Qwen2.5-VL model: what prunekit's Qwen2.5-VL adapter describes (each image
    has its own token count; M-RoPE positions; no [CLS] token)."""
    return _qwen_spec(config, "qwen2_5_vl")


def qwen2_vl_pruner(config: Any) -> ImagePruner | None:
    """The pruner the model's ``prunekit`` block asks for (None without one); refuses what vLLM cannot serve. As
    :func:`qwen2_5_vl_pruner`."""
    return _qwen_pruner(config, "qwen2_vl")


def qwen2_5_vl_pruner(config: Any) -> ImagePruner | None:
    """The pruner the model's ``prunekit`` block asks for (None without one); refuses what vLLM cannot serve.

    Kept image tokens keep their original M-RoPE positions (``positions="original"``, the default on Qwen-VL), as on
    prunekit's transformers path; the model computes no encoder signal, so only methods that need none are served."""
    return _qwen_pruner(config, "qwen2_5_vl")


class _PrunedQwenInfo:
    """Mixin for vLLM's Qwen-VL processing info: each image's token count is the number the method keeps."""

    prunekit_family = ""

    def pruner(self) -> ImagePruner | None:
        if "_prunekit_pruner" not in self.__dict__:
            self._prunekit_pruner = _qwen_pruner(self.get_hf_config(), self.prunekit_family)
        return self._prunekit_pruner

    def get_num_image_tokens(self, **kwargs) -> int:
        n = super().get_num_image_tokens(**kwargs)
        pruner = self.pruner()
        return n if pruner is None else pruner.kept_count(n)


class _PrunedQwenProcessor:
    """Mixin for vLLM's Qwen-VL processor; with a pruner, each image gets as many placeholders as the method keeps of
    its merged tokens. Videos are refused (prunekit's vLLM model prunes images only); a budget per prompt is refused
    for prompts of several images."""

    _profiling = False

    def get_dummy_mm_inputs(self, *args, **kwargs):
        # vLLM's memory profiling encodes dummy videos as they are (unpruned): let them through
        self._profiling = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._profiling = False

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruner = self.info.pruner()
        if pruner is None:
            return updates
        images, videos = (mm_items.get_count(m, strict=False) for m in ("image", "video"))
        if videos and not self._profiling:
            raise ValueError(f"this prompt holds {videos} video(s); prunekit's vLLM "
                             f"{QWEN_NAMES[self.info.prunekit_family]} model prunes images only: serve videos without "
                             f"the model's prunekit block")
        if pruner.budget_per == "prompt" and images > 1:
            raise ValueError(f"this prompt holds {images} images and the model's prunekit block budgets per prompt "
                             f"(budget_per={pruner.config.budget_per!r}); vLLM prunes each image on its own: save "
                             f"the method with budget_per='image' to serve prompts of several images")

        def kept(update):
            def replacement(item_idx: int):
                tokens = update.replacement(item_idx)
                return tokens[: pruner.kept_count(len(tokens))]
            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [kept(u) if u.modality == "image" else u for u in updates]


def _content_key(kind: str, values: Tensor, grid: list[int]) -> bytes:
    """A digest of one image's input (its pixel patches or given embeddings) and grid (BLAKE3, as vLLM hashes its
    multimodal items: about 10 ms for the 25 MB of patches of a 1022x1022 image on one CPU core)."""
    data = values.detach().contiguous()
    h = blake3(f"{kind}{list(grid)}{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.cpu().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


class _PrunedQwenVL:
    """Mixin for vLLM's Qwen-VL models (Qwen2-VL, Qwen2.5-VL); with a ``prunekit`` block in the config, each image
    keeps the merged tokens the method chooses, at their original M-RoPE positions.

    vLLM asks the model for a request's M-RoPE positions (:meth:`get_mrope_input_positions`) when the request is
    added, before it encodes the request's images. With a pruner this method encodes the request's new images there
    and runs the method's stages, so it knows which tokens are kept: they get the (t, h, w) positions they have in
    the unpruned prompt, and the text after an image keeps its unpruned positions (as ``prunekit.build`` with
    ``positions="original"``). The kept rows wait in a small cache, keyed by a digest of the image's input, until
    vLLM asks for the image's embeddings (:meth:`_process_image_input`), so each image is encoded once; an image
    that is no longer there is encoded again. The kept indices are also cached by vLLM's hash of the item, so an
    image seen before is not encoded for its positions again.

    :attr:`prunekit_last_kept` holds the indices of the last 64 images embedded and :attr:`prunekit_last_positions`
    the last positions computed (for tests and reports); :attr:`prunekit_encodes` counts the images encoded for their
    positions (``"positions"``) and again for their embeddings (``"embeddings"``).
    """

    prunekit_family = ""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunekit_pruner = _qwen_pruner(self.config, self.prunekit_family)
        # vLLM's own video pruning (video_pruning_rate) exists on Qwen2.5-VL only
        if self.prunekit_pruner is not None and getattr(self, "is_multimodal_pruning_enabled", False):
            raise UnservableMethodError(f"vLLM's own video pruning (video_pruning_rate) and a prunekit block cannot "
                                        f"be combined on {QWEN_NAMES[self.prunekit_family]}: leave "
                                        f"video_pruning_rate unset")
        self.prunekit_last_kept: deque[Tensor] = deque(maxlen=64)  # vLLM may embed a prompt's images one by one
        self.prunekit_last_positions: Tensor | None = None
        self.prunekit_encodes = {"positions": 0, "embeddings": 0}
        self._prunekit_kept: OrderedDict[str, Tensor] = OrderedDict()  # vLLM item hash -> kept indices
        self._prunekit_rows: OrderedDict[bytes, Any] = OrderedDict()  # input digest -> Kept (indices, rows)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        if self.prunekit_pruner is not None:  # the graphs return every row: pruning needs the eager path
            config.modalities = []
        return config

    # -- selection -------------------------------------------------------------------------------------------
    def _prunekit_select(self, kind: str, values: list[Tensor], grids: list[list[int]]) -> list:
        """Run the method on images given as per-image ``values`` (pixel patches or embeddings) and grids."""
        if kind == "pixel_values":
            features = self.visual(torch.cat(values), grid_thw=grids)
            merge = self.visual.spatial_merge_size
            features = features.split([t * h * w // merge**2 for t, h, w in grids])
        else:
            features = [v.to(device=self.visual.device, dtype=self.visual.dtype) for v in values]
        merge = self.config.vision_config.spatial_merge_size
        return [self.prunekit_pruner.prune(f, grid=(h // merge, w // merge))
                for f, (t, h, w) in zip(features, grids)]

    def _prunekit_remember(self, key: bytes, kept) -> None:
        self._prunekit_rows[key] = kept
        while len(self._prunekit_rows) > ROWS_CACHE:
            self._prunekit_rows.popitem(last=False)

    # -- positions -------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[Tensor, int]:
        if self.prunekit_pruner is None or not any(f.modality == "image" for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        if any(f.modality != "image" for f in mm_features):
            raise ValueError(f"prunekit's vLLM {QWEN_NAMES[self.prunekit_family]} model prunes images only")
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        new = [f for f in features if f.identifier not in self._prunekit_kept]
        for kind in ("pixel_values", "image_embeds"):  # images given as pixels are encoded, embeddings used as given
            items = [f for f in new if kind in f.data]
            if not items:
                continue
            values = [f.data[kind].data for f in items]
            grids = [f.data["image_grid_thw"].data.tolist() for f in items]
            with torch.inference_mode():
                results = self._prunekit_select(kind, values, grids)
            self.prunekit_encodes["positions"] += len(items) if kind == "pixel_values" else 0
            for f, v, g, r in zip(items, values, grids, results):
                self._prunekit_kept[f.identifier] = r.indices.cpu()
                self._prunekit_remember(_content_key(kind, v, g), r)
        for f in features:
            self._prunekit_kept.move_to_end(f.identifier)
        while len(self._prunekit_kept) > KEPT_CACHE:
            self._prunekit_kept.popitem(last=False)

        merge = self.config.vision_config.spatial_merge_size
        pieces, st, next_pos = [], 0, 0
        for f in features:
            offset, kept = f.mm_position.offset, self._prunekit_kept[f.identifier].numpy()
            if f.mm_position.length != len(kept):
                raise RuntimeError(f"image at {offset} has {f.mm_position.length} placeholders and keeps "
                                   f"{len(kept)} tokens")
            _, h, w = (int(x) for x in f.data["image_grid_thw"].data.tolist())
            h, w = h // merge, w // merge
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
            base = next_pos + text
            # the kept tokens' (t, h, w) places in the unpruned image; what follows starts after the whole image
            pieces.append(np.stack([np.zeros_like(kept), kept // w, kept % w]) + base)
            next_pos = base + max(h, w)
            st = offset + len(kept)
        text = len(input_tokens) - st
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        positions = torch.from_numpy(np.concatenate(pieces, axis=1).astype(np.int64))
        self.prunekit_last_positions = positions
        return positions, int(positions.max()) + 1 - len(input_tokens)

    # -- embeddings ------------------------------------------------------------------------------------------
    def _process_image_input(self, image_input):
        if self.prunekit_pruner is None:
            return super()._process_image_input(image_input)
        kind = image_input["type"]
        grid_thw = image_input["image_grid_thw"]
        grids = grid_thw.tolist()
        merge = self.visual.spatial_merge_size
        if kind == "pixel_values":
            values = list(image_input["pixel_values"].split(grid_thw.prod(-1).tolist()))
        else:
            values = list(image_input["image_embeds"].split((grid_thw.prod(-1) // merge**2).tolist()))
        keys = [_content_key(kind, v, g) for v, g in zip(values, grids)]
        kept = [self._prunekit_rows.pop(k, None) for k in keys]
        missing = [i for i, r in enumerate(kept) if r is None]
        if missing:  # not seen by get_mrope_input_positions (e.g. vLLM's profiling), or dropped from the cache
            results = self._prunekit_select(kind, [values[i] for i in missing], [grids[i] for i in missing])
            self.prunekit_encodes["embeddings"] += len(missing) if kind == "pixel_values" else 0
            for i, r in zip(missing, results):
                kept[i] = r
        self.prunekit_last_kept.extend(r.indices.cpu() for r in kept)
        return tuple(r.rows for r in kept)


# Qwen2-VL ---------------------------------------------------------------------------------------------------
class PrunedQwen2VLProcessingInfo(_PrunedQwenInfo, Qwen2VLProcessingInfo):
    """vLLM's Qwen2-VL processing info, with each image's token count the number the method keeps."""

    prunekit_family = "qwen2_vl"


class PrunedQwen2VLMultiModalProcessor(_PrunedQwenProcessor, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor, with as many placeholders per image as the method keeps (see
    :class:`_PrunedQwenProcessor`)."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2VLMultiModalProcessor, info=PrunedQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PrunedQwen2VLForConditionalGeneration(_PrunedQwenVL, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with a ``prunekit`` block in its config, each image keeps the merged tokens the method
    chooses, at their original M-RoPE positions (see :class:`_PrunedQwenVL`)."""

    prunekit_family = "qwen2_vl"


# Qwen2.5-VL -------------------------------------------------------------------------------------------------
class PrunedQwen2_5_VLProcessingInfo(_PrunedQwenInfo, Qwen2_5_VLProcessingInfo):
    """vLLM's Qwen2.5-VL processing info, with each image's token count the number the method keeps."""

    prunekit_family = "qwen2_5_vl"


class PrunedQwen2_5_VLMultiModalProcessor(_PrunedQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor, with as many placeholders per image as the method keeps (see
    :class:`_PrunedQwenProcessor`)."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLMultiModalProcessor, info=PrunedQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VLForConditionalGeneration(_PrunedQwenVL, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with a ``prunekit`` block in its config, each image keeps the merged tokens the method
    chooses, at their original M-RoPE positions (see :class:`_PrunedQwenVL`). vLLM's own video pruning
    (``video_pruning_rate``) is refused beside a prunekit block."""

    prunekit_family = "qwen2_5_vl"


__all__ = ["register", "llava_spec", "llava_pruner", "PrunedLlavaForConditionalGeneration",
           "PrunedLlavaProcessingInfo", "PrunedLlavaMultiModalProcessor", "qwen2_5_vl_spec", "qwen2_5_vl_pruner",
           "PrunedQwen2_5_VLForConditionalGeneration", "PrunedQwen2_5_VLProcessingInfo",
           "PrunedQwen2_5_VLMultiModalProcessor", "qwen2_vl_spec", "qwen2_vl_pruner",
           "PrunedQwen2VLForConditionalGeneration", "PrunedQwen2VLProcessingInfo", "PrunedQwen2VLMultiModalProcessor",
           "UnservableMethodError"]
