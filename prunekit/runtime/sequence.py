"""Sequence surgery: the state a pruned prefill leaves for the layers after it and for its decode steps
(:class:`Segment`, :class:`Generation`, :class:`Call`), and how masks, positions and rotary embeddings are mapped
onto a pruned sequence (:func:`remap`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import contracts as C
from ..errors import PruningError
from ..report import PruningReport
from .hooks import BudgetUnits

__all__ = ["Segment", "Generation", "Call", "positions_in", "positions_out", "causal_pad_mask", "hide_pads",
           "same_sizes", "rows_of_samples", "pad_left", "segment_for", "remap"]


@dataclass
class Segment:
    """The sequence seen by decoder layers >= ``first_layer`` after an in-LLM pruning."""

    first_layer: int
    cols: Tensor  # [B, n]: indices into the LLM-input sequence (after any pruning before the LLM)
    shift: Tensor  # [B] tokens dropped inside the LLM up to here (subtracted from decode positions when renumbering)
    pos: Tensor  # [B, n, P] prefill position ids
    pad: Tensor | None = None  # [B, n] True where a row was left-padded because rows kept different counts
    lead: list[int] | None = None  # per sample, how many of those padding rows (known on the host)
    shifts: bool = True  # whether any sample's shift is not 0 (known on the host; True: not known)

    def on(self, device) -> "Segment":
        """This segment with its tensors on ``device`` (a model spread over devices meets them on each)."""
        if self.cols.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Segment(self.first_layer, move(self.cols), move(self.shift), move(self.pos), move(self.pad), self.lead,
                       self.shifts)


@dataclass
class Generation:
    """What a pruned prefill leaves behind for the decode steps on the same cache."""

    cache: Any
    orig_len: int
    mask: Tensor | None  # [B, L1] 2D mask of the pruned prefill
    dropped: Tensor  # [B] visual tokens dropped before the LLM
    shift: Tensor  # [B] subtracted from incoming position ids
    segments: list[Segment] = field(default_factory=list)

    @property
    def prefill_length(self) -> int:
        """Tokens the pruned prefill left in the cache's first layer."""
        return self.mask.shape[1] if self.mask is not None else self.orig_len


@dataclass
class Call:
    mode: str  # "prefill" | "decode"
    pos: Tensor | None  # model-level position ids of this call, [B, q, P] (P = 1, or 3/4 rows of M-RoPE)
    style: int = 0  # how the model passed position ids: 0 = [B, q] (or none), P = [P, B, q]
    past: int = 0  # decode: tokens in the cache before this call (in the first layer's coordinates)
    # valid and vis_pos are replaced when the sequence changes, never changed in place (signals.instruction)
    valid: Tensor | None = None  # [B, L] prefill: non-pad tokens of the current segment
    vis_pos: list[Tensor] = field(default_factory=list)  # per sample: positions of its visual tokens
    vis_orig: list[Tensor] = field(default_factory=list)  # per sample: original visual index of each
    segments: list[Segment] = field(default_factory=list)
    captured: dict[int, tuple] = field(default_factory=dict)  # layer -> (hidden_in, mask, position_embeddings)
    remapped: dict[int, dict] = field(default_factory=dict)  # segment index -> kwargs for its layers
    first_input: tuple | None = None  # prefill: (embeds [B, L, D], vis_pos, valid) at decoder layer 0's input
    # (vis_pos, valid, their instructions' positions, whether those are each row's last positions)
    instructions: list[tuple] = field(default_factory=list)
    instruction_counts: list[int] | None = None  # per sample, where the visual tokens are known to be one block
    instruction_tail: bool = False  # with those counts: every row ends with its instruction (no padding after it)
    normed: list[tuple] = field(default_factory=list)  # (layer, states, the layer's input norm of states)
    cache: Any = None  # prefill: the KV cache the language model fills (attention.cached_keys reads it)
    report: PruningReport | None = None
    units: list[BudgetUnits] | None = None  # budget_per other than "prompt": per sample, its units
    # prefill: the stages' index checks, kept on the device and read once at the end (stages.settle_checks)
    checks: list[tuple[str, Tensor]] = field(default_factory=list)

    def to(self, device) -> None:
        """Move the per-call tensors the layers index with to ``device``."""
        if self.pos is not None and self.pos.device != torch.device(device):
            self.pos = self.pos.to(device)
            self.valid = None if self.valid is None else self.valid.to(device)
            self.vis_pos = [v.to(device) for v in self.vis_pos]
            self.vis_orig = [v.to(device) for v in self.vis_orig]
            self.segments[:] = [seg.on(device) for seg in self.segments]


def positions_in(pos: Tensor | None, B: int, L: int, device) -> tuple[Tensor, int]:
    """Position ids as ``[B, L, P]`` and the style to give them back in (0: ``[B, L]``, P: ``[P, B, L]``)."""
    if pos is None:
        return torch.arange(L, device=device)[None, :, None].expand(B, L, 1), 0
    if pos.dim() == 2:
        return pos.expand(B, L)[..., None], 0
    if pos.dim() == 3:
        return pos.expand(pos.shape[0], B, L).permute(1, 2, 0), pos.shape[0]
    raise PruningError(f"position_ids of shape {tuple(pos.shape)} are not supported")


