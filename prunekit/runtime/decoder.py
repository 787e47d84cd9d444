"""Pruning visual tokens of a decoder-only language model with removable hooks.

One :class:`DecoderPruner` serves every adapter whose language model is a HF-style decoder (embeddings in,
``layers`` called with ``attention_mask``/``position_embeddings``/``position_ids`` keywords, a rotary module).

* Before the LLM (``after_projector``): a forward pre-hook on the language model removes visual rows from
  ``inputs_embeds`` and re-pads the batch on the left, with a matching 2D mask and position ids.
* Inside the LLM (``decoder_layer`` at K): a forward hook on layer K-1 gathers the kept rows of its output;
  pre-hooks on layers >= K slice the 4D mask and rotary embeddings to that shorter sequence. Cache layers then
  simply hold different lengths.
* Decode steps: ``generate`` keeps sending masks and position ids in unpruned coordinates. The pruner keeps the
  state of the prefill that filled a cache and maps every later call on that cache.

The adapter supplies only what is model-specific (:class:`ModelHooks`).
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import contracts as C
from ..errors import PruningError
from ..interfaces import Choice, Patch, Stage, StageContext
from ..flops import layer_cost
from ..report import PruningReport, StageRecord
from .attention import RATER_RULES, attention_rows, rows_of, select_raters
from .state import PerThread, ThreadStateMixin

__all__ = ["BudgetUnits", "DecoderPruner", "ModelHooks", "PruningError", "brings_images", "pad_left"]


class ModelHooks:
    """Model-specific services an adapter provides to :class:`DecoderPruner`."""

    def take_visual_mask(self) -> Tensor | None:
        """``[B, L]`` bool mask of the visual tokens in the current language-model input (then forget it)."""
        raise NotImplementedError

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        """A vision-side signal (``cls_attention``, ``keys``) before the LLM, per sample."""
        raise PruningError(f"signal {name!r} is not available before the LLM of this model")

    def vision_features(self, visual_counts: list[int]) -> list[Tensor]:
        """Per sample, the vision features the projector read for its visual tokens (``vision_features`` point)."""
        raise PruningError("this model does not offer the 'vision_features' insertion point")

    def project(self, values: Tensor) -> Tensor:
        """The model's projector applied to vision-feature rows ``[k, Dv]`` (for merged values)."""
        raise PruningError("this model cannot project merged vision features")

    def grids(self, visual_counts: list[int]) -> list[list[tuple[int, int]] | None] | None:
        """Per sample, the (rows, cols) patch grid of each image, when its tokens form plain grids."""
        return None

    def end_of_prefill(self) -> None:
        """Forget what was captured for this call (called after every language-model input is handled)."""

    def new_cache(self):
        """A fresh KV cache for a plain forward that did not pass one (so its returned cache can be continued)."""
        return None

    def input_mask_2d(self) -> Tensor | None:
        """The 2-D mask the model was called with, when it hands its language model prepared masks instead."""
        raise PruningError("this model hands its language model prepared attention masks, and its adapter "
                           "cannot rebuild them")

    def prepared_masks(self, kwargs: dict, mask_2d: Tensor, keep_rows: list[Tensor], length: int):
        """The model's own prepared masks for the pruned sequence (``keep_rows``: kept input rows per sample)."""
        raise PruningError("this model hands its language model prepared attention masks, and its adapter "
                           "cannot rebuild them")

    def prune_inputs(self, kwargs: dict, kept: list[Tensor], visual_positions: list[Tensor], length: int) -> None:
        """Prune the model's other per-visual-token language-model inputs alike (Qwen3-VL's deepstack features).
        ``kept``: per sample, kept indices into its visual tokens; ``visual_positions``: their new positions."""

    def found_by_embeddings(self) -> bool:
        """Whether the current call gave ``inputs_embeds`` instead of ids (placeholders were looked for there)."""
        return False

    def placeholder_description(self) -> str:
        """The placeholder tokens looked for, for error messages."""
        return "no placeholder ids known"

    def images_in_call(self) -> bool:
        """Whether the current call brought images or videos (a decode step's sampled token may merely equal a
        placeholder id, which the model then treats as text)."""
        return True

    def units(self, visual_counts: list[int]) -> list[list[int]]:
        """Per sample, the token counts of its images and video frames in sequence order (``budget_per="image"``)."""
        raise PruningError("this model's adapter cannot tell its images or video frames apart (budget_per='image')")

    def unit_ids(self, visual_counts: list[int], per: str) -> list["BudgetUnits"]:
        """Per sample, the budget unit of each visual token for ``budget_per=per`` (``"image"``: its images and
        video frames, from :meth:`units`; adapters add others, such as LLaVA-NeXT's ``"crop"``)."""
        if per == "image":
            return [BudgetUnits.contiguous(sizes) for sizes in self.units(visual_counts)]
        raise PruningError(f"this model's adapter cannot split its visual tokens into {per}s (budget_per={per!r})")


@dataclass
class BudgetUnits:
    """One sample's budget units: ``ids[i]`` is the unit of its visual token ``i`` (-1: a token of no unit, such
    as LLaVA-NeXT's row breaks under ``budget_per="crop"``, kept as it is by every stage); ``sizes[u]`` is the token
    count unit ``u``'s budget is computed from (a crop's patches before unpadding: it may exceed the tokens
    present, and a unit keeps all its tokens when its budget does)."""

    ids: Tensor
    sizes: list[int]

    @classmethod
    def contiguous(cls, sizes: list[int]) -> "BudgetUnits":
        """Units that follow each other in sequence order, of ``sizes`` tokens each."""
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        return cls(ids, list(sizes))


def brings_images(kwargs: dict) -> bool:
    """Whether a multimodal model's forward kwargs carry images or videos (raw or already encoded)."""
    if C.MODEL_ENCODER_OUTPUTS.get(kwargs):
        return True
    return any(k.get(kwargs) is not None for k in C.IMAGE_INPUTS)


