"""Small pure tensor rules shared by scorers, selectors and methods (no model, no registry)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor


def topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores along the last dim (ties go to the lower index), ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(-1).values


def cosine(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarity of the rows of ``x`` ``[..., n, d]`` with those of ``y`` (default ``x``), in float32+."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.nn.functional.normalize(x.to(dtype), dim=-1)
    b = a if y is None else torch.nn.functional.normalize(y.to(dtype), dim=-1)
    return a @ b.transpose(-1, -2)


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise the last dim to [0, 1] (a constant row becomes all ones)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(x))


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, u]]`` for ``x`` ``[B, N, ...]`` and ``index`` ``[B, U]``: ``[B, U, ...]`` (one index_select)."""
    B, N = x.shape[:2]
    flat = index + torch.arange(0, B * N, N, device=index.device)[:, None] if B > 1 else index
    return x.reshape(B * N, *x.shape[2:]).index_select(0, flat.reshape(-1)).reshape(*index.shape, *x.shape[2:])


def same_buffer(held: Tensor | None, out: Tensor) -> bool:
    """Whether ``out`` is the buffer ``held`` (the same memory, shape and strides): a scorer run that wrote its
    gains into the selector's buffer at one step can skip writing them again at the next. False while
    ``torch.compile`` traces (a traced tensor has no address): the run then writes them every step, the same
    values."""
    if held is None or torch.compiler.is_compiling():
        return False
    return (held.data_ptr(), held.shape, held.stride()) == (out.data_ptr(), out.shape, out.stride())


def batch_of(rows) -> Tensor:
    """``torch.stack(rows)``, but one row's ``[1, ...]`` view rather than its copy: a launch fewer, which a GPU
    pays in host time at batch 1. For reading only: writing into the result would write into the row."""
    rows = list(rows)
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


def true_indices(mask: Tensor, count: int | list[int]) -> Tensor | list[Tensor]:
    """The ascending indices of the ``True`` entries of a 1-D ``mask``, as ``mask.nonzero().squeeze(1)`` gives them,
    when their number ``count`` is known on the host. ``nonzero`` reads its output's size back from the device
    (on a GPU that waits for the stream to drain); a stable sort puts the ``True`` entries first, in order, without
    reading anything. A ``[B, N]`` mask with ``count`` a list gives one tensor per row (one sort for the batch).
    ``count`` must be right: nothing checks it (that would read the device)."""
    return false_indices(~mask, count)


def false_indices(mask: Tensor, count: int | list[int]) -> Tensor | list[Tensor]:
    """:func:`true_indices` of the ``False`` (or 0) entries of ``mask`` (bool, or 0/1 integers): a stable sort puts
    them first, in order; ``count`` of them, known on the host."""
    order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices
    if mask.dim() == 1:
        return order[:count]
    return [order[b, :c] for b, c in enumerate(count)]


def shared_constant(make: Callable[..., Any], *args) -> Any:
    """``make(*args)``, made once for each ``make`` (a module-level function) and ``args`` (hashable: sizes, a
    device), then shared: a small constant tensor (or a tuple of them) a hot path would otherwise build at every
    call. Made outside inference mode, so that a forward recording gradients can use one first made in an
    inference-mode forward. For reading only."""
    return _shared(make, args)


@functools.lru_cache(maxsize=64)
def _shared(make: Callable[..., Any], args: tuple) -> Any:
    with torch.inference_mode(False):
        return make(*args)
