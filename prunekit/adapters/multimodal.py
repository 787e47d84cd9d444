"""What the multimodal adapters share: finding the visual tokens, recording how images were encoded, reading a
vision encoder's [CLS] attention, and wiring everything to :class:`~prunekit.runtime.decoder.DecoderPruner`.

Not a plugin itself: each architecture's module subclasses :class:`MultimodalAdapter` and registers through its
own entry point.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from prunekit.interfaces import ModelAdapter, ModelSpec, Stage
from prunekit import contracts as C
from prunekit.contracts import Contract
from prunekit.errors import PruningError
from prunekit.runtime.decoder import DecoderPruner
from prunekit.runtime.hooks import BudgetUnits, ModelHooks, brings_images
from prunekit.runtime.generate import GenerateGuard
from prunekit.runtime.state import PerThread, ThreadStateMixin

#: Signals read from the vision encoder (the rest come from the language model's input or its layers).
VISION_SIGNALS = frozenset({"cls_attention", "keys", "attention_received", "cls_feature"})
#: ... of which these need a [CLS] token
CLS_SIGNALS = frozenset({"cls_attention", "keys", "cls_feature"})
#: ... of which these are read from an encoder layer's attention (option ``layer``: "feature", the layer whose
#: output the projector reads; "next", the layer after it, on that output; "last", the encoder's last layer, which
#: must be one of those two)
ATTENTION_SIGNALS = frozenset({"cls_attention", "keys", "attention_received"})
VISION_LAYERS = ("feature", "next", "last")


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


class _RefuseLabels:
    """A forward with ``labels`` would compare the logits of a pruned sequence with labels for the whole one."""

    def __init__(self, pruner: DecoderPruner) -> None:
        self.pruner = pruner

    def __call__(self, module, args, kwargs):
        if self.pruner.enabled and C.MODEL_LABELS.get(kwargs) is not None:
            raise PruningError(
                f"{self.pruner.method}: a forward with labels= computes the loss on logits of the pruned, shorter "
                "sequence against labels of the whole prompt; compute the loss from the returned logits (which "
                "positions were kept: prunekit.pruning_report(model)), or run the forward inside prunekit.disabled(model)"
            )
        return None


class _RotaryCall:
    """``rotary_emb(hidden, position_ids=pos)`` of one language model (a copyable object, not a closure)."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, hidden: Tensor, pos: Tensor):
        return self.module(hidden, position_ids=pos)


