"""Pool: average-pool each image's token grid down to the budget (LLaVA-OneVision-style downsampling).

For ``k`` cells on an ``R × C`` grid the grid is cut into ``h`` bands of rows (``h`` close to ``√(k·R/C)``) and each
band into ``⌊k/h⌋`` or ``⌈k/h⌉`` cells, so any ``k ≤ R·C`` is met exactly; when ``h`` divides ``k`` this is plain
adaptive average pooling. Each pooled token sits at the position of its cell's centre patch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from prunekit.plugin import (
    Choice,
    Method,
    MethodConfig,
    ModelSpec,
    Reduction,
    Stage,
    StagePlan,
    StrictModel,
    hookimpl,
    make_stages,
    shared_constant,
)


def pooling_plan(rows: int, cols: int, k: int) -> tuple[Tensor, Tensor]:
    """``(weights [k, rows·cols], centres [k])``: averaging weights and the centre patch of each of ``k`` cells
    (made once for each grid and ``k``: :func:`~prunekit.ops.shared_constant`; read only)."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"cannot pool a {rows}x{cols} grid to {k} tokens (need 1..{rows * cols})")
    return shared_constant(_plan, rows, cols, k)


def _plan(rows: int, cols: int, k: int) -> tuple[Tensor, Tensor]:
    h = min(k, max(math.ceil(k / cols), min(rows, round(math.sqrt(k * rows / cols)) or 1)))
    per_band = [k // h + (1 if i < k % h else 0) for i in range(h)]
    weights = torch.zeros(k, rows * cols)
    centres = torch.zeros(k, dtype=torch.long)
    cell = 0
    for i, w in enumerate(per_band):
        r0, r1 = (i * rows) // h, -((-(i + 1) * rows) // h)
        for j in range(w):
            c0, c1 = (j * cols) // w, -((-(j + 1) * cols) // w)
            block = torch.zeros(rows, cols)
            block[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            weights[cell] = block.flatten()
            centres[cell] = ((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2
            cell += 1
    return weights, centres


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over images of ``sizes`` tokens in proportion to their sizes (largest remainders first, ties
    to earlier images), never more than an image holds; equal images get equal shares."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} tokens")
    exact = [k * s / total for s in sizes]
    out = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: k - sum(out)]:
        out[i] += 1
    return out


def pool_grids(features: Tensor, grids: list[tuple[int, int]], k: int) -> Choice:
    """Pool one sample's tokens (``features [n, D]``, images laid out as ``grids``) to ``k`` tokens."""
    n = features.shape[0]
    if sum(r * c for r, c in grids) != n:
        raise ValueError(f"grids {grids} hold {sum(r * c for r, c in grids)} tokens, features have {n}")
    indices, values, merged, offset = [], [], [], 0
    for (r, c), kk in zip(grids, split_budget(k, [r * c for r, c in grids])):
        if kk:
            w, centres = pooling_plan(r, c, kk)
            w = w.to(device=features.device, dtype=torch.float32)
            values.append((w @ features[offset: offset + r * c].float()).to(features.dtype))
            indices.append(centres.to(features.device) + offset)
            merged.append((w > 0).sum(1) > 1)
        offset += r * c
    return Choice(torch.cat(indices), torch.cat(values), torch.cat(merged).to(features.device))


class PoolSelection(StrictModel):
    grid: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="(rows, cols) of the token grid for prunekit.select; None: a square grid of N tokens."
    )


class PoolConfig(MethodConfig):
    insertion_point: Literal["after_projector", "vision_features"] = Field(
        "after_projector", description="Pool the projected tokens (LLaVA-OneVision) or the vision features."
    )


class Pool(Method):
    name = "pool"
    Config = PoolConfig
    SelectionConfig = PoolSelection
    description = "Average-pool each image's token grid to the budget."

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor | None, k: int, config,
             grids: list[tuple[int, int]] | None = None) -> Choice:
        """``grids``: the ``(rows, cols)`` of each image whose tokens ``features`` holds, in order."""
        if grids is None:
            raise ValueError("pool needs the token grid of each image; this model's adapter does not give one")
        return pool_grids(features, grids, k)

    def plan(self, spec: ModelSpec) -> list[Stage]:
        choose = self.chooser(grids=lambda ctx: ctx.grids)
        return make_stages(self.config, spec, [StagePlan(self.config.insertion_point, choose, label="pool")],
                           method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config: PoolSelection) -> Reduction:
        """Model-free: every sample is one grid, ``config.grid`` or a square."""
        B, N = features.shape[:2]
        grid = config.grid
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"pool: {N} tokens are not a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        return cls.apply_rule(features, relevance, k, config, grids=[[grid]] * B)


@hookimpl
def prunekit_register_methods(register):
    register(Pool)
