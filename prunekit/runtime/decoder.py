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

The adapter supplies only what is model-specific (:class:`~prunekit.runtime.hooks.ModelHooks`). This module wires
the hooks and runs prefill and decode; the parts it calls each have a module of their own: ``sequence`` (the pruned
sequence's state and the mapping of masks and positions), ``signals`` (signals computed in the decoder),
``stages`` (a stage run on features, without a model), ``attention`` (attention rows recomputed for raters).
It stays one class of ~450 lines because its hooks share one per-call state: the prefill, the layer hooks and the
decode steps read and write the same :class:`~prunekit.runtime.sequence.Call` and
:class:`~prunekit.runtime.sequence.Generation`.
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import contracts as C
from ..errors import PruningError
from ..flops import layer_cost
from ..interfaces import Patch, Stage
from ..ops import batch_of, false_indices, true_indices
from ..report import PruningReport, StageRecord
from .hooks import ModelHooks
from .sequence import (Call, Generation, Segment, pad_left, positions_in, positions_out, remap, rows_of_samples,
                       same_sizes, segment_for)
from .signals import PROMPT_TEXT_SIGNALS, instruction_counts, layer_signal, pre_llm_signal
from .stages import run_stage, settle_checks, write_values
from .state import PerThread, ThreadStateMixin

__all__ = ["DecoderPruner"]


class DecoderPruner(ThreadStateMixin, Patch):
    # per call, per thread: the prefill being run on the current cache, and the call in flight
    _gen: "Generation | None" = PerThread()
    _call: "Call | None" = PerThread()

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
        #: whether a stage reads the instruction's positions (every stage inside the LLM with signals, a stage
        #: before it with text signals): their counts are then read with the prefill's own (signals.instruction)
        self._reads_text = any(s.signals for s in self.layer_stages) or \
            any(set(s.signals) & PROMPT_TEXT_SIGNALS for s in self.pre_stages)
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
                norm = C.INPUT_NORM.get(self.layers[stage.layer - 1], None)
                if isinstance(norm, torch.nn.Module):  # its output, which the stage's signals read again
                    seen = functools.partial(self._input_norm_post, stage.layer - 1)
                    self._handles.append(norm.register_forward_hook(seen))

    # -- copies -------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "DecoderPruner":
        """``copy.deepcopy`` of a patched model copies its patch along: the copy's hooks (partials of bound
        methods, not closures) run the copied pruner on the copied modules, and removing either patch leaves the
        other in place."""
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

    def _prefill_counts(self, visual: Tensor, mask: Tensor | None
                        ) -> tuple[list[int], list[int] | None, list[int] | None, bool]:
        """Per sample, its visual tokens and (with a 2D mask) its non-padding tokens, in one read of the device
        (each read waits for a GPU's stream): they decide the pruned sequence's shapes, so the host needs them.
        Where a stage reads the instruction, the same read gives its token counts (the text after each sample's
        last visual token) where every sample's visual tokens are one block (else None; see
        :func:`~prunekit.runtime.signals.instruction`), and whether every row then ends with its instruction."""
        counts = [visual.sum(1)]
        valid = None
        if isinstance(mask, Tensor) and mask.dim() == 2:
            valid = mask.bool().to(visual.device)
            counts.append(valid.sum(1))
        if self._reads_text:
            counts.extend(instruction_counts(visual, valid))
        read = torch.stack(counts).tolist()
        lengths = read[1] if valid is not None else None
        text, tail = None, False
        if self._reads_text:
            after, spans, ends = read[-3:]
            if all(n and span == n - 1 for n, span in zip(read[0], spans)):
                text = after
                tail = after == ends  # every position after the last visual token holds the instruction
        return read[0], lengths, text, tail

    def _new_report(self, n_visual: list[int], lengths: list[int] | None, embeds: Tensor,
                    enabled: bool = True) -> PruningReport:
        """An empty report for this prefill: budgets, sequence lengths (``None``: no padding) and layer costs."""
        if lengths is None:
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
            settle_checks(call.checks)  # the stages' index checks, read once for the prefill
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
        counts = None  # (visual tokens, non-padding tokens) per sample of a prefill: one read of the device
        if visual is not None and past == 0:  # the mask counts where a report is made of this prefill
            reported = embeds is not None or not self.enabled
            counts = self._prefill_counts(visual, self._input_mask(kwargs)[0] if reported else None)
        if not self.enabled:
            self._gen = None
            if counts is not None:  # pruning_report() tells that this prefill ran unpruned
                self._report = self._new_report(*counts[:2], embeds, enabled=False)
            return None
        self._gen = self._gens.get(cache) if cache is not None else None
        if counts is not None:
            if any(counts[0]):
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
        if counts is not None and embeds is not None:
            return (args, kwargs) if self._prefill(kwargs, visual, *counts) else None
        if visual is not None and self.hooks.images_in_call() and bool(visual.any()):  # read only with images
            raise PruningError(
                "visual tokens arrived after cached tokens; prunekit prunes images in the prefill only"
            )
        if self._gen is not None:
            self._decode(kwargs, past)
            return (args, kwargs)
        return None

    def _prefill(self, kwargs: dict, visual: Tensor, n_visual: list[int], lengths: list[int] | None,
                 text: list[int] | None, tail: bool = False) -> bool:
        embeds: Tensor = C.LM_INPUTS_EMBEDS.get(kwargs)
        B, L, _ = embeds.shape
        device = embeds.device
        mask2d, prepared = self._input_mask(kwargs)
        if mask2d is not None and mask2d.dim() != 2:
            raise PruningError("prunekit needs a 2D attention mask (or none) at the language model's input")
        pos, style = positions_in(C.LM_POSITION_IDS.get(kwargs), B, L, device)
        if style > 1 and self.positions == "renumber":
            raise PruningError(
                "positions='renumber' is not defined for multi-row (M-RoPE) position ids; use positions='original'"
            )
        visual = visual.to(device)
        report = self._new_report(n_visual, lengths, embeds)
        self._report = report
        vis_pos = true_indices(visual, n_visual)
        per_unit = self.budget_per != "prompt" and sum(n_visual)
        units = self.hooks.unit_ids(n_visual, self.budget_per) if per_unit else None
        call = Call(
            mode="prefill", pos=pos, style=style, report=report,
            valid=torch.ones(B, L, dtype=torch.bool, device=device) if mask2d is None else mask2d.bool(),
            vis_pos=vis_pos, vis_orig=[torch.arange(n, device=device) for n in n_visual], units=units,
            instruction_counts=text, instruction_tail=tail,
        )
        self._gen = None
        changed = False
        if self.pre_stages and sum(n_visual):
            stage = self.pre_stages[0]
            on_vision = stage.point == "vision_features"
            if on_vision:
                feats = self.hooks.vision_features(n_visual)
            else:
                feats = rows_of_samples(embeds, vis_pos)
            kept, values, merged, moved, as_is = run_stage(
                stage, feats, n_visual,
                lambda name, opts: pre_llm_signal(self.hooks, name, opts, n_visual, embeds, call),
                self.hooks.grids(n_visual), **self._units(call), checks=call.checks,
            )
            taken = _taken(call.vis_orig, kept)  # the kept tokens' original indices: the report's and the call's
            report.stages.append(StageRecord(stage.label, stage.point, None, taken, merged))
            written = write_values(embeds, vis_pos, kept, values, self.hooks.project if on_vision else None,
                                   as_is, moved)
            if written is not None:
                embeds = written
                C.LM_INPUTS_EMBEDS.set(kwargs, written)
                changed = True
            dropped_counts = [n - k.numel() for n, k in zip(n_visual, kept)]  # known here: no read of the device
            if any(dropped_counts):
                changed = True
                drop = visual.clone()
                for b in range(B):
                    drop[b, vis_pos[b][kept[b]]] = False
                keep_rows = false_indices(drop, [L - d for d in dropped_counts])
                L1 = max(r.numel() for r in keep_rows)
                valid = call.valid
                new_embeds = _padded_rows(embeds, keep_rows, L1, 0.0)
                new_valid = _padded_rows(valid, keep_rows, L1, False)
                if self.positions == "renumber":  # close the gaps: subtract the tokens dropped before each one
                    src = pos - drop.cumsum(1)[..., None]  # a bool cumsum counts in int64
                else:
                    src = pos
                new_pos = _padded_rows(src, keep_rows, L1, 1)
                new_mask = new_valid.to(mask2d.dtype if mask2d is not None else torch.long)
                C.LM_INPUTS_EMBEDS.set(kwargs, new_embeds)
                # no padding before or after (known on the host): no mask, as the model takes a batch without
                # padding (its mask code would otherwise read the all-ones mask back, a wait for a GPU's queue)
                unpadded = (lengths is None or set(lengths) == {L}) and len(set(dropped_counts)) == 1
                C.LM_ATTENTION_MASK.set(kwargs, None if unpadded and not prepared else new_mask)
                C.LM_POSITION_IDS.set(kwargs, positions_out(new_pos, style))
                cache = self._ensure_cache(kwargs)
                if prepared:  # the model's own masks, rebuilt for the shorter sequence
                    C.LM_ATTENTION_MASK.set(kwargs, self.hooks.prepared_masks(kwargs, new_mask, keep_rows, L1))
                new_vis = _new_positions(keep_rows, vis_pos, kept, [L1 - r.numel() for r in keep_rows], moved)
                self.hooks.prune_inputs(kwargs, kept, new_vis, L1)
                call.vis_pos = new_vis
                call.vis_orig = taken
                call.valid = new_valid
                call.pos = new_pos
                dropped = torch.tensor(dropped_counts, device=device)
                shift = dropped if self.positions == "renumber" else torch.zeros_like(dropped)
                if cache is not None:
                    self._gen = self._gens[cache] = Generation(weakref.ref(cache), L, new_mask, dropped, shift)
        if self.layer_stages and self._gen is None:
            had_cache = C.LM_CACHE.get(kwargs) is not None
            cache = self._ensure_cache(kwargs)
            changed = changed or (cache is not None and not had_cache)
            if cache is not None:
                zero = torch.zeros(B, dtype=torch.long, device=device)
                self._gen = self._gens[cache] = Generation(weakref.ref(cache), L, mask2d, zero, zero)
        if self.layer_stages:  # for the layer_input signal's layer="first"; the layers' cached keys
            call.first_input = (C.LM_INPUTS_EMBEDS.get(kwargs), call.vis_pos, call.valid)
            call.cache = C.LM_CACHE.get(kwargs)
        self._call = call
        return changed

    def _units(self, call: Call) -> dict:
        """The budget units of this call's samples, for :func:`~prunekit.runtime.stages.run_stage`."""
        return {"units": call.units, "vis_orig": call.vis_orig, "budget_per": self.budget_per}

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

    def map_decode_mask(self, mask: Tensor, gen: "Generation | None" = None) -> Tensor:
        """A decode step's 2-D mask (unpruned coordinates) mapped onto the pruned cache."""
        gen = gen if gen is not None else self._gen
        assert gen is not None and gen.mask is not None
        return torch.cat([gen.mask.to(mask.device), mask[:, gen.orig_len :]], dim=1)

    def generation_for(self, cache) -> "Generation | None":
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
        pos, style = positions_in(pos.to(device), gen.dropped.shape[0], q, device)
        pos = pos - gen.shift.to(device)[:, None, None]
        C.LM_POSITION_IDS.set(kwargs, positions_out(pos, style))
        self._call = Call(mode="decode", pos=pos, style=style, past=past, segments=gen.segments)

    # -- decoder layers ---------------------------------------------------------------------------------
    def _input_norm_post(self, j: int, module, args, output):
        """Keep what the input norm of layer ``j`` (a stage's K-1) made of the layer's input in this prefill: the
        stage's signals read that normalised input (:func:`~prunekit.runtime.signals.normed_input`), which would
        otherwise compute it again. Kept only when its input is the layer input the stage captured."""
        call = self._call
        if call is None or call.mode != "prefill" or not self.enabled or j not in call.captured or not args:
            return None
        if args[0] is call.captured[j][0] and isinstance(output, Tensor):
            call.normed.append((self.layers[j], args[0], output))
        return None

    def _layer_pre(self, j: int, prunes_after: bool, module, args, kwargs):
        call = self._call
        if call is None or not self.enabled:
            return None
        hidden = args[0] if args else C.LAYER_HIDDEN_STATES.get(kwargs)
        idx = segment_for(call, j)
        changed = False
        if idx is not None:
            kwargs.update(remap(call, idx, hidden, kwargs, positions=self.positions, rotary=self.rotary,
                                gen=self._gen))
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
        feats = rows_of_samples(hidden, call.vis_pos)
        kept, values, merged, moved, as_is = run_stage(
            stage, feats, n_orig,
            lambda name, opts: layer_signal(call, self.lm, self.layers, module, j, name, opts, hidden),
            **self._units(call), checks=call.checks,
        )
        call.normed.clear()  # the stage's normalised inputs (signals.normed_input): not kept past the stage
        taken = _taken(call.vis_orig, kept)  # the kept tokens' original indices: the report's and the call's
        call.report.stages.append(StageRecord(stage.label, stage.point, stage.layer, taken, merged))
        n_now = [f.shape[0] for f in feats]
        written = write_values(hidden, call.vis_pos, kept, values, as_is=as_is, moved=moved)
        if written is not None:
            hidden = written
        elif all(k.numel() == n for k, n in zip(kept, n_now)):
            return None
        Lc = hidden.shape[1]
        prev = call.segments[-1] if call.segments else None
        # 1 where a row goes: the dropped visual tokens, then the previous segment's padding (int8: a sort key)
        gone = torch.zeros(B, Lc, dtype=torch.int8, device=hidden.device)
        if same_sizes(call.vis_pos) and same_sizes(kept):  # every sample at once
            vis = torch.stack(list(call.vis_pos)).to(hidden.device)
            gone.scatter_(1, vis, 1).scatter_(1, vis.gather(1, torch.stack(list(kept))), 0)
        else:
            for b in range(B):
                gone[b, call.vis_pos[b]] = 1
                gone[b, call.vis_pos[b][kept[b]]] = 0
        # renumbering: the visual tokens dropped before each row (and in all, the last column), counted before the
        # previous padding joins them
        before = gone.cumsum(1) if self.positions == "renumber" else None
        if prev is not None and prev.pad is not None:
            gone.masked_fill_(prev.pad, 1)
        # rows each sample keeps, counted on the host: all but the previous segment's padding and the dropped tokens
        dropped = [v.numel() - k.numel() for v, k in zip(call.vis_pos, kept)]
        lead_before = prev.lead if prev is not None and prev.lead is not None else [0] * B
        rows_b = false_indices(gone, [Lc - lead_before[b] - dropped[b] for b in range(B)])
        n = max(r.numel() for r in rows_b)
        lead = [n - r.numel() for r in rows_b]  # rows keeping fewer tokens are padded on the left
        if any(lead):
            rows = pad_left(rows_b, n, 0)
            pad = pad_left([torch.zeros(r.numel(), dtype=torch.bool, device=r.device) for r in rows_b], n, True)
        else:
            rows, pad = batch_of(rows_b), None
        cols = rows if prev is None else prev.cols.gather(1, rows)
        base_pos = call.pos if prev is None else prev.pos
        if before is not None:  # subtract the visual tokens dropped before each kept token
            base_pos = base_pos - before[..., None]
        new_pos = base_pos.gather(1, rows[:, :, None].expand(B, n, base_pos.shape[2]))
        if before is None:
            shift = torch.zeros(B, dtype=torch.long, device=hidden.device) if prev is None else prev.shift
        else:
            shift = before[:, -1] if prev is None else prev.shift + before[:, -1]
        # whether a sample's decode positions shift in this segment, known here (how many tokens each dropped)
        shifts = before is not None and (any(dropped) or (prev is not None and prev.shifts))
        seg = Segment(stage.layer, cols, shift, new_pos, pad, lead, shifts)
        call.segments.append(seg)
        if self._gen is not None:
            self._gen.segments.append(seg)
        call.vis_pos = _new_positions(rows_b, call.vis_pos, kept, lead, moved)
        call.vis_orig = taken
        call.valid = _padded_rows(call.valid, rows_b, n, False)
        new_hidden = _padded_rows(hidden, rows_b, n, 0.0)
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden


def _taken(source, index) -> list[Tensor]:
    """``source[b][index[b]]`` for every sample: one gather where the sizes agree."""
    if not (same_sizes(source) and same_sizes(index)):
        return [source[b][index[b]] for b in range(len(index))]
    return list(torch.stack(list(source)).gather(1, torch.stack(list(index)).to(source[0].device)).unbind(0))


def _padded_rows(x: Tensor, rows: list[Tensor], length: int, value) -> Tensor:
    """``pad_left([x[b, rows[b]] ...], length, value)``: one gather where every sample keeps ``length`` rows."""
    if any(r.numel() != length for r in rows):
        return pad_left([x[b, rows[b]] for b in range(x.shape[0])], length, value)
    if len(rows) == 1:  # one sample, nothing to pad
        return x[0, rows[0]].unsqueeze(0)
    index = torch.stack(list(rows)).to(x.device)
    if x.dim() > 2:
        index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def _new_positions(rows: list[Tensor], vis_pos, kept, lead, moved: list[bool]) -> list[Tensor]:
    """Where each sample's kept visual tokens sit among its kept ``rows`` (ascending), after ``lead[b]`` rows of
    padding: ``lead[b] + searchsorted(rows[b], vis_pos[b][sorted kept[b]])``, for the batch at once where the
    sizes agree (``moved[b]``: whether ``kept[b]`` is out of order, as :func:`~prunekit.runtime.stages.choose`
    says; else it is sorted already)."""
    if not (same_sizes(rows) and same_sizes(vis_pos) and same_sizes(kept)) or len(set(lead)) != 1:
        found = [torch.searchsorted(rows[b], vis_pos[b][kept[b].sort().values if moved[b] else kept[b]])
                 for b in range(len(rows))]
        return [f + lead[b] if lead[b] else f for b, f in enumerate(found)]
    order = torch.stack(list(kept))
    vis = torch.stack(list(vis_pos)).gather(1, order.sort(-1).values if any(moved) else order)
    found = torch.searchsorted(torch.stack(list(rows)), vis)
    return list((found + lead[0] if lead[0] else found).unbind(0))
