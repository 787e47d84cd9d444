"""The base of the adapters of decoder-only multimodal models: a subclass names its model classes, placeholder
tokens and where the language model lives; optional overrides add encoder signals and image grids. Wires
:class:`~prunekit.adapters.hooks.VisualHooks` and :class:`~prunekit.runtime.decoder.DecoderPruner` together.

Not a plugin itself: each architecture's module subclasses :class:`MultimodalAdapter` and registers through its
own entry point.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit.contracts import Contract
from prunekit.errors import PruningError
from prunekit.interfaces import ModelAdapter, ModelSpec, Stage
from prunekit.runtime.decoder import DecoderPruner
from prunekit.runtime.generate import GenerateGuard
from prunekit.runtime.hooks import ModelHooks

from .calls import RefuseLabels, RotaryCall
from .hooks import VisualHooks
from .vision import VISION_SIGNALS

__all__ = ["MultimodalAdapter"]


class MultimodalAdapter(ModelAdapter):
    """Base of the adapters of decoder-only multimodal models whose language model is a HF decoder.

    Subclasses name their classes, visual placeholder tokens and where the language model lives; optional
    overrides add encoder signals (:meth:`feature_attention_module`, :meth:`token_sources`) and image grids.
    """

    family: ClassVar[str]
    insertion_points = frozenset({"after_projector", "decoder_layer"})
    #: methods of the inner model that encode images or videos (their arguments are recorded per call)
    encoder_methods: ClassVar[tuple[str, ...]] = (C.ENCODE_IMAGES.path, C.ENCODE_VIDEOS.path)
    #: "1d" rotary positions, or "mrope" (multi-row position ids; kept tokens keep their original positions)
    rope: ClassVar[str] = "1d"
    #: reason in-LLM pruning cannot work on this architecture (None: it can)
    no_decoder_pruning: ClassVar[str | None] = None
    #: the ModelHooks class serving this architecture
    hooks_class: ClassVar[type[VisualHooks]] = VisualHooks

    # -- structure -------------------------------------------------------------------------------------------
    #: the transformers contracts this adapter relies on beyond :data:`prunekit.contracts.CORE` (verified when a
    #: model is patched, and on every adapter's tiny model by the test suite)
    contracts: ClassVar[tuple[Contract, ...]] = ()

    @property
    def inner(self):
        model = self.model
        return C.INNER.get(model) if hasattr(model, "lm_head") and C.INNER.has(model) else model

    def language_model(self):
        return C.LANGUAGE_MODEL.get(self.inner)

    def all_contracts(self, stages: Sequence[Stage] | None = None) -> tuple[Contract, ...]:
        """Every contract a patch with ``stages`` (None: any patch) relies on."""
        extra: tuple[Contract, ...] = ()
        if stages is None or any(sig in VISION_SIGNALS for s in stages if s.layer is None for sig in s.signals):
            extra += C.VISION_ATTENTION if self.feature_attention_module() is not None else ()
        if stages is None or any(s.point == "vision_features" for s in stages):
            extra += (C.PROJECTOR,) if "vision_features" in self.insertion_points else ()
        return tuple(dict.fromkeys(C.CORE + type(self).contracts + extra))

    def contract_roots(self) -> dict[str, Any]:
        """The objects contracts are read from (see :class:`prunekit.contracts.Contract`)."""
        lm = self.language_model()
        layer = C.DECODER_LAYERS.get(lm)[0]
        cache = C.DYNAMIC_CACHE.get()(config=self.text_config())  # the kind a pruned prefill gets when it has none
        layers = C.CACHE_LAYERS.get(cache, None)
        return {
            "model": self.model, "inner": self.inner, "language_model": lm, "decoder_layer": layer,
            "cache": cache, "cache_layer": layers[0] if layers else None,
            "attention": C.SELF_ATTENTION.get(layer), "vision_attention": self.feature_attention_module(),
            "projector": self.projector() if "vision_features" in self.insertion_points else None,
            "encode_images": C.ENCODE_IMAGES.get(self.inner),
            "encode_videos": C.ENCODE_VIDEOS.get(self.inner),
        }

    def verify_contracts(self, stages: Sequence[Stage] | None = None) -> None:
        """Raise :class:`~prunekit.contracts.ContractError` (naming the contract and the transformers release)
        for the first contract this model breaks."""
        roots = self.contract_roots()
        for contract in self.all_contracts(stages):
            root = roots.get(contract.root) if contract.root is not None else None
            if contract.root is not None and root is None:
                continue  # an optional part this model has not (e.g. no video encoder)
            contract.verify(root)

    def text_config(self):
        return self.model.config.get_text_config()

    def visual_token_ids(self) -> list[int]:
        return [i for i in (self.placeholder_of(C.ENCODE_IMAGES.path), self.placeholder_of(C.ENCODE_VIDEOS.path))
                if i is not None]

    def placeholder_of(self, encoder_method: str) -> int | None:
        """The placeholder token id of what ``encoder_method`` encodes (images or videos)."""
        cfg = self.model.config
        kind = "video" if "video" in encoder_method else "image"
        for name in (f"{kind}_token_id", f"{kind}_token_index"):
            if getattr(cfg, name, None) is not None:
                return getattr(cfg, name)
        return None

    def prompt_tokens(self, encoder_method: str, arguments: dict, output) -> list[int]:
        """Per item (image, video) one encoder call produced, the visual tokens it takes in the prompt.
        Default: the rows of its ``pooler_output`` item."""
        return [int(x.shape[0]) for x in C.ENCODED_TOKENS.get(output)]

    def unit_sizes(self, encoder_method: str, arguments: dict, output) -> list[int]:
        """Token counts of the budget units (images, video frames) one encoder call produced, in order.
        Default: one unit per item of ``pooler_output`` (a video is one unit unless the adapter splits it)."""
        return self.prompt_tokens(encoder_method, arguments, output)

    def has_cls(self) -> bool:
        return False

    def visual_tokens_per_image(self) -> int | None:
        return None

    def feature_attention_module(self):
        """The attention module of the vision layer that feeds the projector, for [CLS] attention (when
        :meth:`has_cls`) and ``attention_received`` (None: the adapter reads no encoder attention)."""
        return None

    def vision_layer(self, offset: int = 0):
        """``(layer, norm, attention)`` of the vision encoder layer ``offset`` layers after the one whose output
        the projector reads (0: that layer): the layer, the norm its attention reads the layer's input through,
        and its attention module. None where the encoder has no such layer or the adapter does not name it.

        Offset 0 gives the ``cls_feature`` signal (its output's [CLS] row); offset 1 the ``layer="next"`` option
        of the attention signals, computed from the feature layer's output with that layer's norm and q/k."""
        return None

    def cls_feature_unavailable(self) -> str | None:
        """Why the ``cls_feature`` signal cannot be offered (None: it can). It is the [CLS] row of the feature
        layer's output, which a method may hand to the projector as one more row of its input."""
        if not self.has_cls():
            return "its vision encoder has no [CLS] token"
        if self.vision_layer() is None:
            return "its adapter does not name the vision layer whose output the projector reads"
        layers = getattr(self.model.config, "vision_feature_layer", None)
        if isinstance(layers, (list, tuple)) and len(layers) > 1:
            return f"its projector reads several vision layers at once ({list(layers)})"
        return None

    @staticmethod
    def attention_heads(module) -> tuple[int, int]:
        return module.num_heads, module.head_dim

    def token_sources(self, hooks: VisualHooks, visual_counts: list[int], num_patches: int) -> list[Tensor]:
        """Per sample, ``[n, g]`` indices of the encoder patches each visual token comes from (-1: none)."""
        if num_patches != sum(visual_counts):
            raise PruningError(f"the encoder saw {num_patches} patches but the prompt holds {sum(visual_counts)} "
                               "visual tokens, and this adapter does not map one to the other")
        return [idx[:, None] for idx in torch.arange(num_patches).split(visual_counts)]

    def grids(self, hooks: VisualHooks, visual_counts: list[int]):
        return None

    def image_crops(self, hooks: VisualHooks) -> tuple[Tensor, int] | None:
        """For models that split images into crops (``budget_per="crop"``; list ``"crop"`` in ``budget_units``):
        each image token of the recorded image encodings, in order, gets its crop's number (distinct across all
        crops of those images) or -1 for a token of no crop (a row break); and the patches of one crop, from which
        a crop's budget is computed. None: this model does not split its images."""
        return None

    @staticmethod
    def square_grids(visual_counts: list[int], tokens_per_image: int):
        """Grids for models whose every image (or tile) is a square of ``tokens_per_image`` tokens."""
        g = int(round(tokens_per_image**0.5))
        return [[(g, g)] * (n // (g * g)) if n % (g * g) == 0 else None for n in visual_counts]

    def projector(self):
        """The module that maps vision features to the LLM's space (``vision_features`` adapters)."""
        return C.PROJECTOR.get(self.inner)

    def feature_sources(self, hooks: VisualHooks, visual_counts: list[int], num_rows: int) -> list[Tensor]:
        """Per sample, ``[n]`` indices of the projector-input row of each visual token (-1: none, e.g. a newline).
        Default: the first patch :meth:`token_sources` names."""
        return [s[:, 0] for s in self.token_sources(hooks, visual_counts, num_rows)]

    def describe(self) -> ModelSpec:
        text = self.text_config()
        return ModelSpec(
            family=self.family,
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            visual_tokens_per_image=self.visual_tokens_per_image(),
            has_cls=self.has_cls(),
            name_or_path=getattr(self.model.config, "_name_or_path", ""),
            unavailable={} if (why := self.cls_feature_unavailable()) is None else {"cls_feature": why},
            extra={"rope": self.rope},
        )

    def resolve_positions(self, positions: str) -> str:
        if self.rope == "mrope":
            if positions == "renumber":
                raise ValueError(
                    f"positions='renumber' is not defined for {type(self.model).__name__}: its M-RoPE position ids "
                    "carry each token's place in the image grid; use positions='original' (or 'auto')"
                )
            return "original"
        return "renumber" if positions == "auto" else positions

    def check(self, stages: Sequence[Stage]) -> None:
        """Raise for stages this model cannot run, naming the reason (called before anything is installed)."""
        if self.no_decoder_pruning and any(s.layer is not None for s in stages):
            raise ValueError(self.no_decoder_pruning)

    def make_hooks(self, stages: Sequence[Stage]) -> ModelHooks:
        """The model-specific services for these stages (installs their hooks; ``.handles`` removes them)."""
        pre_signals = {sig for s in stages if s.layer is None for sig in s.signals}
        return self.hooks_class(self, pre_signals, want_features=any(s.point == "vision_features" for s in stages))

    def patch(self, stages: Sequence[Stage], config, method: str) -> DecoderPruner:
        self.check(stages)
        self.verify_contracts(stages)
        positions = self.resolve_positions(config.positions)
        hooks = self.make_hooks(stages)
        lm = self.language_model()
        try:
            pruner = DecoderPruner(
                method=method,
                language_model=lm,
                layers=C.DECODER_LAYERS.get(lm),
                rotary=RotaryCall(C.ROTARY_EMBEDDING.get(lm)),
                stages=stages,
                positions=positions,
                hooks=hooks,
                extra_handles=hooks.handles,
                budget_per=config.budget_per,
                budget=None if config.schedule is not None else config.target,
                budget_meaning="schedule" if config.schedule is not None else config.budget_meaning,
            )
        except Exception:
            for h in hooks.handles:
                h.remove()
            raise
        if hasattr(self.model, "generate"):
            pruner.own(GenerateGuard(self.model, pruner))
        pruner.own(self.model.register_forward_pre_hook(RefuseLabels(pruner), with_kwargs=True))
        return pruner

    # -- tiny random models for tests and docs ------------------------------------------------------------
    @staticmethod
    def tiny_text_config(model_type: str | None, num_layers: int, **extra) -> dict:
        """The small decoder config every tiny model here uses (vocabulary 128, width 64, GQA 4/2 heads);
        ``model_type`` None leaves the text model's type to the multimodal config."""
        config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      max_position_embeddings=2048, **extra)
        return config if model_type is None else {"model_type": model_type, **config}

    @classmethod
    def tiny(cls, seed: int = 0, num_layers: int = 4):
        """A random-weight model of this architecture built from a small config (nothing is downloaded)."""
        raise NotImplementedError(f"adapter {cls.name!r} has no tiny model for the conformance tests")

    @classmethod
    def tiny_rows(cls, model) -> list[dict]:
        """Single-prompt inputs for ``model`` (from :meth:`tiny`), unpadded, with different visual-token counts;
        the last one holds several images (or a video) when the architecture allows it."""
        raise NotImplementedError(f"adapter {cls.name!r} has no tiny inputs for the conformance tests")
