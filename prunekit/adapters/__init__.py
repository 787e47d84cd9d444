"""The public base classes of model adapters: subclass :class:`MultimodalAdapter` (and, where a model encodes
images its own way, :class:`VisualHooks`) and register the subclass through the ``prunekit`` entry point group.

Modules: :mod:`.base` (the adapter), :mod:`.hooks` (what it records per call), :mod:`.vision` (vision-encoder
signals), :mod:`.units` (budget units from recorded encodings), :mod:`.calls` (removable wrappers).
"""

from .base import MultimodalAdapter
from .calls import MethodHook
from .hooks import VisualHooks
from .vision import ATTENTION_SIGNALS, CLS_SIGNALS, VISION_LAYERS, VISION_SIGNALS

__all__ = [
    "MultimodalAdapter", "VisualHooks", "MethodHook",
    "VISION_SIGNALS", "CLS_SIGNALS", "ATTENTION_SIGNALS", "VISION_LAYERS",
]
