"""The generic :class:`~prunekit.runtime.hooks.ModelHooks` of multimodal adapters: what an adapter says about its
model (where things are), this class records per call and per thread: the visual tokens of the model's input, the
encoder calls that produced them, the vision signals of those calls, and the projector's input rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from prunekit import contracts as C
from prunekit.errors import PruningError
from prunekit.runtime.hooks import BudgetUnits, ModelHooks, brings_images
from prunekit.runtime.state import PerThread, ThreadStateMixin

from .calls import MethodHook
from .units import crop_units, image_units
from .vision import (
    ATTENTION_SIGNALS,
    CLS_SIGNALS,
    VISION_SIGNALS,
    attention_signals,
    check_options,
    next_layer_signals,
    resolve_layer,
)

if TYPE_CHECKING:
    from .base import MultimodalAdapter

__all__ = ["VisualHooks"]


class VisualHooks(ThreadStateMixin, ModelHooks):
    """Generic :class:`ModelHooks`: the adapter says where things are, this class records them per call (and per
    thread: one patched model may serve several threads at once)."""

    _visual: Tensor | None = PerThread()  # [B, L] visual tokens of the model's current input
    _brings: bool = PerThread(bool)  # whether the current call brings images or videos
    _ids: Tensor | None = PerThread()  # the current call's input ids
    _from_embeddings: bool = PerThread(bool)  # whether the visual tokens were looked for in inputs_embeds
    _repeats_of: tuple | None = PerThread()  # (visual counts, _repeats of them) for the current call's input ids
    _calls: list[dict] = PerThread(list)  # every recorded encoder call since the last prefill
    _pending: dict[str, list[Tensor]] = PerThread(lambda: VisualHooks._empty())  # of the running encoder call
    # the encoder calls that produced the current prompt's visual tokens (set by _sync)
    records: list[tuple[str, dict]] = PerThread(list)  # (encoder method, its arguments), in call order
    units_of: list[list[int]] = PerThread(list)  # each of those calls' budget units (images, frames): token counts
    # per tower pass, {"mean": over heads, "one": all heads as one wide head}: [crops, patches] [CLS] attention,
    # and [crops, patches, head_dim] / [crops, patches, width] keys
    cls: list[dict] = PerThread(list)
    keys: list[dict] = PerThread(list)
    features: list[Tensor] = PerThread(list)  # per projector call: its input rows
    received: list[Tensor] = PerThread(list)  # per tower pass: [crops, patches] attention each patch receives
    outputs: list[Tensor] = PerThread(list)  # per tower pass: [crops, L, width] output of the feature layer

    def __init__(self, adapter: "MultimodalAdapter", signals: set[str], want_features: bool = False) -> None:
        self.adapter = adapter
        self.inner = adapter.inner
        name = type(adapter.model).__name__
        if signals & CLS_SIGNALS and not adapter.has_cls():
            raise PruningError(
                f"{sorted(signals & CLS_SIGNALS)} need a vision encoder with a [CLS] token; {name}'s encoder has "
                "none (relevance without it: 'text_similarity' or 'attention_received')"
            )
        if "cls_feature" in signals and adapter.cls_feature_unavailable() is not None:
            raise PruningError(
                f"signal 'cls_feature' (the [CLS] token's feature at the vision layer the projector reads) is not "
                f"available on {name}: {adapter.cls_feature_unavailable()}"
            )
        attn = adapter.feature_attention_module() if signals & ATTENTION_SIGNALS else None
        if signals & ATTENTION_SIGNALS and attn is None:
            raise PruningError(
                f"{sorted(signals & ATTENTION_SIGNALS)} are not available on {name}: its adapter reads no "
                "vision-encoder attention (relevance without it: 'text_similarity')"
            )
        # the feature layer's output: the [CLS] feature, and the next layer's signals (computed when asked for)
        feature_layer = adapter.vision_layer() if signals & VISION_SIGNALS else None
        self._want_received = "attention_received" in signals
        self.handles: list[Any] = [self.inner.register_forward_pre_hook(self.capture_inputs, with_kwargs=True),
                                   self.inner.register_forward_hook(self._check_consumed)]
        for name in adapter.encoder_methods:
            if hasattr(self.inner, name):
                self.handles.append(MethodHook(self.inner, name, self._record))
        if attn is not None:
            self.handles.append(attn.register_forward_pre_hook(self._capture_attention, with_kwargs=True))
        if feature_layer is not None:
            self.handles.append(feature_layer[0].register_forward_hook(self._capture_output))
        if want_features:
            self.handles.append(adapter.projector().register_forward_pre_hook(self._capture_features))

    def _record(self, name: str, arguments: dict, output: Any) -> None:
        # counted now: generate may later repeat the output's rows in place, per beam or returned sequence
        self._calls.append({"name": name, "args": arguments, **self._pending,
                            "tokens": sum(self.adapter.prompt_tokens(name, arguments, output)),
                            "units": self.adapter.unit_sizes(name, arguments, output)})
        self._pending = self._empty()

    @staticmethod
    def _empty() -> dict[str, list[Tensor]]:
        return {"cls": [], "keys": [], "features": [], "received": [], "outputs": []}

    def _sync(self, visual_counts: list[int]) -> int:
        """Pick the latest encoder calls whose tokens add up to the prompt's visual tokens (earlier calls, e.g. a
        user's own ``get_image_features`` outside a forward, are not this prompt's). Returns ``m``: ``generate``
        with beams or several returned sequences encodes each prompt's images once, then repeats every row ``m``
        times; the encoding then matches every ``m``-th row."""
        for m in self._repeats(visual_counts):
            chosen = self._latest_calls(sum(visual_counts[::m]))
            if chosen is not None:
                break
        else:
            m, chosen = 1, []
        self._set_records(chosen)
        return m

    def _repeats(self, visual_counts: list[int]) -> list[int]:
        """1, then every ``m`` such that the batch is each row repeated ``m`` times in a row. Computed once per call
        (every signal of a prefill asks), comparing the input ids for every ``m`` in one read of the device."""
        cached = self._repeats_of
        if cached is not None and cached[0] == visual_counts:
            return cached[1]
        B = len(visual_counts)
        candidates = [m for m in range(2, B + 1)
                      if not B % m and all(visual_counts[i] == visual_counts[i - i % m] for i in range(B))]
        ids = self._ids
        if ids is not None and candidates:  # whether the ids of each row equal those of its group's first row
            groups = [ids.reshape(B // m, m, *ids.shape[1:]) for m in candidates]
            same = torch.stack([(g == g[:, :1]).all() for g in groups]).tolist()
            candidates = [m for m, s in zip(candidates, same) if s]
        out = [1, *candidates]
        self._repeats_of = (list(visual_counts), out)
        return out

    def _latest_calls(self, total: int) -> list[dict] | None:
        chosen: list[dict] = []
        for call in reversed(self._calls):
            if sum(c["tokens"] for c in chosen) >= total:
                break
            chosen.insert(0, call)
        return chosen if sum(c["tokens"] for c in chosen) == total else None

    @staticmethod
    def _repeat(per_row: list, m: int) -> list:
        return [x for x in per_row for _ in range(m)]

    def _set_records(self, chosen: list[dict]) -> None:
        self.records = [(c["name"], c["args"]) for c in chosen]
        self.units_of = [c["units"] for c in chosen]
        self.cls = [t for c in chosen for t in c["cls"]]
        self.keys = [t for c in chosen for t in c["keys"]]
        self.features = [t for c in chosen for t in c["features"]]
        self.received = [t for c in chosen for t in c["received"]]
        self.outputs = [t for c in chosen for t in c["outputs"]]

    def _capture_features(self, module, args):
        self._pending["features"].append(args[0])
        return None

    def vision_features(self, visual_counts: list[int]) -> list[Tensor]:
        m = self._sync(visual_counts)
        visual_counts = visual_counts[::m]
        if not self.features:
            raise PruningError("no vision features were recorded: the images must be encoded in this call")
        rows = torch.cat([f.reshape(-1, f.shape[-1]) for f in self.features])
        out = []
        for src in self.adapter.feature_sources(self, visual_counts, rows.shape[0]):
            src = src.to(rows.device)
            out.append(rows[src.clamp_min(0)] * (src >= 0).to(rows.dtype)[:, None])
        return self._repeat(out, m)

    def project(self, values: Tensor) -> Tensor:
        projector = self.adapter.projector()
        return projector(values.to(next(projector.parameters()).dtype))

    def capture_inputs(self, module, args, kwargs):
        """The forward pre-hook on the multimodal model: finds the call's visual tokens (by placeholder ids, or in
        ``inputs_embeds``) and whether it brings images. An adapter that needs more of the call's inputs overrides
        it, calls ``super()``, and may return ``(args, kwargs)`` to change them."""
        input_ids = C.MODEL_INPUT_IDS.get(kwargs, args[0] if args else None)
        self._brings = brings_images(kwargs)
        ids = torch.tensor(self.adapter.visual_token_ids())
        self._ids = input_ids
        self._repeats_of = None
        self._from_embeddings = input_ids is None
        if input_ids is not None:
            self._visual = torch.isin(input_ids, ids.to(input_ids.device))
        elif C.MODEL_INPUTS_EMBEDS.get(kwargs) is not None:
            embeds = C.MODEL_INPUTS_EMBEDS.get(kwargs)
            refs = C.INPUT_EMBEDDINGS.get(module)()(ids.to(embeds.device))
            self._visual = (embeds[:, :, None, :] == refs[None, None]).all(-1).any(-1)
        return None

    def _check_consumed(self, module, args, output):
        """After the model's forward: the language model must have taken the visual tokens found at its input."""
        visual, self._visual = self._visual, None
        if visual is not None and bool(visual.any()) and self._brings:
            raise C.LANGUAGE_MODEL.error(
                f"{type(self.adapter.model).__name__} ran without calling the language model prunekit hooked "
                f"({type(self.adapter.language_model()).__name__}), so its visual tokens were not pruned"
            )

    def found_by_embeddings(self) -> bool:
        return self._from_embeddings

    def placeholder_description(self) -> str:
        return f"placeholder ids {self.adapter.visual_token_ids()}"

    def _capture_attention(self, module, args, kwargs):
        hidden = C.LAYER_HIDDEN_STATES.get(kwargs, args[0] if args else None)
        for key, value in attention_signals(self.adapter, module, hidden, self._want_received).items():
            self._pending[key].append(value)
        return None

    def _capture_output(self, module, args, output):
        self._pending["outputs"].append(output[0] if isinstance(output, tuple) else output)
        return None



    def images_in_call(self) -> bool:
        return self._brings

    def take_visual_mask(self) -> Tensor | None:
        visual, self._visual = self._visual, None
        return visual

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        check_options(self.adapter, name, options)
        m = self._sync(visual_counts)
        visual_counts = visual_counts[::m]
        if name == "cls_feature":  # every patch of a tower pass gets that pass's [CLS] row
            captured = [h[:, :1].expand(-1, h.shape[1] - 1, -1) for h in self.outputs]
        elif resolve_layer(self.adapter, name, options.get("layer", "feature")) == "next":
            captured = next_layer_signals(self.adapter, self.outputs, name)
        else:
            captured = {"cls_attention": self.cls, "keys": self.keys, "attention_received": self.received}[name]
        if not captured:
            raise PruningError(
                f"no {name} was recorded: the images must be encoded by the patched model in this call"
            )
        captured = [c[options.get("heads", "mean")] if isinstance(c, dict) else c for c in captured]
        per_patch = torch.cat([c.reshape(-1, *c.shape[2:]).float() for c in captured])
        sources = self.adapter.token_sources(self, visual_counts, per_patch.shape[0])
        if len(sources) > 1 and len({src.shape for src in sources}) == 1:  # the batch at once, same operations
            return self._repeat(list(_from_sources(per_patch, torch.stack(list(sources))).unbind(0)), m)
        return self._repeat([_from_sources(per_patch, src) for src in sources], m)

    def grids(self, visual_counts: list[int]):
        m = self._sync(visual_counts)
        grids = self.adapter.grids(self, visual_counts[::m])
        return None if grids is None else self._repeat(grids, m)

    def units(self, visual_counts: list[int]) -> list[list[int]]:
        """Per sample, the token counts of its images and video frames, in sequence order."""
        m = self._sync(visual_counts)
        rows = None if self._ids is None else self._ids[::m]
        out = image_units(self.records, self.units_of, rows, visual_counts[::m], self.adapter.placeholder_of)
        return self._repeat(out, m)

    def unit_ids(self, visual_counts: list[int], per: str) -> list[BudgetUnits]:
        """``"crop"``: every crop of every split image is a unit (see :func:`~prunekit.adapters.units.crop_units`);
        other units as :class:`~prunekit.runtime.hooks.ModelHooks` defines them."""
        if per != "crop":
            return super().unit_ids(visual_counts, per)
        images = self.units(visual_counts)  # images and frames, per row; also checks the encodings match the prompt
        m = self._sync(visual_counts)
        crops = self.adapter.image_crops(self)
        if crops is None:
            raise PruningError(f"budget_per='crop' cannot apply to {type(self.adapter.model).__name__}: its images "
                               "are not split into crops")
        out = crop_units(self._ids[::m], images[::m], crops, self.adapter.placeholder_of(C.ENCODE_IMAGES.path),
                         self.adapter.visual_token_ids())
        return self._repeat(out, m)

    def end_of_prefill(self) -> None:
        self.records, self.units_of, self.cls, self.keys, self._ids, self._repeats_of = [], [], [], [], None, None
        self._calls, self._pending = [], self._empty()
        self.features, self.received, self.outputs = [], [], []

    def new_cache(self):
        return C.DYNAMIC_CACHE.get()(config=self.adapter.text_config())


def _from_sources(per_patch: Tensor, src: Tensor) -> Tensor:
    """Each token's value: the mean of its sources' rows of ``per_patch``, ``src`` ``[..., n, g]`` indices into it
    (-1: no source, e.g. a row break the model makes)."""
    src = src.to(per_patch.device)
    vals = per_patch[src.clamp_min(0)]
    valid = (src >= 0).to(vals.dtype).view(*src.shape, *([1] * (vals.dim() - src.dim())))
    return (vals * valid).sum(src.dim() - 1) / valid.sum(src.dim() - 1).clamp_min(1)
