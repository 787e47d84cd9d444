"""PruMerge+ and CDPruner against what their official code computes, transcribed here step by step.

The references below follow the official control flow (its loops, its order of operations) in plain torch and
numpy and never call prunekit. They were written from reading:

* PruMerge+: 42Shawn/LLaVA-PruMerge @ 097c041, ``llava/model/multimodal_encoder/clip_encoder.py``:
  ``outlier_dectection`` (L34-47) and ``token_prune_merge_advanced_plus`` (L174-281), the default path of
  ``forward`` (L300, ``if_adaptive=True``);
* CDPruner: Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py``, ``encode_images`` (L141-187).

Only what prunekit documents as substituted is substituted: CDPruner's image–text similarity is prunekit's
instruction similarity (there is no CLIP text tower in a LLaVA checkpoint). PruMerge+'s q/k come, as in the
official code (``layers[23]``, L182-183, the last of CLIP-L's 24), from the encoder's last layer
(``attention_layer="last"``, the default): on LLaVA the layer after the one whose output feeds the projector, on
that output (``"next"``); ``attention_layer="feature"`` reads the feature layer's own and is compared with the same
transcription fed that layer's q/k.
PruMerge+ is compared at the budget that equals the official adaptive count (for that budget the official result
is defined); token for token, in the official order, and value for value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs


# ------------------------------------------------------------------------------------------------------------------
# PruMerge+ reference (clip_encoder.py)
# ------------------------------------------------------------------------------------------------------------------
def official_outlier_ratio(cls_attn: torch.Tensor) -> float:
    """L34-47: the share of tokens above Q3 + 1.5·IQR, in numpy on float32 values, pooled over the batch."""
    values = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    above = np.where(values > q3 + 1.5 * (q3 - q1))[0]
    return len(above) / len(values)


def official_cls_attention(q: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """L198-201: q_proj / k_proj outputs ``[B, 1 + N, C]`` as one head, scaled by C^-1/2; row of [CLS], patches."""
    probs = F.softmax((q @ k.transpose(-2, -1)) * width**-0.5, dim=-1)
    return probs[:, 0, 1:]


def official_complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``complement_idx`` (L12-25) for ``idx`` ``[1, m]``: the positions not in ``idx``, ascending, ``[1, n - m]``."""
    zeroed = torch.scatter(torch.arange(n)[None].expand(idx.shape[0], -1), -1, idx, 0)
    ordered, _ = torch.sort(zeroed, dim=-1)
    return ordered[:, idx.shape[1]:]