def positions_out(pos: Tensor, style: int) -> Tensor:
    return pos[..., 0] if style == 0 else pos.permute(2, 0, 1)


def causal_pad_mask(pad_keys: Tensor, q: int) -> Tensor:
    """A boolean ``[B, 1, q, Lk]`` mask for the last ``q`` queries: causal, padding keys hidden, padding queries
    see themselves (for when the model passed no mask because its batch had no padding)."""
    Lk = pad_keys.shape[1]
    qi = torch.arange(Lk - q, Lk, device=pad_keys.device)[:, None]
    kj = torch.arange(Lk, device=pad_keys.device)[None]
    allowed = (kj <= qi)[None] & ~pad_keys[:, None, :]
    allowed = allowed | ((kj == qi)[None] & pad_keys[:, Lk - q :, None])
    return allowed[:, None]


def hide_pads(mask: Tensor, pad_keys: Tensor) -> Tensor:
    """``mask`` (``[B, H, q, Lk]``, bool or additive) with padding keys hidden; padding queries see themselves."""
    B, _, q, Lk = mask.shape
    own = torch.zeros(B, 1, q, Lk, dtype=torch.bool, device=mask.device)
    qi = torch.arange(Lk - q, Lk, device=mask.device)
    own[:, 0, torch.arange(q, device=mask.device), qi] = pad_keys[:, Lk - q :]
    hide = pad_keys[:, None, None, :] & ~own
    if mask.dtype == torch.bool:
        return (mask & ~hide) | own
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min).masked_fill(own, 0.0)


def same_sizes(rows) -> bool:
    """Whether a batch's per-sample tensors can be stacked: several samples, every one of the same size (one sample
    is cheaper taken as it is)."""
    return len(rows) > 1 and len({r.numel() for r in rows}) == 1


def rows_of_samples(x: Tensor, positions) -> list[Tensor]:
    """``x[b, positions[b]]`` for every sample of ``x`` ``[B, L, D]``: one gather where every sample has as many
    positions (the same values: a gather copies rows)."""
    if not same_sizes(positions):
        return [x[b, positions[b].to(x.device)] for b in range(x.shape[0])]
    index = torch.stack(list(positions)).to(x.device)
    return list(x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])).unbind(0))


def pad_left(rows: list[Tensor], length: int, value) -> Tensor:
    """Rows of different lengths (``[n_i, ...]``) stacked into ``[B, length, ...]``, padded on the left."""
    out = []
    for r in rows:
        pad = length - r.shape[0]
        if pad:
            r = torch.cat([r.new_full((pad, *r.shape[1:]), value), r])
        out.append(r)
    return torch.stack(out)


def segment_for(call: Call, j: int) -> int | None:
    """The index of the last segment that decoder layer ``j`` sees (None: the sequence as it came in)."""
    idx = None
    for i, seg in enumerate(call.segments):
        if seg.first_layer <= j:
            idx = i
    return idx

def remap(call: Call, idx: int, hidden: Tensor, kwargs: dict, *, positions: str, rotary,
          gen: "Generation | None") -> dict:
    """The attention mask, rotary embeddings (and position ids) a decoder layer of segment ``idx`` needs, in the
    pruned sequence's coordinates: gathered from the unpruned ones of ``kwargs`` (prefill), or mapped onto the
    pruned cache (decode: ``gen`` is the prefill that filled it). Computed once per call and segment."""
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
                mask = hide_pads(mask, seg.pad)
        elif seg.pad is not None:
            mask = causal_pad_mask(seg.pad, n)
        pos = seg.pos
        if positions == "renumber":
            emb = rotary(hidden, positions_out(pos, call.style))
        else:  # gather the rows of (cos, sin) along their sequence axis (-2), whatever leads it (M-RoPE: 3 rows)
            def take(t: Tensor) -> Tensor:
                t = t.expand(*t.shape[:-3], B, *t.shape[-2:])
                idx3 = cols[:, :, None].expand(B, n, t.shape[-1])
                return t.gather(-2, idx3.expand(*t.shape[:-3], B, n, t.shape[-1]))

            emb = (take(cos), take(sin))
    else:
        L1 = gen.prefill_length
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
                    mask = hide_pads(mask, pad_keys)
            else:
                mask = causal_pad_mask(pad_keys, hidden.shape[1])
        pos = call.pos.to(hidden.device) - seg.shift[:, None, None]
        shifted = positions == "renumber" and seg.shifts  # known on the host: no read of the device
        emb = rotary(hidden, positions_out(pos, call.style)) if shifted else (cos, sin)
    out = {C.LAYER_ATTENTION_MASK.key: mask, C.LAYER_POSITION_EMBEDDINGS.key: emb}
    if C.LAYER_POSITION_IDS.get(kwargs) is not None:
        out[C.LAYER_POSITION_IDS.key] = pos[..., 0]
    call.remapped[idx] = out
    return out
