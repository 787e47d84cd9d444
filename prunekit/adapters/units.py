"""Budget units from recorded encodings: which images, video frames or crops each visual token of a prompt
belongs to, so that ``budget_per="image"`` or ``"crop"`` can budget each on its own."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.errors import PruningError
from prunekit.runtime.hooks import BudgetUnits

__all__ = ["image_units", "crop_units"]


def image_units(records: list[tuple[str, dict]], units_of: list[list[int]], rows: Tensor | None,
                visual_counts: list[int], placeholder_of) -> list[list[int]]:
    """Per prompt row (``rows``: its input ids), the token counts of its images and video frames in sequence order,
    from the encoder calls that produced them (``records`` and their ``units_of``; ``placeholder_of(method)`` is
    the placeholder id of what that encoder method encodes)."""
    sizes: dict[int, list[int]] = {}  # placeholder id -> unit sizes, in encoding order
    for (name, _), units in zip(records, units_of):
        sizes.setdefault(placeholder_of(name), []).extend(units)
    if rows is None or not sizes:
        raise PruningError(
            "budgets per image, frame or crop (budget_per='image', 'crop') need the images to be encoded by the "
            "patched model from input_ids in this call "
            "(no encoding of this prompt's images was recorded)"
        )
    queues = {t: iter(v) for t, v in sizes.items()}
    out = []
    for row in rows:
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
    if [sum(u) for u in out] != list(visual_counts):
        raise PruningError(f"images and frames of {[sum(u) for u in out]} tokens do not match {visual_counts}")
    return out


def crop_units(rows: Tensor, images: list[list[int]], crops: tuple[Tensor, int], image_id: int,
               placeholders: list[int]) -> list[BudgetUnits]:
    """``budget_per="crop"``: per prompt row, every crop of every split image is a unit (its budget computed from
    the crop's patches, ``crops[1]``); tokens of no crop (row breaks, ``crops[0]`` = -1) are in none; other
    images and video frames (``images``: per row, their token counts) are units as with ``"image"``."""
    crop_of, crop_size = crops
    crop_of = crop_of.cpu()
    placeholders = torch.tensor(placeholders)
    others = int(crop_of.max()) + 1 if crop_of.numel() else 0  # unit keys of non-crop units start here
    out, start = [], 0
    for row, sizes in zip(rows, images):
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
    return out
