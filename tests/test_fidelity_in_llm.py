"""FastV, PyramidDrop and DART against literal transcriptions of their official code.

Each reference below is written from reading the official implementation (FastV's ``modeling_llama.py``,
PyramidDrop's ``modeling_llama_pdrop.py`` ``pdrop_rank_drop``, DART's ``get_retained_image_token`` as carried by
LLMC): batch of one, no padding, eager attention computed by hand from the unpatched model's own modules and hidden
states. prunekit runs the same model with sdpa and its hooks; the kept tokens must be the same, token for token.
"""

import math

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.testing import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_llava(num_layers=8)
    inputs = tiny_llava_inputs(model, batch=1, left_pad=(0,), question=(5, 6, 7, 8, 9, 10))
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # hidden[i]: input of layer i
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    return model, inputs, hidden, visual


def _qk(layer, lm, h, rope=True):
    """Queries and keys of decoder ``layer`` on its input ``h`` [1, L, D]: [heads, L, hd] each (keys repeated
    for grouped heads), after the rotary embedding of positions 0..L-1."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    L, hd = h.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, L, -1, hd).transpose(1, 2)
    if rope:
        cos, sin = lm.rotary_emb(h, position_ids=torch.arange(L)[None])
        rot = lambda t: t * cos[:, None] + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin[:, None]  # noqa: E731
        q, k = rot(q), rot(k)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q[0].double(), k[0].double()


def _last_token_attention(layer, lm, h, visual):
    """Attention of the last token to each visual token, mean over heads (causal, eager)."""
    q, k = _qk(layer, lm, h)
    scores = q[:, -1:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # the last query sees every key
    return scores.softmax(-1).mean(0)[0][visual]


def _kept(model, method, **options):
    with torch.no_grad():
        prunekit.build(method, model, **options)
        try:
            model(**_kept.inputs)
            return prunekit.pruning_report(model).stages[0].kept[0].tolist()
        finally:
            prunekit.remove(model)


@pytest.mark.parametrize("K, k", [(2, 16), (3, 32), (5, 8)])
def test_fastv_keeps_the_top_k_of_layer_k_minus_1_attention(setup, K, k):
    """FastV: at layer K, rank by the last token's attention in layer K-1 (its output attentions), top-k."""
    model, inputs, hidden, visual = setup
    lm = C.LANGUAGE_MODEL.get(model.model)
    score = _last_token_attention(lm.layers[K - 1], lm, hidden[K - 1], visual)
    ref = sorted(score.topk(k).indices.tolist())
    _kept.inputs = inputs
    assert _kept(model, "fastv", layer=K, schedule=[k]) == ref


def test_fastv_and_dart_keep_original_positions_by_default():
    assert prunekit.make_config("fastv")[1].positions == "original"
    assert prunekit.make_config("dart")[1].positions == "original"
    assert prunekit.make_config("pdrop")[1].positions == "auto"  # renumbers on LLaVA, as its code


@pytest.mark.parametrize("layer, k", [(2, 16), (4, 32)])
def test_pdrop_ranks_with_the_stage_layers_own_attention(setup, layer, k):
    """PyramidDrop: after layer ℓ-1 (rank_layer = ℓ), layer ℓ's input_layernorm / q_proj / k_proj on layer ℓ's
    input, the last instruction token's query, softmax, mean over heads, then top keep_length."""
    model, inputs, hidden, visual = setup
    lm = C.LANGUAGE_MODEL.get(model.model)
    score = _last_token_attention(lm.layers[layer], lm, hidden[layer], visual)
    ref = sorted(score.topk(k).indices.tolist())
    _kept.inputs = inputs
    assert _kept(model, "pdrop", layers=[layer], schedule=[k]) == ref
    # FastV's rule (layer ℓ-1's attention) is still there as an option, and it differs here
    previous = sorted(_last_token_attention(lm.layers[layer - 1], lm, hidden[layer - 1], visual).topk(k).indices.tolist())
    assert _kept(model, "pdrop", layers=[layer], schedule=[k], attention_layer="previous") == previous


def _dart_official(model, hidden, ids, visual, K, token_topk, pivot_image_token=4, pivot_text_token=4):
    """DART's get_retained_image_token, literally: keys after RoPE of layer K-1 (heads side by side), L1 norms,
    pivots, then for each pivot in set order the TOKEN_TOPK least cosine-similar remaining visual tokens on the
    final-normed input of layer K; the text pivots are dropped from the result."""
    lm = C.LANGUAGE_MODEL.get(model.model)
    _, k = _qk(lm.layers[K - 1], lm, hidden[K - 1])
    any_states = k.permute(1, 0, 2).reshape(k.shape[1], -1)  # [L, heads * hd]
    last_layer_state = lm.norm(hidden[K])[0].double()
    start, length = int(visual[0]), visual.numel()
    k_image = any_states[start:start + length]
    k_query = any_states[start + length:]
    image_indices = (k_image.abs().sum(-1).topk(pivot_image_token).indices + start).tolist()
    query_indices = (k_query.abs().sum(-1).topk(pivot_text_token).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid_indices)
    for item in list(indices_set):
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item], last_layer_state[valid_list], dim=-1)
        top = [valid_list[i] for i in cos_sim.topk(token_topk).indices.tolist()]
        indices_set.update(top)
        valid_indices.difference_update(top)
        valid_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(i - start for i in indices_set)


@pytest.mark.parametrize("K, token_topk", [(2, 3), (3, 5), (2, 6)])
def test_dart_matches_the_official_pivot_loop(setup, K, token_topk):
    model, inputs, hidden, visual = setup
    ref = _dart_official(model, hidden, inputs["input_ids"][0], visual, K, token_topk)
    assert len(ref) == 4 + 8 * token_topk  # the official count: B + image pivots
    _kept.inputs = inputs
    assert _kept(model, "dart", layer=K, schedule=[len(ref)]) == ref
    # the nominal budget B is the official code's: 8 pivots claim B // 8 each, the 4 visual pivots on top
    assert _kept(model, "dart", layer=K, keep_tokens=8 * token_topk) == ref