def official_prumerge_plus(feats: torch.Tensor, cls_attn: torch.Tensor, patch_keys: torch.Tensor):
    """L203-281 for one image (the code's adaptive path only runs with batch 1): ``feats`` ``[1, N, C]`` the vision
    features, ``cls_attn`` ``[1, N]``, ``patch_keys`` ``[1, N, Ck]`` (k_proj without the [CLS] row).

    Returns the kept positions in the official order and the tokens ``[1, kept + 1, C]`` (the extra one last)."""
    N = feats.shape[1]
    ratio = official_outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * ratio), dim=1, largest=True)
    step = int(1 / ratio)
    grid = torch.arange(0, N - 1, int(step / 3))  # the code's 575 is N - 1 for LLaVA-1.5's 576 patches
    flat = idx.flatten()
    samples = torch.tensor([p for p in grid if p not in flat], dtype=torch.long)
    idx = torch.cat((idx, samples.unsqueeze(0)), dim=1)

    C = feats.shape[-1]
    x_kept = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    a_kept = torch.gather(cls_attn, 1, idx)
    k_kept = torch.gather(patch_keys, 1, idx.unsqueeze(-1).expand(-1, -1, patch_keys.shape[-1]))
    compl = official_complement(idx, N)
    x_rest = torch.gather(feats, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    k_rest = torch.gather(patch_keys, 1, compl.unsqueeze(-1).expand(-1, -1, patch_keys.shape[-1]))
    a_rest = torch.gather(cls_attn, 1, compl)
    k_kept, k_rest = F.normalize(k_kept, p=2, dim=-1), F.normalize(k_rest, p=2, dim=-1)

    merged = torch.zeros_like(x_kept)
    for i in range(idx.shape[1]):
        own_key = k_kept[0, i][None, None]
        other_x = torch.cat([x_kept[0, :i][None], x_kept[0, i + 1:][None], x_rest[0][None]], dim=1)
        other_a = torch.cat([a_kept[0, :i][None], a_kept[0, i + 1:][None], a_rest[0][None]], dim=1)
        other_k = torch.cat([k_kept[0, :i][None], k_kept[0, i + 1:][None], k_rest[0][None]], dim=1)
        _, near = torch.topk(torch.bmm(own_key, other_k.transpose(1, 2)), k=32, dim=2, largest=True)
        weighted = torch.sum(other_x[:, near.squeeze(), :] * other_a[:, near.squeeze()].unsqueeze(-1), dim=1)
        merged[0, i, :] = x_kept[0, i, :] + weighted  # not divided by the weights' sum
    extra = torch.sum(x_rest * a_rest.unsqueeze(-1), dim=1, keepdim=True)
    return idx[0], torch.cat([merged, extra], dim=1)


def _random_vision(seed: int, N: int = 576, C: int = 1024, dtype=torch.float32):
    """Features ``[1, N, C]`` and layer q/k ``[1, 1 + N, C]`` of CLIP-L's size, with a peaked [CLS] row."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, N, C, generator=g, dtype=dtype)
    k = torch.randn(1, N + 1, C, generator=g, dtype=dtype)
    q = torch.randn(1, N + 1, C, generator=g, dtype=dtype) * 0.8  # keeps 110-190 of 576, about 25 %
    return feats, q, k


def _places(order: torch.Tensor, n: int) -> list[int]:
    """Where prunekit puts each official token: a kept token in its own place, the extra one in the last pruned."""
    return order.tolist() + [max(set(range(n)) - set(order.tolist()))]


def _in_sequence(tokens: torch.Tensor, places: list[int]) -> torch.Tensor:
    """The official tokens ``[K, D]`` rearranged into the sequence order of their places."""
    return tokens[torch.tensor(sorted(range(len(places)), key=places.__getitem__))]


@pytest.mark.parametrize("seed", range(4))
def test_prumerge_plus_equals_the_official_code_on_random_tensors(seed):
    from prunekit_plugins.methods.prumerge_plus import prumerge_plus_choice

    feats, q, k = _random_vision(seed)
    cls_attn = official_cls_attention(q, k, feats.shape[-1])
    order, tokens = official_prumerge_plus(feats, cls_attn, k[:, 1:])
    assert 0 < official_outlier_ratio(cls_attn) < 1 / 3, "the official code needs outliers, and a stride >= 1"
    K = tokens.shape[1]  # the official adaptive count, the extra token included

    places = _places(order, feats.shape[1])
    # order="official": the official sequence, laid into the kept places in sequence order
    got = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], K, order="official")
    assert got.indices.tolist() == sorted(places)
    torch.testing.assert_close(got.values, tokens[0], rtol=1e-5, atol=1e-5)
    assert got.merged.all()

    # order="sequence": each token in its own place (the runtime puts them in sequence order)
    got = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], K, order="sequence")
    assert got.indices.tolist() == places
    torch.testing.assert_close(got.values, tokens[0], rtol=1e-5, atol=1e-5)

    # extra_token=False at the official count of kept tokens: the same kept tokens, no extra one
    got = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], K - 1, extra_token=False, order="sequence")
    assert got.indices.tolist() == order.tolist()
    torch.testing.assert_close(got.values, tokens[0, :-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_prumerge_plus_model_free_reduce_is_the_official_code_with_features_as_keys(seed):
    feats, q, k = _random_vision(seed, N=576, C=64, dtype=torch.float64)
    cls_attn = official_cls_attention(q, k, 1024)  # any peaked attention will do here
    order, tokens = official_prumerge_plus(feats, cls_attn, feats)
    K = tokens.shape[1]
    red = prunekit.reduce("prumerge_plus", feats, cls_attn, k=K)
    places = _places(order, feats.shape[1])
    assert red.indices[0].tolist() == sorted(places)
    torch.testing.assert_close(red.values[0], _in_sequence(tokens[0], places))
    assert red.merged.all()


def test_prumerge_plus_budgets_other_than_the_official_count():
    """Outliers first, most attended first; the spatial samples thinned from, or refined beyond, the official grid."""
    from prunekit_plugins.methods.prumerge_plus import prumerge_plus_choice

    feats, q, k = _random_vision(0)
    cls_attn = official_cls_attention(q, k, feats.shape[-1])
    order, tokens = official_prumerge_plus(feats, cls_attn, k[:, 1:])
    outliers = int(576 * official_outlier_ratio(cls_attn))
    grid = set(order[outliers:].tolist())
    for K in (outliers + 1 + 10, tokens.shape[1] - 5):  # fewer spatial samples: a subset of the official ones
        got = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], K, order="sequence")
        assert got.indices[:outliers].tolist() == order[:outliers].tolist()
        assert set(got.indices[outliers:-1].tolist()) <= grid and got.indices.numel() == K
    more = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], tokens.shape[1] + 40, order="sequence")
    assert more.indices[:outliers].tolist() == order[:outliers].tolist()
    assert more.indices.unique().numel() == more.indices.numel() == tokens.shape[1] + 40
    few = prumerge_plus_choice(feats[0], cls_attn[0], k[0, 1:], 4, order="sequence")  # below the outliers
    assert few.indices[:3].tolist() == order[:3].tolist()


# --- on the tiny LLaVA, through prunekit.build ----------------------------------------------------------------------
#: the tiny LLaVA's vision layer read by each attention_layer (its tower has 3 layers; the projector reads [-2])
READ_LAYER = {"last": -1, "next": -1, "feature": -2}


def _sharpened_llava(seed: int, scale: float, attention_layer: str = "last"):
    """A tiny LLaVA whose [CLS] attention at the layer read is peaked enough to have IQR outliers."""
    model = tiny_llava(seed=seed)
    attn = model.model.vision_tower.encoder.layers[READ_LAYER[attention_layer]].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(scale)
        attn.q_proj.bias.mul_(scale)
    return model


def _official_signals(model, pixel_values, attention_layer: str = "last"):
    """The tiny LLaVA's vision features (``hidden_states[-2]``), and the [CLS] attention and keys (L198-201) of the
    q_proj/k_proj outputs of the layer read: the official code's, the last layer (whose input is the features,
    L182-183 hook ``layers[23]`` of CLIP-L's 24), or the feature layer itself (``attention_layer="feature"``)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    assert model.config.vision_feature_layer == -2 and len(tower.encoder.layers) == 3
    index = READ_LAYER[attention_layer]
    layer = tower.encoder.layers[index]
    normed = layer.layer_norm1(out.hidden_states[index - 1])  # hidden_states[i] is the input of layers[i]
    q, k = layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
    feats = out.hidden_states[-2][:, 1:]
    return feats, official_cls_attention(q, k, feats.shape[-1]), k[:, 1:]


def _lm_inputs(model):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("seed,scale,image", [(1, 6.0, 1), (2, 3.0, 1), (2, 6.0, 1), (0, 6.0, 2)])
@pytest.mark.parametrize("order", ["official", "sequence"])
@pytest.mark.parametrize("attention_layer", ["last", "next", "feature"])
def test_prumerge_plus_in_the_model_gives_the_llm_the_official_tokens(seed, scale, image, order, attention_layer):
    model = _sharpened_llava(seed, scale, attention_layer)
    x = tiny_llava_inputs(model, batch=1, left_pad=(0,), seed=image)
    with torch.no_grad():
        kept, tokens = official_prumerge_plus(*_official_signals(model, x["pixel_values"], attention_layer))
        projected = model.model.multi_modal_projector(tokens[0])
        embeds = model.get_input_embeddings()(x["input_ids"][0])
    K = tokens.shape[1]
    assert K < 64, "the official count must prune"
    options = {} if attention_layer == "last" else {"attention_layer": attention_layer}  # "last": the default
    prunekit.build("prumerge_plus", model, keep_tokens=K, order=order, **options)
    seen, handle = _lm_inputs(model)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    report = assert_pruned(model)
    prunekit.remove(model)

    places = _places(kept, 64)
    assert report.stages[0].kept[0].tolist() == sorted(places)
    vis = (x["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    first = int(vis[0])
    got = seen[0][0, first:first + K]
    expect = projected if order == "official" else _in_sequence(projected, places)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # the text around the visual block is untouched
    torch.testing.assert_close(seen[0][0, :first], embeds[:first])
    torch.testing.assert_close(seen[0][0, first + K:], embeds[int(vis[-1]) + 1:])


@pytest.mark.parametrize("attention_layer", ["last", "next", "feature"])
def test_prumerge_plus_reads_one_head_over_the_whole_width(model, inputs, monkeypatch, attention_layer):
    """The captured signals (heads="one") equal the [CLS] attention and keys computed by hand from the weights of
    the layer read (by default the last one, as the official code: here the one after the feature layer)."""
    from prunekit_plugins.methods import prumerge_plus as pm

    captured = {"attn": [], "keys": []}
    original = pm.prumerge_plus_choice

    def spy(features, attn, keys, k, *args):
        captured["attn"].append(attn)
        captured["keys"].append(keys)
        return original(features, attn, keys, k, *args)

    monkeypatch.setattr(pm, "prumerge_plus_choice", spy)
    options = {} if attention_layer == "last" else {"attention_layer": attention_layer}
    prunekit.build("prumerge_plus", model, keep_tokens=20, **options)
    model(**inputs)
    assert_pruned(model)
    prunekit.remove(model)
    _, cls_attn, keys = _official_signals(model, inputs["pixel_values"], attention_layer)
    torch.testing.assert_close(torch.stack(captured["attn"]), cls_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(captured["keys"]), keys, rtol=1e-5, atol=1e-6)


def test_prumerge_plus_reads_the_last_layer_where_the_projector_reads_it(monkeypatch):
    """A projector that reads the encoder's last layer (the bundled model's vision_feature_layer=-1): the default
    reads that layer's own q/k, the official code's rule (its last layer); attention_layer="next" has no layer."""
    from prunekit_plugins.methods import prumerge_plus as pm

    model = tiny_llava(seed=3)
    model.config.vision_feature_layer = -1
    x = tiny_llava_inputs(model, batch=1, left_pad=(0,))
    seen = []
    original = pm.prumerge_plus_choice
    monkeypatch.setattr(pm, "prumerge_plus_choice", lambda f, a, kk, k, *args: seen.append((a, kk)) or original(
        f, a, kk, k, *args))
    prunekit.build("prumerge_plus", model, keep_tokens=20)
    model(**x)
    assert_pruned(model)
    prunekit.remove(model)
    tower = model.model.vision_tower
    states = tower(x["pixel_values"], output_hidden_states=True).hidden_states
    last = tower.encoder.layers[-1]
    normed = last.layer_norm1(states[-2])  # the last layer's input
    q, k = last.self_attn.q_proj(normed), last.self_attn.k_proj(normed)
    torch.testing.assert_close(seen[0][0], official_cls_attention(q, k, k.shape[-1])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0][1], k[0, 1:], rtol=1e-5, atol=1e-6)
    prunekit.build("prumerge_plus", model, keep_tokens=20, attention_layer="next")
    try:
        with pytest.raises(prunekit.PruningError, match="layer='next'"):
            model(**x)
    finally:
        prunekit.remove(model)


def test_prumerge_plus_official_order_refuses_original_positions(model):
    with pytest.raises(ValueError, match="order='sequence'"):
        prunekit.build("prumerge_plus", model, positions="original")
    prunekit.build("prumerge_plus", model, positions="original", order="sequence")


# ------------------------------------------------------------------------------------------------------------------
# CDPruner reference (llava_arch.py, encode_images)
# ------------------------------------------------------------------------------------------------------------------
def official_cdpruner(image_features: torch.Tensor, text_similarity: torch.Tensor, T: int,
                      negate: bool = True, theta: float | None = None) -> torch.Tensor:
    """L148-185: ``image_features`` ``[B, N, D]`` after the projector; ``text_similarity`` ``[B, N, M]`` the cosine
    of each patch with each text embedding. ``negate=False`` / ``theta`` are the paper's sign and the commented-out
    weight (L163-166), not the code's default. Returns the kept indices ``[B, T]``, ascending."""
    B, N, _ = image_features.shape
    unit = image_features / image_features.norm(dim=-1, keepdim=True)
    unit = unit.float()
    similarity = torch.matmul(unit, unit.transpose(1, 2))
    relevance = ((-text_similarity) if negate else text_similarity).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)

    rows = torch.arange(B)
    cis = torch.zeros((T, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picked = torch.empty((T, B), dtype=torch.long)
    for i in range(T):
        j = torch.argmax(di2s, dim=-1)
        picked[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) \
            / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    return torch.sort(picked.t()).values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [64, 128, 192])
def test_cdpruner_equals_the_official_code_on_random_tensors(seed, T):
    """A similarity computed elsewhere (the official code's CLIP cosine) goes in with relevance_scorer="relevance"."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 576, 256, generator=g)
    sim = torch.rand(1, 576, 1, generator=g) * 0.6 - 0.3  # cosine of each patch with the (one-segment) text
    expect = official_cdpruner(feats, sim, T)
    kept = prunekit.select("cdpruner", feats, sim[..., 0], k=T, relevance_scorer="relevance")
    assert kept.tolist() == expect.tolist()


@pytest.mark.parametrize("negate,theta", [(False, None), (True, 0.5), (False, 0.8)])
def test_cdpruner_sign_and_theta_options_follow_their_definitions(negate, theta):
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 300, 64, generator=g)
    sim = torch.rand(1, 300, 1, generator=g)
    expect = official_cdpruner(feats, sim, 40, negate=negate, theta=theta)
    kept = prunekit.select("cdpruner", feats, sim[..., 0], k=40, relevance_scorer="relevance",
                           negate_relevance=negate, theta=theta)
    assert kept.tolist() == expect.tolist()


def test_cdpruner_default_sign_is_the_official_one():
    from prunekit_plugins.methods.cdpruner import CDPrunerConfig

    assert CDPrunerConfig().negate_relevance is True and CDPrunerConfig().theta is None


@pytest.mark.parametrize("T", [10, 20, 40])
def test_cdpruner_in_the_model_equals_the_official_code_on_the_substitute_similarity(model, inputs, T):
    prunekit.build("cdpruner", model, keep_tokens=T)
    with torch.no_grad():
        model(**inputs)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embed = model.get_input_embeddings()
        for b in range(2):
            ids = inputs["input_ids"][b]
            last = int((ids == model.config.image_token_id).nonzero().max())
            text = embed(ids[last + 1:])  # the instruction after the image: prunekit's stand-in for the CLIP text
            cos = F.normalize(feats[b], dim=-1) @ F.normalize(text, dim=-1).T
            mean = cos.mean(-1)
            stand_in = (mean - mean.min()) / (mean.max() - mean.min())  # scorer query_similarity, min-max normalised
            expect = official_cdpruner(feats[b][None], stand_in[None, :, None], T)
            assert report.stages[0].kept[b].tolist() == expect[0].tolist()
