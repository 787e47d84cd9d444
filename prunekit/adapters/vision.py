"""Signals read from the vision encoder: which there are (:data:`VISION_SIGNALS`), the options they take, and how
[CLS] attention, keys and the attention each patch receives are computed from an encoder attention module's input
(:func:`attention_signals`), at the feature layer or the one after it (:func:`next_layer_signals`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit.errors import PruningError

if TYPE_CHECKING:
    from .base import MultimodalAdapter

__all__ = ["VISION_SIGNALS", "CLS_SIGNALS", "ATTENTION_SIGNALS", "VISION_LAYERS", "attention_signals",
           "resolve_layer", "next_layer_signals", "check_options", "cls_signals"]

#: Signals read from the vision encoder (the rest come from the language model's input or its layers).
VISION_SIGNALS = frozenset({"cls_attention", "keys", "attention_received", "cls_feature"})
#: ... of which these need a [CLS] token
CLS_SIGNALS = frozenset({"cls_attention", "keys", "cls_feature"})
#: ... of which these are read from an encoder layer's attention (option ``layer``: "feature", the layer whose
#: output the projector reads; "next", the layer after it, on that output; "last", the encoder's last layer, which
#: must be one of those two)
ATTENTION_SIGNALS = frozenset({"cls_attention", "keys", "attention_received"})
VISION_LAYERS = ("feature", "next", "last")


def cls_signals(q_cls: Tensor, k: Tensor, heads: int, head_dim: int) -> dict[str, dict[str, Tensor]]:
    """[CLS] attention to the patches and the patches' keys, from the [CLS] row's query ``q_cls`` ``[n, 1, width]``
    and every row's keys ``k`` ``[n, L, width]`` (heads side by side; the [CLS] token first):
    ``{"cls": {"mean", "one"}, "keys": {"mean", "one"}}``, ``"mean"`` over the heads, ``"one"`` the whole width as
    a single head (scaled by width^-1/2, PruMerge+'s code)."""
    n, L, _ = k.shape
    qh = q_cls.view(n, 1, heads, head_dim).transpose(1, 2).float()
    kh = k.view(n, L, heads, head_dim).transpose(1, 2).float()
    probs = ((qh @ kh.transpose(-1, -2)) * head_dim**-0.5).softmax(-1)  # [n, H, 1, L]
    one = ((q_cls.float() @ k.float().transpose(-1, -2)) * k.shape[-1] ** -0.5).softmax(-1)  # [n, 1, L]
    return {"cls": {"mean": probs.mean(1)[:, 0, 1:], "one": one[:, 0, 1:]},  # [CLS] → patches
            "keys": {"mean": kh.mean(1)[:, 1:], "one": k[:, 1:]}}


def attention_signals(adapter: "MultimodalAdapter", module, hidden: Tensor, received: bool) -> dict[str, Any]:
    """The signals of the attention ``module`` on its input ``hidden`` ``[n, L, width]`` (after the layer's
    norm): ``cls`` and ``keys`` (with a [CLS] token) and ``received`` (when asked for)."""
    n, L, _ = hidden.shape
    heads, hd = adapter.attention_heads(module)
    rows = hidden if received else hidden[:, :1]
    q, k = C.VISION_Q_PROJ.get(module)(rows), C.VISION_K_PROJ.get(module)(hidden)
    if C.VISION_Q_NORM.has(module):  # InternViT normalises q and k before the heads split
        q, k = C.VISION_Q_NORM.get(module)(q), C.VISION_K_NORM.get(module)(k)
    first = 1 if adapter.has_cls() else 0  # patches start after the [CLS] token
    out: dict[str, Any] = cls_signals(q[:, :1], k, heads, hd) if first else {}
    q = q.view(n, -1, heads, hd).transpose(1, 2).float()
    k = k.view(n, L, heads, hd).transpose(1, 2).float()
    if received:  # mean attention each patch receives from the patches, one head at a time
        out["received"] = torch.zeros(n, L - first, device=hidden.device)
        for h in range(heads):
            probs = ((q[:, h, first:] @ k[:, h].transpose(-1, -2)) * hd**-0.5).softmax(-1)
            out["received"] += probs[:, :, first:].mean(1) / heads
    return out


def resolve_layer(adapter: "MultimodalAdapter", name: str, layer: str) -> str:
    """``layer``, with "last" resolved to "feature" or "next" (the encoder's last layer must be one of them)."""
    if layer != "last":
        return layer
    if adapter.vision_layer() is not None and adapter.vision_layer(1) is None:
        return "feature"
    if adapter.vision_layer(1) is not None and adapter.vision_layer(2) is None:
        return "next"
    raise PruningError(
        f"signal {name!r} with layer='last' is not available on {type(adapter.model).__name__}: its "
        "encoder's last layer is neither the one whose output the projector reads nor the one after it, or its "
        "adapter does not name its layers (layer='feature' and layer='next' read those two)"
    )


def next_layer_signals(adapter: "MultimodalAdapter", outputs: list[Tensor], name: str) -> list:
    """``name`` per tower pass from the layer after the feature layer: its norm and attention applied to the
    feature layer's output (that layer's input), without running the rest of it."""
    nxt = adapter.vision_layer(1)
    model = type(adapter.model).__name__
    if nxt is None:
        raise PruningError(
            f"signal {name!r} with layer='next' is not available on {model}: its encoder has no layer after the "
            "one whose output the projector reads, or its adapter does not name it (layer='feature' reads the "
            "feature layer itself)"
        )
    if not outputs:
        raise PruningError(f"no output of the feature layer was recorded for {name!r} with layer='next': the "
                           "images must be encoded by the patched model in this call")
    _, norm, attn = nxt
    key = {"cls_attention": "cls", "keys": "keys", "attention_received": "received"}[name]
    return [attention_signals(adapter, attn, norm(h), name == "attention_received")[key] for h in outputs]


def check_options(adapter: "MultimodalAdapter", name: str, options: dict) -> None:
    """Raise unless ``name`` is a vision signal and ``options`` are among those it takes."""
    if name not in VISION_SIGNALS:
        raise PruningError(
            f"signal {name!r} is not available before the language model of {type(adapter.model).__name__}"
        )
    # heads: [CLS] signals over the heads' mean, or "one" head over the whole width; layer: see VISION_LAYERS
    allowed = {"heads": ("mean", "one") if name in CLS_SIGNALS else ("mean",), "layer": VISION_LAYERS}
    allowed = allowed if name in ATTENTION_SIGNALS else {}
    for key, value in options.items():
        if key not in allowed:
            raise PruningError(f"signal {name!r} takes no option {key!r} (options: {sorted(allowed) or 'none'})")
        if value not in allowed[key]:
            raise PruningError(f"signal {name!r}: {key} must be one of {list(allowed[key])}, got {value!r}")