@dataclass
class _Segment:
    """The sequence seen by decoder layers >= ``first_layer`` after an in-LLM pruning."""

    first_layer: int
    cols: Tensor  # [B, n]: indices into the LLM-input sequence (after any pruning before the LLM)
    shift: Tensor  # [B] tokens dropped inside the LLM up to here (subtracted from decode positions when renumbering)
    pos: Tensor  # [B, n, P] prefill position ids
    pad: Tensor | None = None  # [B, n] True where a row was left-padded because rows kept different counts

    def on(self, device) -> "_Segment":
        """This segment with its tensors on ``device`` (a model spread over devices meets them on each)."""
        if self.cols.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return _Segment(self.first_layer, move(self.cols), move(self.shift), move(self.pos), move(self.pad))


@dataclass
class _Generation:
    """What a pruned prefill leaves behind for the decode steps on the same cache."""

    cache: Any
    orig_len: int
    mask: Tensor | None  # [B, L1] 2D mask of the pruned prefill
    dropped: Tensor  # [B] visual tokens dropped before the LLM
    shift: Tensor  # [B] subtracted from incoming position ids
    segments: list[_Segment] = field(default_factory=list)

    @property
    def prefill_length(self) -> int:
        """Tokens the pruned prefill left in the cache's first layer."""
        return self.mask.shape[1] if self.mask is not None else self.orig_len


@dataclass
class _Call:
    mode: str  # "prefill" | "decode"
    pos: Tensor | None  # model-level position ids of this call, [B, q, P] (P = 1, or 3/4 rows of M-RoPE)
    style: int = 0  # how the model passed position ids: 0 = [B, q] (or none), P = [P, B, q]
    past: int = 0  # decode: tokens in the cache before this call (in the first layer's coordinates)
    valid: Tensor | None = None  # [B, L] prefill: non-pad tokens of the current segment
    vis_pos: list[Tensor] = field(default_factory=list)  # per sample: positions of its visual tokens
    vis_orig: list[Tensor] = field(default_factory=list)  # per sample: original visual index of each
    segments: list[_Segment] = field(default_factory=list)
    captured: dict[int, tuple] = field(default_factory=dict)  # layer -> (hidden_in, mask, position_embeddings)
    remapped: dict[int, dict] = field(default_factory=dict)  # segment index -> kwargs for its layers
    first_input: tuple | None = None  # prefill: (embeds [B, L, D], vis_pos, valid) at decoder layer 0's input
    report: PruningReport | None = None
    units: list[BudgetUnits] | None = None  # budget_per other than "prompt": per sample, its units

    def to(self, device) -> None:
        """Move the per-call tensors the layers index with to ``device``."""
        if self.pos is not None and self.pos.device != torch.device(device):
            self.pos = self.pos.to(device)
            self.valid = None if self.valid is None else self.valid.to(device)
            self.vis_pos = [v.to(device) for v in self.vis_pos]
            self.vis_orig = [v.to(device) for v in self.vis_orig]
            self.segments[:] = [seg.on(device) for seg in self.segments]


def _positions_in(pos: Tensor | None, B: int, L: int, device) -> tuple[Tensor, int]:
    """Position ids as ``[B, L, P]`` and the style to give them back in (0: ``[B, L]``, P: ``[P, B, L]``)."""
    if pos is None:
        return torch.arange(L, device=device)[None, :, None].expand(B, L, 1), 0
    if pos.dim() == 2:
        return pos.expand(B, L)[..., None], 0
    if pos.dim() == 3:
        return pos.expand(pos.shape[0], B, L).permute(1, 2, 0), pos.shape[0]
    raise PruningError(f"position_ids of shape {tuple(pos.shape)} are not supported")


def _positions_out(pos: Tensor, style: int) -> Tensor:
    return pos[..., 0] if style == 0 else pos.permute(2, 0, 1)


def _causal_pad_mask(pad_keys: Tensor, q: int) -> Tensor:
    """A boolean ``[B, 1, q, Lk]`` mask for the last ``q`` queries: causal, padding keys hidden, padding queries
    see themselves (for when the model passed no mask because its batch had no padding)."""
    Lk = pad_keys.shape[1]
    qi = torch.arange(Lk - q, Lk, device=pad_keys.device)[:, None]
    kj = torch.arange(Lk, device=pad_keys.device)[None]
    allowed = (kj <= qi)[None] & ~pad_keys[:, None, :]
    allowed = allowed | ((kj == qi)[None] & pad_keys[:, Lk - q :, None])
    return allowed[:, None]


def _hide_pads(mask: Tensor, pad_keys: Tensor) -> Tensor:
    """``mask`` (``[B, H, q, Lk]``, bool or additive) with padding keys hidden; padding queries see themselves."""
    B, _, q, Lk = mask.shape
    own = torch.zeros(B, 1, q, Lk, dtype=torch.bool, device=mask.device)
    qi = torch.arange(Lk - q, Lk, device=mask.device)
    own[:, 0, torch.arange(q, device=mask.device), qi] = pad_keys[:, Lk - q :]
    hide = pad_keys[:, None, None, :] & ~own
    if mask.dtype == torch.bool:
        return (mask & ~hide) | own
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min).masked_fill(own, 0.0)


def pad_left(rows: list[Tensor], length: int, value) -> Tensor:
    """Rows of different lengths (``[n_i, ...]``) stacked into ``[B, length, ...]``, padded on the left."""
    out = []
    for r in rows:
        pad = length - r.shape[0]
        if pad:
            r = torch.cat([r.new_full((pad, *r.shape[1:]), value), r])
        out.append(r)
    return torch.stack(out)


