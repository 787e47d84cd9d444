"""Small removable wrappers the adapters install: :class:`MethodHook` records the calls of an encoder method,
:class:`RefuseLabels` refuses a forward with ``labels`` while pruning, :class:`RotaryCall` calls a rotary module.
Each is an object rather than a closure, so a copied model's wrapper serves the copy."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

from prunekit import contracts as C
from prunekit.errors import PruningError

if TYPE_CHECKING:
    from prunekit.runtime.decoder import DecoderPruner

__all__ = ["MethodHook", "RefuseLabels", "RotaryCall"]


class MethodHook:
    """Records the arguments of every call of ``obj.name`` (a bound method) while installed; removable.

    ``generate`` encodes images by calling ``get_image_features`` itself and drops the arguments it used (image
    sizes, grids) from what the forward later receives, so this is the one place those arguments can be seen.
    The wrapper calls the original method unchanged; removing it deletes the instance attribute.
    """

    def __init__(self, obj: Any, name: str, record: Callable[[str, dict, Any], None]) -> None:
        self.obj, self.name = obj, name
        obj.__dict__[name] = _Recorder(getattr(obj, name), name, record)

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


class _Recorder:
    """Calls ``original`` unchanged and records its arguments and output (an object, not a closure, so that a
    copied model's recorder calls the copy's method and records into the copy's hooks)."""

    def __init__(self, original: Callable, name: str, record: Callable[[str, dict, Any], None]) -> None:
        self.original, self.name, self.record = original, name, record
        self.signature = inspect.signature(original)
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        output = self.original(*args, **kwargs)
        self.record(self.name, dict(bound.arguments), output)
        return output


class RefuseLabels:
    """A forward with ``labels`` would compare the logits of a pruned sequence with labels for the whole one."""

    def __init__(self, pruner: "DecoderPruner") -> None:
        self.pruner = pruner

    def __call__(self, module, args, kwargs):
        if self.pruner.enabled and C.MODEL_LABELS.get(kwargs) is not None:
            raise PruningError(
                f"{self.pruner.method}: a forward with labels= computes the loss on logits of the pruned, shorter "
                "sequence against labels of the whole prompt; compute the loss from the returned logits (which "
                "positions were kept: prunekit.pruning_report(model)), or run the forward inside "
                "prunekit.disabled(model)"
            )
        return None


class RotaryCall:
    """``rotary_emb(hidden, position_ids=pos)`` of one language model (a copyable object, not a closure)."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, hidden: Tensor, pos: Tensor):
        return self.module(hidden, position_ids=pos)