class VisualHooks(ThreadStateMixin, ModelHooks):
    """Generic :class:`ModelHooks`: the adapter says where things are, this class records them per call (and per
    thread: one patched model may serve several threads at once)."""

    _visual: Tensor | None = PerThread()  # [B, L] visual tokens of the model's current input
    _brings: bool = PerThread(bool)  # whether the current call brings images or videos
    _ids: Tensor | None = PerThread()  # the current call's input ids
    _from_embeddings: bool = PerThread(bool)  # whether the visual tokens were looked for in inputs_embeds
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
        self.handles: list[Any] = [self.inner.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
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
        """1, then every ``m`` such that the batch is each row repeated ``m`` times in a row."""
        B, out = len(visual_counts), [1]
        ids = self._ids
        for m in range(2, B + 1):
            if B % m or any(visual_counts[i] != visual_counts[i - i % m] for i in range(B)):
                continue
            if ids is not None and not all(torch.equal(ids[i], ids[i - i % m]) for i in range(B)):
                continue
            out.append(m)
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

    def _capture_inputs(self, module, args, kwargs):
        input_ids = C.MODEL_INPUT_IDS.get(kwargs, args[0] if args else None)
        self._brings = brings_images(kwargs)
        ids = torch.tensor(self.adapter.visual_token_ids())
        self._ids = input_ids
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
        for key, value in self._attention_signals(module, hidden, self._want_received).items():
            self._pending[key].append(value)
        return None

    def _capture_output(self, module, args, output):
        self._pending["outputs"].append(output[0] if isinstance(output, tuple) else output)
        return None

    def _attention_signals(self, module, hidden: Tensor, received: bool) -> dict[str, Any]:
        """The signals of the attention ``module`` on its input ``hidden`` ``[n, L, width]`` (after the layer's
        norm): ``cls`` and ``keys`` (with a [CLS] token) and ``received`` (when asked for)."""
        n, L, _ = hidden.shape
        heads, hd = self.adapter.attention_heads(module)
        rows = hidden if received else hidden[:, :1]
        q, k = C.VISION_Q_PROJ.get(module)(rows), C.VISION_K_PROJ.get(module)(hidden)
        if C.VISION_Q_NORM.has(module):  # InternViT normalises q and k before the heads split
            q, k = C.VISION_Q_NORM.get(module)(q), C.VISION_K_NORM.get(module)(k)
        whole_q, whole_k = q, k  # [n, rows, width], [n, L, width]: heads side by side
        q = q.view(n, -1, heads, hd).transpose(1, 2).float()
        k = k.view(n, L, heads, hd).transpose(1, 2).float()
        first = 1 if self.adapter.has_cls() else 0  # patches start after the [CLS] token
        out: dict[str, Any] = {}
        if first:
            probs = ((q[:, :, :1] @ k.transpose(-1, -2)) * hd**-0.5).softmax(-1)  # [n, H, 1, L]
            # heads="one": q and k over the whole width as a single head, scaled by width^-1/2 (PruMerge+'s code)
            one = (whole_q[:, :1].float() @ whole_k.float().transpose(-1, -2)) * whole_k.shape[-1] ** -0.5
            one = one.softmax(-1)  # [n, 1, L]
            out["cls"] = {"mean": probs.mean(1)[:, 0, 1:], "one": one[:, 0, 1:]}  # [CLS] → patches
            out["keys"] = {"mean": k.mean(1)[:, 1:], "one": whole_k[:, 1:]}
        if received:  # mean attention each patch receives from the patches, one head at a time
            out["received"] = torch.zeros(n, L - first, device=hidden.device)
            for h in range(heads):
                probs = ((q[:, h, first:] @ k[:, h].transpose(-1, -2)) * hd**-0.5).softmax(-1)
                out["received"] += probs[:, :, first:].mean(1) / heads
        return out

    def _layer(self, name: str, layer: str) -> str:
        """``layer``, with "last" resolved to "feature" or "next" (the encoder's last layer must be one of them)."""
        if layer != "last":
            return layer
        if self.adapter.vision_layer() is not None and self.adapter.vision_layer(1) is None:
            return "feature"
        if self.adapter.vision_layer(1) is not None and self.adapter.vision_layer(2) is None:
            return "next"
        raise PruningError(
            f"signal {name!r} with layer='last' is not available on {type(self.adapter.model).__name__}: its "
            "encoder's last layer is neither the one whose output the projector reads nor the one after it, or its "
            "adapter does not name its layers (layer='feature' and layer='next' read those two)"
        )

    def _next_layer_signals(self, name: str) -> list:
        """``name`` per tower pass from the layer after the feature layer: its norm and attention applied to the
        feature layer's output (that layer's input), without running the rest of it."""
        nxt = self.adapter.vision_layer(1)
        model = type(self.adapter.model).__name__
        if nxt is None:
            raise PruningError(
                f"signal {name!r} with layer='next' is not available on {model}: its encoder has no layer after the "
                "one whose output the projector reads, or its adapter does not name it (layer='feature' reads the "
                "feature layer itself)"
            )
        if not self.outputs:
            raise PruningError(f"no output of the feature layer was recorded for {name!r} with layer='next': the "
                               "images must be encoded by the patched model in this call")
        _, norm, attn = nxt
        key = {"cls_attention": "cls", "keys": "keys", "attention_received": "received"}[name]
        return [self._attention_signals(attn, norm(h), name == "attention_received")[key] for h in self.outputs]

    def images_in_call(self) -> bool:
        return self._brings

    def take_visual_mask(self) -> Tensor | None:
        visual, self._visual = self._visual, None
        return visual

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        if name not in VISION_SIGNALS:
            raise PruningError(
                f"signal {name!r} is not available before the language model of {type(self.adapter.model).__name__}"
            )
        # heads: [CLS] signals over the heads' mean, or "one" head over the whole width; layer: see VISION_LAYERS
        allowed = {"heads": ("mean", "one") if name in CLS_SIGNALS else ("mean",), "layer": VISION_LAYERS}
        allowed = allowed if name in ATTENTION_SIGNALS else {}
        for key, value in options.items():
            if key not in allowed:
                raise PruningError(f"signal {name!r} takes no option {key!r} (options: {sorted(allowed) or 'none'})")
            if value not in allowed[key]:
                raise PruningError(f"signal {name!r}: {key} must be one of {list(allowed[key])}, got {value!r}")
        m = self._sync(visual_counts)
        visual_counts = visual_counts[::m]
        if name == "cls_feature":  # every patch of a tower pass gets that pass's [CLS] row
            captured = [h[:, :1].expand(-1, h.shape[1] - 1, -1) for h in self.outputs]
        elif self._layer(name, options.get("layer", "feature")) == "next":
            captured = self._next_layer_signals(name)
        else:
            captured = {"cls_attention": self.cls, "keys": self.keys, "attention_received": self.received}[name]
        if not captured:
            raise PruningError(
                f"no {name} was recorded: the images must be encoded by the patched model in this call"
            )
        captured = [c[options.get("heads", "mean")] if isinstance(c, dict) else c for c in captured]
        per_patch = torch.cat([c.reshape(-1, *c.shape[2:]).float() for c in captured])
        sources = self.adapter.token_sources(self, visual_counts, per_patch.shape[0])
        out = []
        for src in sources:  # [n, g] indices into per_patch (-1: a token made by the model, e.g. a row break)
            src = src.to(per_patch.device)
            vals = per_patch[src.clamp_min(0)]
            valid = (src >= 0).to(vals.dtype).view(*src.shape, *([1] * (vals.dim() - 2)))
            vals = (vals * valid).sum(1) / valid.sum(1).clamp_min(1)
            out.append(vals)
        return self._repeat(out, m)

    def grids(self, visual_counts: list[int]):
        m = self._sync(visual_counts)
        grids = self.adapter.grids(self, visual_counts[::m])
        return None if grids is None else self._repeat(grids, m)

    def units(self, visual_counts: list[int]) -> list[list[int]]:
        """Per sample, the token counts of its images and video frames, in sequence order."""
        m = self._sync(visual_counts)
        sizes: dict[int, list[int]] = {}  # placeholder id -> unit sizes, in encoding order
        for (name, _), units in zip(self.records, self.units_of):
            sizes.setdefault(self.adapter.placeholder_of(name), []).extend(units)
        if self._ids is None or not sizes:
            raise PruningError(
                "budgets per image, frame or crop (budget_per='image', 'crop') need the images to be encoded by the "
                "patched model from input_ids in this call "
                "(no encoding of this prompt's images was recorded)"
            )
        queues = {t: iter(v) for t, v in sizes.items()}
        out = []
        for row in self._ids[::m]:
            units, left, kind = [], 0, None
            for t in row[torch.isin(row, torch.tensor(list(sizes), device=row.device))].tolist():
                if left == 0 or t != kind:
                    size = next(queues[t], None)
                    if size is None:
                        raise PruningError("the prompt holds more visual tokens than the encoded images and videos")
                    units.append(size)
                    left, kind = size, t
                left -= 1
            out.append(units)
        if [sum(u) for u in out] != list(visual_counts[::m]):
            raise PruningError(f"images and frames of {[sum(u) for u in out]} tokens do not match {visual_counts}")
        return self._repeat(out, m)

    def unit_ids(self, visual_counts: list[int], per: str) -> list[BudgetUnits]:
        """``"crop"``: every crop of every split image is a unit (its budget computed from the crop's patches);
        tokens of no crop (row breaks) are in none, so every stage keeps them as they are; other images and video
        frames are units as with ``"image"``."""
        if per != "crop":
            return super().unit_ids(visual_counts, per)
        images = self.units(visual_counts)  # images and frames, per row; also checks the encodings match the prompt
        m = self._sync(visual_counts)
        crops = self.adapter.image_crops(self)
        if crops is None:
            raise PruningError(f"budget_per='crop' cannot apply to {type(self.adapter.model).__name__}: its images "
                               "are not split into crops")
        crop_of, crop_size = crops
        crop_of = crop_of.cpu()
        image_id = self.adapter.placeholder_of(C.ENCODE_IMAGES.path)
        placeholders = torch.tensor(self.adapter.visual_token_ids())
        others = int(crop_of.max()) + 1 if crop_of.numel() else 0  # unit keys of non-crop units start here
        out, start = [], 0
        for row, sizes in zip(self._ids[::m], images[::m]):
            row = row.cpu()
            is_image = row[torch.isin(row, placeholders)] == image_id
            frame = BudgetUnits.contiguous(sizes).ids
            key = others + frame
            n_image = int(is_image.sum())
            key[is_image] = crop_of[start:start + n_image]
            start += n_image
            ids = torch.full_like(key, -1)
            present = key >= 0
            uniq, inverse = torch.unique(key[present], return_inverse=True)
            place = torch.arange(key.numel())[present]
            first = torch.full((uniq.numel(),), key.numel()).scatter_reduce(0, inverse, place, "amin")
            rank = torch.empty_like(first)
            rank[first.argsort()] = torch.arange(uniq.numel())
            ids[present] = rank[inverse]  # units numbered in sequence order
            unit_keys = uniq[first.argsort()].tolist()
            out.append(BudgetUnits(ids, [crop_size if k < others else sizes[k - others] for k in unit_keys]))
        if start != crop_of.numel():
            raise PruningError(f"the encoded images hold {crop_of.numel()} tokens but the prompts {start}")
        return self._repeat(out, m)

    def end_of_prefill(self) -> None:
        self.records, self.units_of, self.cls, self.keys, self._ids = [], [], [], [], None
        self._calls, self._pending = [], self._empty()
        self.features, self.received, self.outputs = [], [], []

    def new_cache(self):
        return C.DYNAMIC_CACHE.get()(config=self.adapter.text_config())


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
        return {
            "model": self.model, "inner": self.inner, "language_model": lm, "decoder_layer": layer,
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
                rotary=_RotaryCall(C.ROTARY_EMBEDDING.get(lm)),
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
        pruner.own(self.model.register_forward_pre_hook(_RefuseLabels(pruner), with_kwargs=True))
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
