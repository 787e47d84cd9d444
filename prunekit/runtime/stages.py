"""Running a method's stage on visual features, without a model: per sample or per budget unit (image, frame,
crop), checking what the method returned (:func:`choose`), and writing replacement values back into a sequence
(:func:`write_values`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import PruningError
from ..interfaces import Choice, Stage, StageContext
from ..ops import batch_of, shared_constant
from .hooks import BudgetUnits

__all__ = ["PER_TOKEN_SIGNALS", "run_stage", "budgets", "write_values", "choose", "settle_checks"]

def settle_checks(checks: list[tuple[str, Tensor]]) -> None:
    """Read the index checks a call's stages noted (``checks``, filled by :func:`choose`; one read for all of them)
    and empty the list; raise :class:`PruningError` for the first stage whose method returned invalid or repeated
    indices."""
    pending = list(checks)
    checks.clear()
    if not pending:
        return
    flags = torch.stack([flags.to(pending[0][1].device) for _, flags in pending]).tolist()
    for (where, _), bad in zip(pending, flags):
        if any(bad):
            raise PruningError(f"{where}: method returned invalid or repeated indices for sample {bad.index(True)}")


#: signals with one row per visual token of the stage (split per image / frame); others describe the prompt
PER_TOKEN_SIGNALS = frozenset({"cls_attention", "keys", "text_attention", "text_similarity", "states",
                               "positions", "attention_received", "cls_feature"})

def run_stage(stage: Stage, feats: list[Tensor], n_orig: list[int], signal, grids=None, *,
              units: list[BudgetUnits] | None = None, vis_orig: list[Tensor] | None = None,
              budget_per: str = "prompt", checks: list | None = None):
    """Run ``stage`` on every sample (``budget_per="prompt"``) or on every unit (image, video frame, crop) of
    every sample, each unit alone (``units``; ``vis_orig``: per sample, the original visual index of each
    token in ``feats``). Tokens of no unit (LLaVA-NeXT's row breaks under ``"crop"``) are kept as they
    are, outside every budget. Returns kept, values, merged, moved (see :func:`choose`, which also says what
    ``checks`` does) and, per sample, None or a mask over the kept tokens of those kept as they are (their rows
    are never rewritten)."""
    current = [f.shape[0] for f in feats]
    if units is None:
        ctx = StageContext(stage, feats, budgets(stage, n_orig, current), signal, grids=grids)
        kept, values, merged, moved = choose(stage, ctx, checks)
        return kept, values, merged, moved, [None] * len(feats)
    pieces = []  # (sample, indices into its current visual tokens, unit size for its budget, grid)
    for b, sample_units in enumerate(units):
        unit = sample_units.ids.to(vis_orig[b].device)[vis_orig[b]]
        sizes = sample_units.sizes
        sample_grids = grids[b] if grids is not None and grids[b] is not None else None
        if budget_per != "image":
            sample_grids = None  # the grids are the images'; finer units have none
        for u, size in enumerate(sizes):
            grid = sample_grids[u] if sample_grids is not None and len(sample_grids) == len(sizes) else None
            pieces.append((b, (unit == u).nonzero().squeeze(1), size, grid))
    piece_feats = [feats[b][idx] for b, idx, _, _ in pieces]
    keep = [min(f.shape[0], stage.keep(n)) for f, (_, _, n, _) in zip(piece_feats, pieces)]

    def piece_signal(name: str, opts: dict) -> list[Tensor]:
        whole = signal(name, opts)
        per_token = name in PER_TOKEN_SIGNALS and opts.get("tokens", "visual") == "visual"
        return [whole[b][idx] if per_token else whole[b] for b, idx, _, _ in pieces]

    ctx = StageContext(stage, piece_feats, keep, piece_signal,
                       grids=[[g] if g is not None else None for *_, g in pieces])
    p_kept, p_values, p_merged, _ = choose(stage, ctx, checks)
    kept, values, merged, as_is = [], [], [], []
    for b, f in enumerate(feats):
        mine = [i for i, p in enumerate(pieces) if p[0] == b]
        outside = (units[b].ids.to(f.device)[vis_orig[b]] < 0).nonzero().squeeze(1)
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
    return kept, values, merged, [False] * len(feats), as_is  # every sample's kept tokens are in sequence order

def budgets(stage: Stage, n_orig: list[int], current: list[int] | None = None) -> list[int]:
    current = n_orig if current is None else current
    return [min(c, stage.keep(n)) if n else 0 for n, c in zip(n_orig, current)]

def write_values(x: Tensor, rows: list[Tensor], kept: list[Tensor], values: list[Tensor | None],
                  transform: Callable[[Tensor], Tensor] | None = None,
                  as_is: list[Tensor | None] | None = None, moved: list[bool] | None = None) -> Tensor | None:
    """``x`` with each sample's kept visual rows set to the stage's values (``None`` when no value changes);
    ``as_is[b]`` (aligned with the kept places) marks rows left as they are whatever the values say.

    ``kept[b]`` lists the tokens in the order they fill the kept places (taken in sequence order): ascending for
    tokens that stay in place; an ordered :class:`Choice` moves tokens (values, or the rows themselves).
    ``moved[b]``: whether ``kept[b]`` is out of sequence order, as :func:`choose` read it (``None``: read here)."""
    if moved is None:  # whether a sample's tokens change places: read from the device once for all samples
        moved = torch.stack([(k[1:] < k[:-1]).any().to(kept[0].device) for k in kept]).tolist() if kept else []
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

def choose(stage: Stage, ctx: StageContext, checks: list | None = None
           ) -> tuple[list[Tensor], list[Tensor | None], list[Tensor], list[bool]]:
    """Run the stage; per sample: kept indices (ascending, or as an ordered Choice gives them: the order in which
    they fill the kept places), replacement values (or None), merged flags, and whether its kept indices are out
    of sequence order (tokens that move; only an ordered Choice's can be). Whether the indices are valid and
    whether they move are read from the device together, once for the stage; with ``checks`` (a list), a batch of
    plain indices is not read here: its check is appended for :func:`settle_checks` to read with the other
    stages' (each read makes the host wait for a GPU's queue, right after a selection for the selection itself),
    and its indices are clamped into range until then."""
    chosen = stage.choose(ctx)
    where = stage.label or stage.point
    if len(chosen) != ctx.batch_size:
        raise PruningError(f"{where}: method returned {len(chosen)} rows for {ctx.batch_size}")
    for b, (c, budget) in enumerate(zip(chosen, ctx.keep)):
        count = (c.indices if isinstance(c, Choice) else c).numel()
        if count != budget:
            raise PruningError(f"{where}: method kept {count} tokens of sample {b}, budget {budget}")
    batched = _choose_batch(chosen, ctx, where, checks)
    if batched is not None:
        return batched
    kept, values, merged = [], [], []
    invalid: list[tuple[int, Tensor]] = []  # per sample, True on the device when its indices are invalid
    moves: list[tuple[int, Tensor]] = []  # per sample of an ordered Choice, True on the device when tokens move
    for b, (c, f) in enumerate(zip(chosen, ctx.features)):
        c = c if isinstance(c, Choice) else Choice(c)
        k = c.indices.to(device=f.device, dtype=torch.long).flatten()
        k, order = (k, torch.arange(k.numel(), device=k.device)) if c.ordered else k.sort()
        if k.numel():
            s = k.sort().values if c.ordered else k
            invalid.append((b, (s[0] < 0) | (s[-1] >= f.shape[0]) | (s[1:] == s[:-1]).any()))
            if c.ordered:
                moves.append((b, (k[1:] < k[:-1]).any()))
        kept.append(k)
        values.append(None if c.values is None else c.values.to(f.device)[order])
        flags = torch.zeros(k.numel(), dtype=torch.bool, device=f.device)
        if c.merged is not None:
            flags = c.merged.to(device=f.device, dtype=torch.bool).flatten()[order]
        merged.append(flags)
    moved = [False] * len(kept)
    if invalid:  # one read of the device for the whole stage, not three per sample (each stalls a GPU's stream)
        device = invalid[0][1].device
        flags = torch.stack([flag.to(device) for _, flag in invalid + moves]).tolist()
        bad = [b for (b, _), flag in zip(invalid, flags) if flag]
        if bad:
            raise PruningError(f"{where}: method returned invalid or repeated indices for sample {bad[0]}")
        for (b, _), flag in zip(moves, flags[len(invalid):]):
            moved[b] = flag
    return kept, values, merged, moved


def _choose_batch(chosen, ctx: StageContext, where: str, checks: list | None):
    """:func:`choose`'s result computed for the whole batch at once (one sort, one check, one read, or none with
    ``checks``), where every sample keeps plain indices (no values, no merged flags, no order of its own) and as
    many of them, out of as many tokens on one device; else None (per sample). The budgets are checked by the
    caller."""
    rows = [c.indices if isinstance(c, Choice) else c for c in chosen]
    if any(isinstance(c, Choice) and (c.ordered or c.values is not None or c.merged is not None) for c in chosen):
        return None
    sizes = {f.shape[0] for f in ctx.features}
    devices = {f.device for f in ctx.features}
    if len(rows) == 0 or len(sizes) != 1 or len(devices) != 1 or len({r.numel() for r in rows}) != 1:
        return None
    if rows[0].numel() == 0:
        return None
    device, (n,) = devices.pop(), sizes
    k = batch_of(r.to(device=device, dtype=torch.long).flatten() for r in rows).sort(-1).values
    inside = k.clamp(0, n - 1)  # sorted: an index out of range moved, or two alike, is invalid
    invalid = torch.cat([inside != k, inside[:, 1:] == inside[:, :-1]], 1).any(-1)
    if checks is not None:  # read later with the call's other stages' (settle_checks); in range until then
        checks.append((where, invalid))
        k = inside
    else:
        settle_checks([(where, invalid)])  # one read of the device for the whole stage
    flags = shared_constant(_no_merge, device).expand(k.shape)  # nothing merged: a view of one False (read only)
    return list(k.unbind(0)), [None] * len(rows), list(flags.unbind(0)), [False] * len(rows)


def _no_merge(device: torch.device) -> Tensor:
    """One False on ``device`` (made once per device: :func:`~prunekit.ops.shared_constant`)."""
    return torch.zeros(1, dtype=torch.bool, device=device)
