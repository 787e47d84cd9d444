"""Determinantal point process MAP by fast greedy inference (Chen et al., NeurIPS'18): CDPruner's engine."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.plugin import SelectionInput, Selector, hookimpl


def dpp_greedy_map(kernel: Tensor, k: int, fallback: Tensor | None = None, eps: float = 1e-10) -> Tensor:
    """Greedy MAP of a DPP with PSD ``kernel`` ``[B, N, N]``: ``k`` indices per row, in pick order.

    Each step adds the item with the largest marginal gain ``d_i² = L_ii − ‖c_i‖²`` (the log-det increase), updating
    the incremental Cholesky rows ``c`` in O(N·t). Once every remaining gain is ``≤ eps`` (the kernel's rank is spent),
    the rest are taken in decreasing ``fallback`` order (default: the diagonal), ties to the lower index.
    """
    B, N, _ = kernel.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be in 1..{N}, got {k}")
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    L = kernel.to(dtype)
    rows = torch.arange(B, device=L.device)
    gains = L.diagonal(dim1=1, dim2=2).clone()
    order = (fallback if fallback is not None else gains).to(dtype)
    chol = torch.zeros(B, k, N, dtype=dtype, device=L.device)
    # chosen items are -inf in both the gains and the fallback order, written in place as they are picked (no
    # mask, no copy per step); the fallback pick is taken every step and chosen on the device, so the loop never
    # reads a value back to the host
    left = order.clone()  # (order may be gains itself)
    picks = []
    for t in range(k):
        best, j = gains.max(-1)
        spent = best <= eps
        j = torch.where(spent, left.argmax(-1), j)
        picks.append(j)
        left.scatter_(1, j[:, None], float("-inf"))  # scatter_, not an assignment of a Python value through an index
        if t + 1 == k:
            break
        dj = gains[rows, j].clamp_min(0).sqrt()
        gains.scatter_(1, j[:, None], float("-inf"))
        cj = chol[rows, :t, j]  # [B, t]
        e = (L[rows, j] - torch.einsum("bt,btn->bn", cj, chol[:, :t])) / dj.clamp_min(eps)[:, None]
        e = torch.where((spent | (dj <= eps))[:, None], 0.0, e)
        chol[:, t] = e
        gains = gains - e**2  # -inf stays -inf at chosen items
    return torch.stack(picks, 1)


class DppSelector(Selector):
    """``L = diag(r)·S·diag(r)`` with ``S`` the cosine similarity and ``r`` the relevance (all ones without one)."""

    name = "dpp"

    def select(self, inputs: SelectionInput, k: int) -> Tensor:
        S = inputs.similarity
        r = inputs.relevance if inputs.relevance is not None else torch.ones_like(S[..., 0])
        kernel = r[:, :, None] * S * r[:, None, :]
        return dpp_greedy_map(kernel, k, fallback=r).sort(-1).values


@hookimpl
def prunekit_register_selectors(register):
    register(DppSelector)