class DecoderPruner(ThreadStateMixin, Patch):
    # per call, per thread: the prefill being run on the current cache, and the call in flight
    _gen: "_Generation | None" = PerThread()
    _call: "_Call | None" = PerThread()

    def __init__(
        self,
        *,
        method: str,
        language_model: torch.nn.Module,
        layers: Sequence[torch.nn.Module],
        rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        stages: Sequence[Stage],
        positions: str,
        hooks: ModelHooks,
        extra_handles: Sequence[Any] = (),
        budget_per: str = "prompt",
        budget: Callable[[int], float] | None = None,
        budget_meaning: str = "nominal",
    ) -> None:
        if budget_per not in ("prompt", "image", "crop"):
            raise ValueError(
                f"budget_per must be 'prompt', 'image' or 'crop' (resolve 'auto' first), got {budget_per!r}"
            )
        self.budget_per = budget_per
        #: the nominal budget of a sample with n visual tokens, and what it counts (for the report)
        self.budget, self.budget_meaning = budget, budget_meaning
        self.method = method
        self.lm = language_model
        self.layers = list(layers)
        self._costs = [layer_cost(layer) for layer in self.layers]
        self.rotary = rotary
        self.positions = positions
        self.hooks = hooks
        self.enabled = True
        self.pre_stages = [s for s in stages if s.layer is None]
        self.layer_stages = sorted((s for s in stages if s.layer is not None), key=lambda s: s.layer)
        if len(self.pre_stages) > 1:
            raise ValueError("at most one stage can prune before the LLM")
        #: every KV cache a pruned prefill filled -> what its decode steps need (any of them can be continued)
        self._gens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._report: PruningReport | None = None
        self._handles = list(extra_handles)
        self._handles.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._handles.append(self.lm.register_forward_hook(self._lm_post))
        if self.layer_stages:
            first = self.layer_stages[0].layer - 1
            prune_after = frozenset(s.layer - 1 for s in self.layer_stages)
            for j in range(first, len(self.layers)):
                pre = functools.partial(self._layer_pre, j, j in prune_after)
                self._handles.append(self.layers[j].register_forward_pre_hook(pre, with_kwargs=True))
            for stage in self.layer_stages:
                post = functools.partial(self._layer_post, stage)
                self._handles.append(self.layers[stage.layer - 1].register_forward_hook(post, with_kwargs=True))

    # -- copies -------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "DecoderPruner":
        """``copy.deepcopy`` of a patched model copies its patch along: the copy's hooks (partials of bound
        methods, not closures) run the copied pruner on the copied modules, and removing either patch leaves the other in place."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._gens = weakref.WeakKeyDictionary()  # the caches it filled belong to the original
        return new

    def __reduce_ex__(self, protocol):
        raise PruningError(
            f"a model patched by prunekit ({self.method}) cannot be pickled: its hooks run prunekit code that a "
            "pickle would not carry. Pickle the unpatched model (prunekit.remove(model)) and call prunekit.build "
            "again after loading it"
        )

    # -- Patch interface ----------------------------------------------------------------------------
    def own(self, handle: Any) -> None:
        """Remove ``handle`` (anything with ``remove()``) together with this patch."""
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._gen = self._call = None
        self._gens = weakref.WeakKeyDictionary()

    def _input_mask(self, kwargs: dict) -> tuple[Tensor | None, bool]:
        """The attention mask at the language model's input, and whether the model had built its masks before the
        LLM (Gemma3; the 2D mask then comes from the adapter)."""
        mask = C.LM_ATTENTION_MASK.get(kwargs)
        if isinstance(mask, dict):
            return self.hooks.input_mask_2d(), True
        return mask, False

    def _new_report(self, n_visual: list[int], embeds: Tensor, mask: Tensor | None,
                    enabled: bool = True) -> PruningReport:
        """An empty report for this prefill: budgets, sequence lengths and layer costs filled in."""
        if isinstance(mask, Tensor) and mask.dim() == 2:
            lengths = [int(x) for x in mask.bool().sum(1).tolist()]
        else:
            lengths = [int(embeds.shape[1])] * int(embeds.shape[0])
        return PruningReport(
            self.method, len(self.layers), n_visual, enabled=enabled,
            budget=[None if self.budget is None else float(self.budget(n)) for n in n_visual],
            budget_meaning=self.budget_meaning, budget_per=self.budget_per, sequence_lengths=lengths,
            layer_costs=self._costs,
        )

    @property
    def report(self) -> PruningReport | None:
        return self._report

    # -- language-model level -------------------------------------------------------------------------
    def _lm_post(self, module, args, output):
        call, self._call = self._call, None
        if call is not None and call.mode == "prefill" and call.report is not None and self.enabled:
            self._check_prefill(call.report, output)

    def _check_prefill(self, report: PruningReport, output) -> None:
        """Raise unless every stage ran on a prefill that held visual tokens, and the model kept the cache whose
        decode steps will be mapped: prunekit never runs unpruned while claiming to prune."""
        if not sum(report.visual_tokens):
            return
        ran = {r.layer for r in report.stages}
        missing = [s.label or s.point for s in self.pre_stages if None not in ran]
        missing += [f"{s.label or s.point} at layer {s.layer}" for s in self.layer_stages if s.layer not in ran]
        if missing:
            raise PruningError(
                f"{self.method}: the prefill held {report.visual_tokens} visual tokens but {missing} did not run "
                f"(transformers {C.installed()}; prunekit supports {C.SUPPORTED}): the decoder layers prunekit "
                "hooked were not called as expected, so nothing was pruned there"
            )
        gen = self._gen
        used = C.OUTPUT_CACHE.get(output, None)
        if gen is not None and used is not None and gen.cache() is not used:
            raise C.LM_CACHE.error(
                f"the language model did not use the KV cache prunekit passed as {C.LM_CACHE.key!r}, so its decode "
                "steps could not be mapped onto the pruned prefill"
            )

    def _lm_pre(self, module, args, kwargs):
        try:
            return self._lm_pre_inner(args, kwargs)
        finally:
            self.hooks.end_of_prefill()

    def _lm_pre_inner(self, args, kwargs):
        self._call = None
        visual = self.hooks.take_visual_mask()
        embeds = C.LM_INPUTS_EMBEDS.get(kwargs)
        cache = C.LM_CACHE.get(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if not self.enabled:
            self._gen = None
            if visual is not None and past == 0:  # pruning_report() tells that this prefill ran unpruned
                self._report = self._new_report(visual.sum(1).tolist(), C.LM_INPUTS_EMBEDS.get(kwargs),
                                                self._input_mask(kwargs)[0], enabled=False)
            return None
        self._gen = self._gens.get(cache) if cache is not None else None
        if visual is not None and past == 0:
            if bool(visual.any()):
                self._refuse_unsupported(cache)
            elif self.hooks.images_in_call():
                raise PruningError(
                    f"{self.method}: this call brings images or videos, but none of its tokens is a visual "
                    f"placeholder ({self.hooks.placeholder_description()}; transformers {C.installed()}, prunekit "
                    f"supports {C.SUPPORTED}): prunekit cannot find the visual tokens to prune"
                )
            elif self.hooks.found_by_embeddings():
                raise PruningError(
                    f"{self.method}: the model was called with inputs_embeds that hold no image placeholder "
                    "embedding; prunekit finds visual tokens by their placeholders, so it cannot tell merged image "
                    "features from text. Pass input_ids (and the images) instead, or run text-only embeddings "
                    "inside prunekit.disabled(model)"
                )
        if visual is not None and embeds is not None and past == 0:
            return (args, kwargs) if self._prefill(kwargs, visual) else None
        if visual is not None and bool(visual.any()) and self.hooks.images_in_call():
            raise PruningError(
                "visual tokens arrived after cached tokens; prunekit prunes images in the prefill only"
            )
        if self._gen is not None:
            self._decode(kwargs, past)
            return (args, kwargs)
        return None

    def _prefill(self, kwargs: dict, visual: Tensor) -> bool:
        embeds: Tensor = C.LM_INPUTS_EMBEDS.get(kwargs)
        B, L, _ = embeds.shape
        device = embeds.device
        mask2d, prepared = self._input_mask(kwargs)
        if mask2d is not None and mask2d.dim() != 2:
            raise PruningError("prunekit needs a 2D attention mask (or none) at the language model's input")
        pos, style = _positions_in(C.LM_POSITION_IDS.get(kwargs), B, L, device)
        if style > 1 and self.positions == "renumber":
            raise PruningError(
                "positions='renumber' is not defined for multi-row (M-RoPE) position ids; use positions='original'"
            )
        visual = visual.to(device)
        n_visual = visual.sum(1).tolist()
        report = self._new_report(n_visual, embeds, mask2d)
        self._report = report
        vis_pos = [visual[b].nonzero().squeeze(1) for b in range(B)]
        per_unit = self.budget_per != "prompt" and sum(n_visual)
        units = self.hooks.unit_ids(n_visual, self.budget_per) if per_unit else None
        call = _Call(
            mode="prefill", pos=pos, style=style, report=report,
            valid=torch.ones(B, L, dtype=torch.bool, device=device) if mask2d is None else mask2d.bool(),
            vis_pos=vis_pos, vis_orig=[torch.arange(n, device=device) for n in n_visual], units=units,
        )
        self._gen = None
        changed = False
        if self.pre_stages and sum(n_visual):
            stage = self.pre_stages[0]
            on_vision = stage.point == "vision_features"
            if on_vision:
                feats = self.hooks.vision_features(n_visual)
            else:
                feats = [embeds[b, vis_pos[b]] for b in range(B)]
            kept, values, merged, as_is = self._stage(
                stage, call, feats, n_visual,
                lambda name, opts: self._pre_signal(name, opts, n_visual, embeds, vis_pos, call.valid),
                self.hooks.grids(n_visual),
            )
            report.stages.append(StageRecord(
                stage.label, stage.point, None, [call.vis_orig[b][kept[b]] for b in range(B)], merged
            ))
            written = self._write_values(embeds, vis_pos, kept, values, self.hooks.project if on_vision else None,
                                         as_is)
            if written is not None:
                embeds = written
                C.LM_INPUTS_EMBEDS.set(kwargs, written)
                changed = True
            dropped = torch.tensor([n - k.numel() for n, k in zip(n_visual, kept)], device=device)
            if bool(dropped.any()):
                changed = True
                drop = visual.clone()
                for b in range(B):
                    drop[b, vis_pos[b][kept[b]]] = False
                keep_rows = [(~drop[b]).nonzero().squeeze(1) for b in range(B)]
                L1 = max(r.numel() for r in keep_rows)
                valid = call.valid
                new_embeds = pad_left([embeds[b, keep_rows[b]] for b in range(B)], L1, 0.0)
                new_valid = pad_left([valid[b, keep_rows[b]] for b in range(B)], L1, False)
                if self.positions == "renumber":  # close the gaps: subtract the tokens dropped before each one
                    src = pos - drop.long().cumsum(1)[..., None]
                else:
                    src = pos
                new_pos = pad_left([src[b, keep_rows[b]] for b in range(B)], L1, 1)
                new_mask = new_valid.to(mask2d.dtype if mask2d is not None else torch.long)
                C.LM_INPUTS_EMBEDS.set(kwargs, new_embeds)
                C.LM_ATTENTION_MASK.set(kwargs, new_mask)
                C.LM_POSITION_IDS.set(kwargs, _positions_out(new_pos, style))
                cache = self._ensure_cache(kwargs)
                if prepared:  # the model's own masks, rebuilt for the shorter sequence
                    C.LM_ATTENTION_MASK.set(kwargs, self.hooks.prepared_masks(kwargs, new_mask, keep_rows, L1))
                new_vis = [L1 - keep_rows[b].numel()
                           + torch.searchsorted(keep_rows[b], vis_pos[b][kept[b].sort().values]) for b in range(B)]
                self.hooks.prune_inputs(kwargs, kept, new_vis, L1)
                call.vis_pos = new_vis
                call.vis_orig = [call.vis_orig[b][kept[b]] for b in range(B)]
                call.valid = new_valid
                call.pos = new_pos
                shift = dropped if self.positions == "renumber" else torch.zeros_like(dropped)
                if cache is not None:
                    self._gen = self._gens[cache] = _Generation(weakref.ref(cache), L, new_mask, dropped, shift)
        if self.layer_stages and self._gen is None:
            had_cache = C.LM_CACHE.get(kwargs) is not None
            cache = self._ensure_cache(kwargs)
            changed = changed or (cache is not None and not had_cache)
            if cache is not None:
                zero = torch.zeros(B, dtype=torch.long, device=device)
                self._gen = self._gens[cache] = _Generation(weakref.ref(cache), L, mask2d, zero, zero)
        if self.layer_stages:  # for the layer_input signal's layer="first"
            call.first_input = (C.LM_INPUTS_EMBEDS.get(kwargs), call.vis_pos, call.valid)
        self._call = call
        return changed

    def _ensure_cache(self, kwargs: dict):
        """The call's KV cache; a plain forward that would make its own gets ours, so its decode steps map too."""
        cache = C.LM_CACHE.get(kwargs)
        if cache is None and C.LM_USE_CACHE.get(kwargs, True) is not False:
            cache = self.hooks.new_cache()
            if cache is not None:
                C.LM_CACHE.set(kwargs, cache)
        return cache

    def _refuse_unsupported(self, cache) -> None:
        """Raise, naming the option, for what a pruned prefill cannot serve (rather than answer wrongly)."""
        static = C.STATIC_CACHE.get()
        if cache is not None and isinstance(cache, static):
            raise PruningError(
                f"{self.method}: a {type(cache).__name__} (generate's cache_implementation='static') keeps one slot "
                "per prompt position, but prunekit leaves fewer tokens in the cache than the prompt has; use the "
                "default dynamic cache (leave cache_implementation unset)"
            )
        if self.layer_stages and torch.is_grad_enabled() and C.GRADIENT_CHECKPOINTING.get(self.lm, False) and \
                self.lm.training:
            raise PruningError(
                f"{self.method}: gradient checkpointing recomputes decoder layers during backward, outside the "
                "forward whose in-LLM pruning prunekit hooks, so the recomputed layers would see the wrong sequence; "
                "disable it (model.gradient_checkpointing_disable()) or prune before the LLM only "
                "(insertion_points=['after_projector'])"
            )

    def map_decode_mask(self, mask: Tensor, gen: "_Generation | None" = None) -> Tensor:
        """A decode step's 2-D mask (unpruned coordinates) mapped onto the pruned cache."""
        gen = gen if gen is not None else self._gen
        assert gen is not None and gen.mask is not None
        return torch.cat([gen.mask.to(mask.device), mask[:, gen.orig_len :]], dim=1)

    def generation_for(self, cache) -> "_Generation | None":
        """The pruned prefill that filled ``cache`` (None when this patch did not prune it)."""
        return None if cache is None else self._gens.get(cache)

    def _decode(self, kwargs: dict, past: int) -> None:
        gen = self._gen
        assert gen is not None
        mask = C.LM_ATTENTION_MASK.get(kwargs)
        embeds = C.LM_INPUTS_EMBEDS.get(kwargs)
        q = embeds.shape[1] if embeds is not None else C.LM_INPUT_IDS.get(kwargs).shape[1]
        if isinstance(mask, Tensor) and gen.mask is not None and mask.dim() == 2:
            C.LM_ATTENTION_MASK.set(kwargs, self.map_decode_mask(mask))
        pos = C.LM_POSITION_IDS.get(kwargs)
        device = (embeds if embeds is not None else C.LM_INPUT_IDS.get(kwargs)).device
        if pos is None:  # what the unpatched model would use: the unpruned sequence continued
            base = gen.orig_len + past - gen.prefill_length
            pos = base + torch.arange(q, device=device)[None].expand(gen.dropped.shape[0], q)
        pos, style = _positions_in(pos.to(device), gen.dropped.shape[0], q, device)
        pos = pos - gen.shift.to(device)[:, None, None]
        C.LM_POSITION_IDS.set(kwargs, _positions_out(pos, style))
        self._call = _Call(mode="decode", pos=pos, style=style, past=past, segments=gen.segments)

    # -- decoder layers ---------------------------------------------------------------------------------
    def _segment_for(self, call: _Call, j: int) -> int | None:
        idx = None
        for i, seg in enumerate(call.segments):
            if seg.first_layer <= j:
                idx = i
        return idx

    def _remap(self, call: _Call, idx: int, hidden: Tensor, kwargs: dict) -> dict:
        if idx in call.remapped:
            return call.remapped[idx]
        seg = call.segments[idx].on(hidden.device)
        mask = C.LAYER_ATTENTION_MASK.get(kwargs)
        cos, sin = C.LAYER_POSITION_EMBEDDINGS.get(kwargs)
        B = seg.cols.shape[0]
        if call.mode == "prefill":
            cols = seg.cols
            n = cols.shape[1]
            if mask is not None:
                m = mask.expand(B, *mask.shape[1:])
                H, Lk = m.shape[1], m.shape[3]
                m = m.gather(2, cols[:, None, :, None].expand(B, H, n, Lk))
                mask = m.gather(3, cols[:, None, None, :].expand(B, H, n, n))
                if seg.pad is not None:
                    mask = _hide_pads(mask, seg.pad)
            elif seg.pad is not None:
                mask = _causal_pad_mask(seg.pad, n)
            pos = seg.pos
            if self.positions == "renumber":
                emb = self.rotary(hidden, _positions_out(pos, call.style))
            else:  # gather the rows of (cos, sin) along their sequence axis (-2), whatever leads it (M-RoPE: 3 rows)
                def take(t: Tensor) -> Tensor:
                    t = t.expand(*t.shape[:-3], B, *t.shape[-2:])
                    idx3 = cols[:, :, None].expand(B, n, t.shape[-1])
                    return t.gather(-2, idx3.expand(*t.shape[:-3], B, n, t.shape[-1]))

                emb = (take(cos), take(sin))
        else:
            L1 = self._gen.prefill_length
            if mask is not None or seg.pad is not None:
                if mask is not None:
                    m = mask.expand(B, *mask.shape[1:])
                    Lk = m.shape[3]
                else:
                    Lk = call.past + hidden.shape[1]
                extra = torch.arange(L1, Lk, device=seg.cols.device)[None].expand(B, -1)
                keys = torch.cat([seg.cols, extra], 1)
                pad_keys = None if seg.pad is None else torch.cat([seg.pad, torch.zeros_like(extra, dtype=torch.bool)], 1)
                if mask is not None:
                    mask = m.gather(3, keys[:, None, None, :].expand(B, m.shape[1], m.shape[2], keys.shape[1]))
                    if pad_keys is not None:
                        mask = _hide_pads(mask, pad_keys)
                else:
                    mask = _causal_pad_mask(pad_keys, hidden.shape[1])
            pos = call.pos.to(hidden.device) - seg.shift[:, None, None]
            shifted = self.positions == "renumber" and bool(seg.shift.any())
            emb = self.rotary(hidden, _positions_out(pos, call.style)) if shifted else (cos, sin)
        out = {C.LAYER_ATTENTION_MASK.key: mask, C.LAYER_POSITION_EMBEDDINGS.key: emb}
        if C.LAYER_POSITION_IDS.get(kwargs) is not None:
            out[C.LAYER_POSITION_IDS.key] = pos[..., 0]
        call.remapped[idx] = out
        return out

    def _layer_pre(self, j: int, prunes_after: bool, module, args, kwargs):
        call = self._call
        if call is None or not self.enabled:
            return None
        hidden = args[0] if args else C.LAYER_HIDDEN_STATES.get(kwargs)
        idx = self._segment_for(call, j)
        changed = False
        if idx is not None:
            kwargs.update(self._remap(call, idx, hidden, kwargs))
            changed = True
        if call.mode == "prefill" and prunes_after:
            call.captured[j] = (hidden, C.LAYER_ATTENTION_MASK.get(kwargs),
                                C.LAYER_POSITION_EMBEDDINGS.get(kwargs))
        return (args, kwargs) if changed else None

    def _layer_post(self, stage: Stage, module, args, kwargs, output):
        j = stage.layer - 1
        call = self._call
        if call is None or call.mode != "prefill" or not self.enabled or call.report is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        B = hidden.shape[0]
        n_orig = call.report.visual_tokens
        if not sum(n_orig):
            return None
        call.to(hidden.device)  # a model spread over devices: this layer's device
        feats = [hidden[b, call.vis_pos[b]] for b in range(B)]
        kept, values, merged, as_is = self._stage(
            stage, call, feats, n_orig, lambda name, opts: self._layer_signal(call, module, j, name, opts, hidden)
        )
        call.report.stages.append(StageRecord(
            stage.label, stage.point, stage.layer, [call.vis_orig[b][kept[b]] for b in range(B)], merged
        ))
        n_now = [f.shape[0] for f in feats]
        written = self._write_values(hidden, call.vis_pos, kept, values, as_is=as_is)
        if written is not None:
            hidden = written
        elif all(k.numel() == n for k, n in zip(kept, n_now)):
            return None
        Lc = hidden.shape[1]
        prev = call.segments[-1] if call.segments else None
        keep_mask = torch.ones(B, Lc, dtype=torch.bool, device=hidden.device)
        drop = torch.zeros(B, Lc, dtype=torch.bool, device=hidden.device)
        if prev is not None and prev.pad is not None:
            keep_mask &= ~prev.pad
        for b in range(B):
            keep_mask[b, call.vis_pos[b]] = False
            keep_mask[b, call.vis_pos[b][kept[b]]] = True
            drop[b, call.vis_pos[b]] = True
            drop[b, call.vis_pos[b][kept[b]]] = False
        rows_b = [keep_mask[b].nonzero().squeeze(1) for b in range(B)]
        n = max(r.numel() for r in rows_b)
        lead = [n - r.numel() for r in rows_b]  # rows keeping fewer tokens are padded on the left
        rows = pad_left(rows_b, n, 0)
        pad = None
        if any(lead):
            pad = pad_left([torch.zeros(r.numel(), dtype=torch.bool, device=r.device) for r in rows_b], n, True)
        cols = rows if prev is None else prev.cols.gather(1, rows)
        base_pos = call.pos if prev is None else prev.pos
        if self.positions == "renumber":  # subtract the visual tokens dropped before each kept token
            base_pos = base_pos - drop.long().cumsum(1)[..., None]
        new_pos = base_pos.gather(1, rows[:, :, None].expand(B, n, base_pos.shape[2]))
        shift = torch.zeros(B, dtype=torch.long, device=hidden.device) if prev is None else prev.shift
        if self.positions == "renumber":
            shift = shift + drop.sum(1)
        seg = _Segment(stage.layer, cols, shift, new_pos, pad)
        call.segments.append(seg)
        if self._gen is not None:
            self._gen.segments.append(seg)
        call.vis_pos = [lead[b] + torch.searchsorted(rows_b[b], call.vis_pos[b][kept[b].sort().values])
                        for b in range(B)]
        call.vis_orig = [call.vis_orig[b][kept[b]] for b in range(B)]
        call.valid = pad_left([call.valid[b, rows_b[b]] for b in range(B)], n, False)
        new_hidden = pad_left([hidden[b, rows_b[b]] for b in range(B)], n, 0.0)
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

    @staticmethod
    def _text_after(vis: Tensor, valid: Tensor) -> Tensor:
        """Positions of the (non-pad) text tokens after a sample's last visual token: its instruction."""
        positions = torch.arange(valid.shape[0], device=valid.device)
        last = int(vis.max()) if vis.numel() else -1
        return positions[(positions > last) & valid]

    @classmethod
    def _text_similarity(cls, embeds: Tensor, vis: Tensor, valid: Tensor) -> Tensor:
        """Mean cosine similarity of each visual token's LLM-input embedding to the instruction's embeddings
        (the text after the last visual token; all text when there is none after it)."""
        text = cls._text_after(vis, valid)
        if text.numel() == 0:
            other = valid.clone()
            other[vis] = False
            text = other.nonzero().squeeze(1)
        if text.numel() == 0:
            raise PruningError("'text_similarity' needs text tokens in the prompt")
        v = torch.nn.functional.normalize(embeds[vis].float(), dim=-1)
        t = torch.nn.functional.normalize(embeds[text].float(), dim=-1)
        return (v @ t.T).mean(1)

    def _pre_signal(self, name, options, n_visual, embeds, vis_pos, valid) -> list[Tensor]:
        if name == "text_embeddings":
            return [embeds[b, self._text_after(vis_pos[b], valid[b])] for b in range(embeds.shape[0])]
        if name == "text_similarity":
            return [self._text_similarity(embeds[b], vis_pos[b], valid[b]) for b in range(embeds.shape[0])]
        return self.hooks.projector_signal(name, options, n_visual)

    #: signals inside the decoder and the options each takes (value -> allowed values)
    LAYER_SIGNALS = {
        "text_attention": {"raters": RATER_RULES, "layer": ("previous", "next"), "per_rater": (False, True)},
        "keys": {"tokens": ("visual", "text"), "rope": (False, True)},
        "states": {"tokens": ("visual", "text"), "final_norm": (False, True)},
        "positions": {"tokens": ("visual", "text")},
        "text_states": {},
        "layer_input": {"tokens": ("visual", "text"), "layer": ("first", "previous", "next"),
                        "input_norm": (False, True)},
    }

    def _layer_signal(self, call: _Call, layer, j: int, name: str, options: dict, hidden_out: Tensor) -> list[Tensor]:
        """A signal at the boundary between layer ``j`` (K-1) and ``j + 1`` (K, the first to see the pruned tokens).

        ``text_attention``: attention of the raters (``raters=last_token|all_text``) to the visual tokens, mean over
        heads, recomputed for the rater rows; by ``layer="previous"`` (K-1 on its input, as its forward computed it)
        or ``"next"`` (K on its input, before K runs); mean over the raters, or ``per_rater=True``: one column per
        rater, ``[n_visual, raters]`` (a method that picks raters by a rule of its own asks for all_text's columns).
        ``keys``: K-1's keys of the visual or text tokens (``rope=True``: after the rotary embedding, heads side by
        side). ``states``: K-1's output rows of the visual or text tokens (``final_norm=True``: through the language
        model's final norm). ``positions``: where the visual or text tokens sit in the sequence, counted from its
        first (non-padding) token. ``text_states``: K-1's output rows of the instruction. ``layer_input``: a
        decoder layer's input rows of the visual tokens present at that layer or of the instruction, for the whole
        prompt (never split per image): ``layer="first"`` (layer 0: the language model's input embeddings, with
        every visual token it received), ``"previous"`` (K-1) or ``"next"`` (K); ``input_norm=True``: through that
        layer's input norm."""
        allowed = self.LAYER_SIGNALS.get(name)
        if allowed is None:
            raise PruningError(
                f"signal {name!r} is not available inside the decoder (offered: {', '.join(self.LAYER_SIGNALS)})"
            )
        for key, value in options.items():
            if key in allowed and value not in allowed[key]:
                raise PruningError(f"signal {name!r}: {key} must be one of {list(allowed[key])}, got {value!r}")
        if name == "text_attention" and "raters" not in options:
            raise PruningError(f"signal 'text_attention' needs raters= one of {list(RATER_RULES)}")
        hidden_in, mask, pos_emb = call.captured[j]
        if name == "layer_input":
            return self._layer_input(call, j, options, hidden_in, hidden_out)
        out = []
        for b in range(hidden_in.shape[0]):
            vis = call.vis_pos[b]
            text = self._text_after(vis, call.valid[b])
            rows = vis if options.get("tokens", "visual") == "visual" else text
            if name == "text_states":
                out.append(hidden_out[b, text])
            elif name == "positions":  # counted from the row's first token (left padding does not count)
                out.append(rows - int(call.valid[b].long().argmax()))
            elif name == "states":
                states = hidden_out[b, rows]
                out.append(C.FINAL_NORM.get(self.lm)(states) if options.get("final_norm", False) else states)
            elif name == "keys":
                out.append(self._keys(layer, hidden_in, pos_emb, b, rows, options.get("rope", False)))
            else:
                per_rater = options.get("per_rater", False)
                if vis.numel() == 0 and not per_rater:
                    out.append(torch.zeros(0, device=hidden_in.device))
                    continue
                raters = select_raters(options["raters"], text)
                if vis.numel() == 0:
                    out.append(torch.zeros(0, raters.numel(), device=hidden_in.device))
                    continue
                rater_layer, states = layer, hidden_in
                if options.get("layer", "previous") == "next":
                    rater_layer, states = self.layers[j + 1], hidden_out
                probs = attention_rows(rater_layer, states, pos_emb, mask, b, raters)  # [H, R, L]
                out.append(probs.mean(0)[:, vis].T if per_rater else probs.mean((0, 1))[vis])
        return out

    def _layer_input(self, call: _Call, j: int, options: dict, hidden_in: Tensor, hidden_out: Tensor) -> list[Tensor]:
        """The ``layer_input`` signal (see :meth:`_layer_signal`), per sample."""
        where = options.get("layer", "previous")
        if where == "first":
            states, vis_pos, valid = call.first_input
            norm_layer = self.layers[0]
        else:
            vis_pos, valid = call.vis_pos, call.valid
            states, norm_layer = (hidden_in, self.layers[j]) if where == "previous" else \
                (hidden_out, self.layers[j + 1])
        out = []
        for b in range(states.shape[0]):
            vis = vis_pos[b].to(states.device)
            text = options.get("tokens", "visual") == "text"
            rows = self._text_after(vis, valid[b].to(states.device)) if text else vis
            x = states[b, rows]
            out.append(C.INPUT_NORM.get(norm_layer)(x) if options.get("input_norm", False) else x)
        return out

    @staticmethod
    def _keys(layer, hidden_in: Tensor, pos_emb, b: int, rows: Tensor, rope: bool) -> Tensor:
        """Layer keys of ``rows`` of sample ``b``: ``[R, kv_heads * head_dim]`` (after the rotary embedding if
        ``rope``)."""
        attn = C.SELF_ATTENTION.get(layer)
        keys = C.K_PROJ.get(attn)(C.INPUT_NORM.get(layer)(hidden_in[b, rows]))
        if not rope:
            return keys
        head_dim = C.HEAD_DIM.get(attn)
        k = keys.view(1, rows.numel(), -1, head_dim).transpose(1, 2)  # [1, kv_heads, R, hd]
        if C.K_NORM.has(attn):
            k = C.K_NORM.get(attn)(k.transpose(1, 2)).transpose(1, 2)
        cos, sin = pos_emb
        k = C.ATTENTION_ROTARY.get(attn)(k, rows_of(cos, b, rows), rows_of(sin, b, rows))
        return k.transpose(1, 2).reshape(rows.numel(), -1)

    # -- shared ---------------------------------------------------------------------------------------------
    #: signals with one row per visual token of the stage (split per image / frame); others describe the prompt
    PER_TOKEN_SIGNALS = frozenset({"cls_attention", "keys", "text_attention", "text_similarity", "states",
                                   "positions", "attention_received", "cls_feature"})

    def _stage(self, stage: Stage, call: _Call, feats: list[Tensor], n_orig: list[int], signal, grids=None):
        """Run ``stage`` on every sample (``budget_per="prompt"``) or on every unit (image, video frame, crop) of
        every sample, each unit alone. Tokens of no unit (LLaVA-NeXT's row breaks under ``"crop"``) are kept as they
        are, outside every budget. Returns kept, values, merged (see :meth:`_choose`) and, per sample, None or a
        mask over the kept tokens of those kept as they are (their rows are never rewritten)."""
        current = [f.shape[0] for f in feats]
        if call.units is None:
            ctx = StageContext(stage, feats, self._budgets(stage, n_orig, current), signal, grids=grids)
            return (*self._choose(stage, ctx), [None] * len(feats))
        pieces = []  # (sample, indices into its current visual tokens, unit size for its budget, grid)
        for b, units in enumerate(call.units):
            unit = units.ids.to(call.vis_orig[b].device)[call.vis_orig[b]]
            sizes = units.sizes
            sample_grids = grids[b] if grids is not None and grids[b] is not None else None
            if self.budget_per != "image":
                sample_grids = None  # the grids are the images'; finer units have none
            for u, size in enumerate(sizes):
                grid = sample_grids[u] if sample_grids is not None and len(sample_grids) == len(sizes) else None
                pieces.append((b, (unit == u).nonzero().squeeze(1), size, grid))
        piece_feats = [feats[b][idx] for b, idx, _, _ in pieces]
        keep = [min(f.shape[0], stage.keep(n)) for f, (_, _, n, _) in zip(piece_feats, pieces)]

        def piece_signal(name: str, opts: dict) -> list[Tensor]:
            whole = signal(name, opts)
            per_token = name in self.PER_TOKEN_SIGNALS and opts.get("tokens", "visual") == "visual"
            return [whole[b][idx] if per_token else whole[b] for b, idx, _, _ in pieces]

        ctx = StageContext(stage, piece_feats, keep, piece_signal,
                           grids=[[g] if g is not None else None for *_, g in pieces])
        p_kept, p_values, p_merged = self._choose(stage, ctx)
        kept, values, merged, as_is = [], [], [], []
        for b, f in enumerate(feats):
            mine = [i for i, p in enumerate(pieces) if p[0] == b]
            outside = (call.units[b].ids.to(f.device)[call.vis_orig[b]] < 0).nonzero().squeeze(1)
            k = torch.cat([pieces[i][1][p_kept[i]] for i in mine] + [outside])
            order = k.argsort()
            kept.append(k[order])
            unchanged = outside.new_ones(outside.numel(), dtype=torch.bool)  # the tokens of no unit
            merged.append(torch.cat([p_merged[i] for i in mine] + [~unchanged])[order])
            fixed = torch.cat([unchanged.new_zeros(k.numel() - outside.numel()), unchanged])[order]
            as_is.append(fixed if outside.numel() else None)
            if all(p_values[i] is None for i in mine):
                values.append(None)
            else:  # tokens without values of their own keep their features; those outside every unit are not written
                v = [p_values[i] if p_values[i] is not None else f[pieces[i][1][p_kept[i]]] for i in mine]
                values.append(torch.cat(v + [f[outside]])[order])
        return kept, values, merged, as_is

    @staticmethod
    def _budgets(stage: Stage, n_orig: list[int], current: list[int] | None = None) -> list[int]:
        current = n_orig if current is None else current
        return [min(c, stage.keep(n)) if n else 0 for n, c in zip(n_orig, current)]

    @staticmethod
    def _write_values(x: Tensor, rows: list[Tensor], kept: list[Tensor], values: list[Tensor | None],
                      transform: Callable[[Tensor], Tensor] | None = None,
                      as_is: list[Tensor | None] | None = None) -> Tensor | None:
        """``x`` with each sample's kept visual rows set to the stage's values (``None`` when no value changes);
        ``as_is[b]`` (aligned with the kept places) marks rows left as they are whatever the values say.

        ``kept[b]`` lists the tokens in the order they fill the kept places (taken in sequence order): ascending for
        tokens that stay in place; an ordered :class:`Choice` moves tokens (values, or the rows themselves)."""
        moved = [bool((k[1:] < k[:-1]).any()) for k in kept]
        if all(v is None for v in values) and not any(moved):
            return None
        out = x.clone()
        for b, (k, v) in enumerate(zip(kept, values)):
            places = rows[b][k.sort().values]
            if v is not None:
                if as_is is not None and as_is[b] is not None:
                    places, v = places[~as_is[b]], v[~as_is[b]]
                out[b, places] = (v if transform is None else transform(v)).to(x.dtype)
            elif moved[b]:  # already in the model's space: no transform
                out[b, places] = x[b, rows[b][k]]
        return out

    @staticmethod
    def _choose(stage: Stage, ctx: StageContext) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
        """Run the stage; per sample: kept indices (ascending, or as an ordered Choice gives them: the order in which
        they fill the kept places), replacement values (or None), merged flags."""
        chosen = stage.choose(ctx)
        where = stage.label or stage.point
        if len(chosen) != ctx.batch_size:
            raise PruningError(f"{where}: method returned {len(chosen)} rows for {ctx.batch_size}")
        kept, values, merged = [], [], []
        for b, (c, budget, f) in enumerate(zip(chosen, ctx.keep, ctx.features)):
            c = c if isinstance(c, Choice) else Choice(c)
            k = c.indices.to(device=f.device, dtype=torch.long).flatten()
            if k.numel() != budget:
                raise PruningError(f"{where}: method kept {k.numel()} tokens of sample {b}, budget {budget}")
            if k.numel() and (int(k.min()) < 0 or int(k.max()) >= f.shape[0] or k.unique().numel() != k.numel()):
                raise PruningError(f"{where}: method returned invalid or repeated indices for sample {b}")
            k, order = (k, torch.arange(k.numel(), device=k.device)) if c.ordered else k.sort()
            kept.append(k)
            values.append(None if c.values is None else c.values.to(f.device)[order])
            flags = torch.zeros(k.numel(), dtype=torch.bool, device=f.device)
            if c.merged is not None:
                flags = c.merged.to(device=f.device, dtype=torch.bool).flatten()[order]
            merged.append(flags)
        return kept, values, merged

