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
from ..ops import shared_constant


def _heads(proj: Tensor, head_dim: int) -> Tensor:
    return proj.view(proj.shape[0], proj.shape[1], -1, head_dim)


def rows_of(t: Tensor, b: int, rows: Tensor | None = None) -> Tensor:
    """Sample ``b`` (kept as a batch of one) and, optionally, sequence ``rows`` of a (cos, sin) tensor laid out
    ``[..., B, L, D]`` (M-RoPE models on older releases lead with one row per axis)."""
    t = t.narrow(-3, b if t.shape[-3] > 1 else 0, 1)
    return t if rows is None else t[..., rows, :]


def cached_keys(cache, layer, hidden_in: Tensor) -> Tensor | None:
    """The keys decoder ``layer`` cached in this prefill for its input ``hidden_in`` ``[B, L, D]`` (after its rotary
    embedding, ``[B, kv_heads, L, head_dim]``): what :func:`attention_rows_batch` would compute again from the
    layer's projections. None where the cache does not hold exactly those (no cache; a layer that keeps fewer
    tokens, such as a sliding window; another shape, dtype or device)."""
    if cache is None:
        return None
    attn = C.SELF_ATTENTION.get(layer)
    layers, index = C.CACHE_LAYERS.get(cache, None), C.ATTENTION_LAYER_INDEX.get(attn, None)
    if layers is None or not isinstance(index, int) or not 0 <= index < len(layers):
        return None
    keys = C.CACHE_LAYER_KEYS.get(layers[index], None)
    if not isinstance(keys, Tensor) or keys.dim() != 4:
        return None
    B, L = hidden_in.shape[:2]
    if (keys.shape[0], keys.shape[2], keys.shape[3]) != (B, L, C.HEAD_DIM.get(attn)) or \
            keys.dtype != hidden_in.dtype or keys.device != hidden_in.device:
        return None
    return keys


def attention_rows(
    layer,
    hidden_in: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    attention_mask: Tensor | None,
    b: int,
    query_rows: Tensor,
    keys: Tensor | None = None,
) -> Tensor:
    """Attention probabilities of ``query_rows`` of sample ``b`` to every key of decoder ``layer``.

    ``hidden_in`` is the layer's input ``[B, L, D]`` (before its input norm); ``keys``: the batch's cached keys
    (:func:`cached_keys`), if any. Returns ``[H, R, L]`` in float32: :func:`attention_rows_batch` on sample ``b``
    alone.
    """
    embeddings = None
    if position_embeddings is not None:
        embeddings = (rows_of(position_embeddings[0], b), rows_of(position_embeddings[1], b))
    if attention_mask is not None:
        attention_mask = attention_mask.narrow(0, b if attention_mask.shape[0] > 1 else 0, 1)
    return attention_rows_batch(layer, hidden_in[b : b + 1], embeddings, attention_mask, query_rows[None],
                                keys=None if keys is None else keys[b : b + 1])[0]


def attention_rows_batch(
    layer,
    hidden_in: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None,
    attention_mask: Tensor | None,
    query_rows: Tensor,
    normed: Tensor | None = None,
    keys: Tensor | None = None,
    last: bool = False,
) -> Tensor:
    """:func:`attention_rows` of every sample at once, ``query_rows`` ``[B, R]`` (the same number of rows in each
    sample): ``[B, H, R, L]`` in float32, the same operations batched (one launch each instead of one per sample).
    ``normed``: the layer's input norm of ``hidden_in`` where the caller already has it; ``keys``: the keys the
    layer cached for ``hidden_in`` (:func:`cached_keys`), the same values as computed here, taken as they are;
    ``last``: the query rows are each sample's last R rows (its rows and rotary tables are then sliced, not
    gathered: the same values)."""
    attn = C.SELF_ATTENTION.get(layer)
    head_dim = C.HEAD_DIM.get(attn)
    if normed is None:
        normed = C.INPUT_NORM.get(layer)(hidden_in)
    R, L = query_rows.shape[-1], hidden_in.shape[1]
    if last:
        picked = normed[:, L - R:]
    else:
        picked = normed.gather(1, query_rows[..., None].expand(-1, -1, normed.shape[-1]))  # [B, R, D]
    q = _heads(C.Q_PROJ.get(attn)(picked), head_dim)
    if C.Q_NORM.has(attn):
        q = C.Q_NORM.get(attn)(q)
    q = q.transpose(1, 2)  # [B, heads, rows, hd]
    B = hidden_in.shape[0]
    if position_embeddings is not None:
        cos, sin = position_embeddings  # [..., B or 1, L, D]
        rotate = C.ATTENTION_ROTARY.get(attn)
        lead = cos.dim() - 3
        index = query_rows.view((1,) * lead + tuple(query_rows.shape) + (1,))

        def full(t: Tensor) -> Tensor:  # every sample's rows
            return t.expand(t.shape[:lead] + (B,) + t.shape[-2:])

        def rows(t: Tensor) -> Tensor:  # the query rows of every sample
            return full(t).narrow(-2, L - R, R) if last else full(t).take_along_dim(index, dim=-2)

    if keys is not None:  # rotated already: q's rows alone are
        if position_embeddings is not None:
            q = rotate(q, rows(cos), rows(sin))
        return _probabilities(attn, q, keys, attention_mask, query_rows, last)
    k = _heads(C.K_PROJ.get(attn)(normed), head_dim)
    if C.K_NORM.has(attn):
        k = C.K_NORM.get(attn)(k)
    k = k.transpose(1, 2)
    if position_embeddings is not None:
        if q.shape[1] == k.shape[1]:
            # one call for q's rows and every key: the model's function rotates a pair, so a call for each would
            # compute each rotation twice; the rotation is element-wise, so the values are the same
            both = rotate(torch.cat([q, k], 2), torch.cat([rows(cos), full(cos)], -2),
                          torch.cat([rows(sin), full(sin)], -2))
            q, k = both[:, :, : q.shape[2]], both[:, :, q.shape[2]:]
        else:
            q = rotate(q, rows(cos), rows(sin))
            k = rotate(k, cos, sin)
    return _probabilities(attn, q, k, attention_mask, query_rows, last)


def _probabilities(attn, q: Tensor, k: Tensor, attention_mask: Tensor | None, query_rows: Tensor,
                   last: bool = False) -> Tensor:
    """softmax(q·kᵀ·scaling + mask) of rotated ``q`` ``[B, H, R, hd]`` and ``k`` ``[B, kv_heads, L, hd]``
    (``last``: the query rows are the last R rows, see :func:`attention_rows_batch`)."""
    B = q.shape[0]
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
    elif last:  # causal, no padding: the last R rows do not see the keys after them, among the last R
        R = scores.shape[2]
        scores[..., L - R:].masked_fill_(shared_constant(_later_keys, R, scores.device), float("-inf"))
    else:  # causal, no padding
        keys = torch.arange(L, device=scores.device)
        scores = scores.masked_fill(keys[None, None, None, :] > query_rows[:, None, :, None], float("-inf"))
    return scores.softmax(-1)


def _later_keys(rows: int, device: torch.device) -> Tensor:
    """``[rows, rows]``: True above the diagonal (made once per size and device: :func:`shared_constant`)."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)


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
