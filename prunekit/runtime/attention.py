"""Recomputing the attention rows a method needs, under any attention implementation.

With sdpa (or flash) attention the model never materialises attention weights, and switching a model to eager
attention to get them changes its numerics and its speed. We recompute only the query rows that are needed,
against all keys, from the layer's own projections: q = q_proj(norm(h)) (+ q_norm), k likewise, the model's own
rotary function, GQA repetition, scaling, mask, softmax. This matches eager attention's weights to float error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import contracts as C


def _heads(proj: Tensor, head_dim: int) -> Tensor:
    return proj.view(proj.shape[0], proj.shape[1], -1, head_dim)


def rows_of(t: Tensor, b: int, rows: Tensor | None = None) -> Tensor:
    """Sample ``b`` (kept as a batch of one) and, optionally, sequence ``rows`` of a (cos, sin) tensor laid out
    ``[..., B, L, D]`` (M-RoPE models on older releases lead with one row per axis)."""
    t = t.narrow(-3, b if t.shape[-3] > 1 else 0, 1)
    return t if rows is None else t[..., rows, :]


def attention_rows(
    layer,
    hidden_in: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    attention_mask: Tensor | None,
    b: int,
    query_rows: Tensor,
) -> Tensor:
    """Attention probabilities of ``query_rows`` of sample ``b`` to every key of decoder ``layer``.

    ``hidden_in`` is the layer's input ``[B, L, D]`` (before its input norm). Returns ``[H, R, L]`` in float32:
    :func:`attention_rows_batch` on sample ``b`` alone.
    """
    embeddings = None
    if position_embeddings is not None:
        embeddings = (rows_of(position_embeddings[0], b), rows_of(position_embeddings[1], b))
    if attention_mask is not None:
        attention_mask = attention_mask.narrow(0, b if attention_mask.shape[0] > 1 else 0, 1)
    return attention_rows_batch(layer, hidden_in[b : b + 1], embeddings, attention_mask, query_rows[None])[0]


def attention_rows_batch(
    layer,
    hidden_in: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    attention_mask: Tensor | None,
    query_rows: Tensor,
    normed: Tensor | None = None,
) -> Tensor:
    """:func:`attention_rows` of every sample at once, ``query_rows`` ``[B, R]`` (the same number of rows in each
    sample): ``[B, H, R, L]`` in float32, the same operations batched (one launch each instead of one per sample).
    ``normed``: the layer's input norm of ``hidden_in`` where the caller already has it."""
    attn = C.SELF_ATTENTION.get(layer)
    head_dim = C.HEAD_DIM.get(attn)
    if normed is None:
        normed = C.INPUT_NORM.get(layer)(hidden_in)
    picked = normed.gather(1, query_rows[..., None].expand(-1, -1, normed.shape[-1]))  # [B, R, D]
    q = _heads(C.Q_PROJ.get(attn)(picked), head_dim)
    k = _heads(C.K_PROJ.get(attn)(normed), head_dim)
    if C.Q_NORM.has(attn):
        q = C.Q_NORM.get(attn)(q)
    if C.K_NORM.has(attn):
        k = C.K_NORM.get(attn)(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, rows, hd]
    B = hidden_in.shape[0]
    if position_embeddings is not None:
        cos, sin = position_embeddings  # [..., B or 1, L, D]
        rotate = C.ATTENTION_ROTARY.get(attn)
        lead = cos.dim() - 3
        index = query_rows.view((1,) * lead + tuple(query_rows.shape) + (1,))

        def full(t: Tensor) -> Tensor:  # every sample's rows
            return t.expand(t.shape[:lead] + (B,) + t.shape[-2:])

        def rows(t: Tensor) -> Tensor:  # the query rows of every sample
            return full(t).take_along_dim(index, dim=-2)

        if q.shape[1] == k.shape[1]:
            # one call for q's rows and every key: the model's function rotates a pair, so a call for each would
            # compute each rotation twice; the rotation is element-wise, so the values are the same
            both = rotate(torch.cat([q, k], 2), torch.cat([rows(cos), full(cos)], -2),
                          torch.cat([rows(sin), full(sin)], -2))
            q, k = both[:, :, : q.shape[2]], both[:, :, q.shape[2]:]
        else:
            q = rotate(q, rows(cos), rows(sin))
            k = rotate(k, cos, sin)
    q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * C.SCALING.get(attn)  # [B, H, R, L]
    L = k.shape[2]
    if attention_mask is not None:
        m = attention_mask.expand(B, *attention_mask.shape[1:])
        m = m.take_along_dim(query_rows[:, None, :, None], dim=-2)[..., -L:]  # [B, 1, R, L]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    else:  # causal, no padding
        keys = torch.arange(L, device=scores.device)
        scores = scores.masked_fill(keys[None, None, None, :] > query_rows[:, None, :, None], float("-inf"))
    return scores.softmax(-1)


#: the rater rules the runtime computes: generic rules only (a method with a rule of its own asks
#: for every text token's attention row with ``per_rater=True`` and chooses its raters itself)
RATER_RULES = ("last_token", "all_text")


def select_raters(rule: str, text: Tensor) -> Tensor:
    """Text positions whose attention rates the visual tokens: ``last_token`` (the last text token) or ``all_text``
    (every text token), given ``text``, the positions of the instruction's tokens."""
    if text.numel() == 0:
        raise ValueError("no text tokens after the visual tokens to rate them")
    if rule == "last_token":
        return text[-1:]
    if rule == "all_text":
        return text
    raise ValueError(f"raters must be one of {list(RATER_RULES)}; got {rule!r}")
