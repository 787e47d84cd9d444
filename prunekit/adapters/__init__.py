"""The public base classes of model adapters: subclass :class:`MultimodalAdapter` (and, where a model encodes
images its own way, :class:`VisualHooks`) and register the subclass through the ``prunekit`` entry point group."""

from .multimodal import (
    ATTENTION_SIGNALS,
    CLS_SIGNALS,
    VISION_LAYERS,
    VISION_SIGNALS,
    MethodHook,
    MultimodalAdapter,
    VisualHooks,
)

__all__ = [
    "MultimodalAdapter", "VisualHooks", "MethodHook",
    "VISION_SIGNALS", "CLS_SIGNALS", "ATTENTION_SIGNALS", "VISION_LAYERS",
]
