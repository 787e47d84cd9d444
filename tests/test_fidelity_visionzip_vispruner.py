"""VisionZip and VisPruner against transcriptions of what their official code computes (project issue 14).

Each ``official_*`` function below follows the official control flow step by step, in plain torch, and never calls
prunekit. Line numbers are those of the official files:

* VisionZip, dvlab-research/VisionZip: ``visionzip/main.py`` L7 (the public ``dominant`` counts the [CLS] token:
  ``dominant - 1`` patches are chosen), ``visionzip/clip_encoder.py`` L43-83 (the selection and merge),
  ``visionzip/utils.py`` L10-89 (the attention forward it installs: softmax(q·scale · kᵀ) per head; the metric is
  that layer's keys, mean over heads, L89) and L191 (the metric comes from the second-to-last layer, the one whose
  attention and output are read).
* VisPruner, Theia-4869/VisPruner: ``llava/model/llava_arch.py`` L141-186 (the selection),
  ``llava/model/multimodal_encoder/clip_encoder.py`` L36-52 (features and [CLS] attention of ``select_layer``
  without the [CLS] row/column).

prunekit's visual tokens are the model's patch placeholders. By default (``cls_token=True``) the [CLS] feature the
official VisionZip feeds to the LLM fills one of their places: a prunekit budget of ``D + C`` equals the official
code called with ``dominant = D`` (the [CLS] plus ``D - 1`` patches) and ``contextual = C``, every row included; the
[CLS] feature's place is the first patch that is neither dominant nor a target (prunekit's rule: the official code
has no places). With ``cls_token=False``, and in the model-free ``reduce`` (which has no [CLS] feature), that place
goes to the next patch by [CLS] attention: ``D + C`` is compared with the official code called with
``dominant = D + 1``, its [CLS] row left out (docs/methods/visionzip.md, "Differences from the official code").
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.testing import assert_pruned, tiny_adapter_model
from prunekit_plugins.methods.visionzip import visionzip_choice
from test_llava import _eager_copy

#: the official budgets: (dominant, contextual) of VisionZip's paper for 64 / 128 / 192 tokens of 576
VISIONZIP_SPLITS = [(54, 10), (108, 20), (162, 30)]
HEADS = 16  # CLIP ViT-L/14's


# --- transcriptions of the official code ----------------------------------------------------------------------------
def official_visionzip(attn_weights, hidden_states, metric, dominant, contextual):
    """What ``visionzip(model, dominant, contextual)`` feeds to the projector, per sample.

    ``attn_weights [B, H, L', L]`` (only row 0, the [CLS] query, is read), ``hidden_states [B, L, C]`` and
    ``metric [B, L, d]``, all with the [CLS] token at index 0. Returns per sample a dict: ``tokens`` (the
    ``[CLS, dominant…, contextual…]`` rows), ``dominant`` (their sequence indices, [CLS] included, ascending),
    ``targets`` (the contextual tokens' target indices, in order) and ``joined`` (how many tokens each target took).
    """
    dominant_num = dominant - 1  # main.py L7
    out = []
    for b in range(hidden_states.shape[0]):
        L = hidden_states.shape[1]
        score = attn_weights[b, :, 0, 1:].sum(0)  # L51-52: [CLS] → patches, summed over heads
        chosen = torch.topk(score, dominant_num).indices + 1  # L53: patch index + 1 = sequence index
        keep = torch.zeros(L, dtype=torch.bool)
        keep[0] = True  # L54: the [CLS] token is always dominant
        keep[chosen] = True
        dominant_rows = hidden_states[b][keep]  # L57: sequence order
        remaining = (~keep).nonzero().squeeze(1)  # L60-62: the others, sequence order
        unit = metric[b][remaining] / metric[b][remaining].norm(dim=-1, keepdim=True)  # L64
        step = max(1, remaining.numel() // contextual)  # L67
        target_places = list(range(0, remaining.numel(), step))[:contextual]  # L68
        others = [p for p in range(remaining.numel()) if p not in target_places]  # L71
        similarity = unit[others] @ unit[target_places].T  # L72
        best = similarity.argmax(dim=1)  # L74
        merged_rows = []
        joined = []
        for t in range(len(target_places)):  # L73-80
            members = [others[i] for i in range(len(others)) if int(best[i]) == t]
            total = torch.zeros(hidden_states.shape[2], dtype=hidden_states.dtype)
            for p in members:
                total = total + hidden_states[b, remaining[p]]
            mean = total / max(len(members), 1)  # L75: counts clamped to 1
            merged_rows.append(hidden_states[b, remaining[target_places[t]]] + mean)  # L80
            joined.append(len(members))
        out.append({
            "tokens": torch.cat([dominant_rows, torch.stack(merged_rows)]),  # L83
            "dominant": keep.nonzero().squeeze(1),
            "targets": remaining[target_places],
            "joined": joined,
        })
    return out


def cls_place(off, n: int) -> int:
    """prunekit's place for the official [CLS] row: the first of the ``n`` patches that is neither one of the
    official dominant patches nor a target."""
    taken = set((torch.cat([off["dominant"][1:], off["targets"]]) - 1).tolist())
    return min(set(range(n)) - taken)


def official_vispruner(image_features, image_attentions, visual_token_num, important_ratio):
    """The kept-token mask of VisPruner's ``encode_images`` for ``[B, N, C]`` patch features and ``[B, H, N]``
    [CLS] attention rows over the patches (``feature_select`` with 'patch')."""
    B, N, _ = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)  # L150
    diverse_token_num = visual_token_num - important_token_num  # L151
    ranking = image_attentions.mean(dim=1).argsort(dim=-1, descending=True)  # L154-155
    important = ranking[:, :important_token_num]  # L156
    residual = ranking[:, important_token_num:]  # L157
    unit = image_features / image_features.norm(dim=-1, keepdim=True)  # L160
    while diverse_token_num > 0:  # L161
        R = residual.shape[1]
        r = min(8, R - diverse_token_num)  # L163
        if r <= 0:
            break
        tokens = torch.stack([unit[b, residual[b]] for b in range(B)])  # L167
        a, b_half = tokens[:, ::2], tokens[:, 1::2]  # L168
        scores = (a @ b_half.transpose(-1, -2)).max(dim=-1).values  # L169-170
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]  # L172
        # L173-176 (the official advanced indexing; with an even residual, as here, it is this gather)
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=-1)
    selected = torch.cat([important, residual], dim=-1) if diverse_token_num > 0 else important  # L178-181
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, selected, True)  # L182-183
    return mask


# --- random tensors at the official budgets --------------------------------------------------------------------------
def _random_tower(seed: int, B: int = 2, n: int = 576, width: int = 24):
    """``hidden [B, 1 + n, width]`` with the [CLS] first, and the [CLS] attention rows ``[B, H, 1, 1 + n]``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, 1 + n, width, generator=g, dtype=torch.float64)
    attn = torch.randn(B, HEADS, 1, 1 + n, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    return hidden, attn


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("dominant, contextual", VISIONZIP_SPLITS)
def test_visionzip_with_its_cls_row_equals_the_official_code(dominant, contextual, seed):
    """The model default (the [CLS] feature given) at k = D + C, C = round(10/64 · k): the paper's 54 + 10,
    108 + 20, 162 + 30 with the [CLS] among the dominant (README L128). Every official row, the [CLS] first, value
    for value and in the official order; the [CLS] place is marked merged (it is no patch's own value)."""
    hidden, attn = _random_tower(seed)
    k = dominant + contextual
    relevance = attn[:, :, 0, 1:].mean(1)
    official = official_visionzip(attn, hidden, hidden, dominant, contextual)
    for b, off in enumerate(official):
        got = visionzip_choice(hidden[b, 1:], relevance[b], hidden[b, 1:], k, cls_feature=hidden[b, 0])
        patches = (torch.cat([off["dominant"][1:], off["targets"]]) - 1).tolist()
        place = cls_place(off, 576)
        assert off["tokens"].shape[0] == k and len(patches) == k - 1
        assert got.indices.tolist() == sorted([place] + patches)
        torch.testing.assert_close(got.values, off["tokens"], rtol=1e-12, atol=1e-12)
        assert got.merged.tolist() == [True] + [False] * (dominant - 1) + [j > 0 for j in off["joined"]]
        # contextual_order="target": every row at its own place, the [CLS] at the place prunekit gives it
        by_position = visionzip_choice(hidden[b, 1:], relevance[b], hidden[b, 1:], k, order="target",
                                       cls_feature=hidden[b, 0])
        assert by_position.indices.tolist() == [place] + patches
        torch.testing.assert_close(by_position.values, off["tokens"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("dominant, contextual", VISIONZIP_SPLITS)
def test_visionzip_reduce_equals_the_official_code(dominant, contextual, seed):
    """Without a [CLS] feature (the model-free ``reduce``; ``cls_token=False`` on a model) at k = D + C: the official
    code called with one more dominant token, its [CLS] row left out. The model-free ``reduce`` reads the features
    as keys, so the official metric is the hidden states here."""
    hidden, attn = _random_tower(seed)
    k = dominant + contextual
    relevance = attn[:, :, 0, 1:].mean(1)  # what prunekit's cls_attention signal is: the mean over heads
    red = prunekit.reduce("visionzip", hidden[:, 1:], relevance, k=k)
    official = official_visionzip(attn, hidden, hidden, dominant + 1, contextual)
    by_position = prunekit.reduce("visionzip", hidden[:, 1:], relevance, k=k, contextual_order="target")
    as_mean = prunekit.reduce("visionzip", hidden[:, 1:], relevance, k=k, contextual_value="mean")
    for b, off in enumerate(official):
        patches = torch.cat([off["dominant"][1:], off["targets"]]) - 1  # without the [CLS]; patch indices
        assert red.indices[b].tolist() == sorted(patches.tolist())
        # the LLM sees the official sequence: dominant patches in sequence order, then the contextual tokens
        torch.testing.assert_close(red.values[b], off["tokens"][1:], rtol=1e-12, atol=1e-12)
        assert red.merged[b].tolist() == [False] * dominant + [j > 0 for j in off["joined"]]
        # contextual_order="target": every token at its own place
        order = patches.argsort()
        assert by_position.indices[b].tolist() == patches[order].tolist()
        torch.testing.assert_close(by_position.values[b], off["tokens"][1:][order], rtol=1e-12, atol=1e-12)
        # contextual_value="mean": the mean of the target and its joined tokens
        joined = torch.tensor(off["joined"], dtype=torch.float64)[:, None]
        targets = hidden[b, off["targets"]]
        contextual_rows = off["tokens"][1 + dominant:]
        expect = (targets + (contextual_rows - targets) * joined) / (joined + 1)
        torch.testing.assert_close(as_mean.values[b, dominant:], expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_vispruner_select_equals_the_official_code(budget, seed):
    hidden, attn = _random_tower(seed)
    features, attentions = hidden[:, 1:], attn[:, :, 0, 1:]  # feature_select 'patch' (clip_encoder.py L41-43)
    kept = prunekit.select("vispruner", features, attentions.mean(1), k=budget)
    mask = official_vispruner(features, attentions, budget, 0.5)
    for b in range(features.shape[0]):
        assert kept[b].tolist() == mask[b].nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("budget, ratio", [(64, 0.25), (64, 0.7), (96, 0.75), (100, 0.5), (64, 0.0), (64, 1.0)])
def test_vispruner_other_ratios_equal_the_official_code(budget, ratio):
    """Other splits where the official loop runs (its residual stays even, see the docs page); 64 at 0.7 keeps
    int(44.8) = 44 important tokens, where rounding would keep 45."""
    hidden, attn = _random_tower(11)
    features, attentions = hidden[:, 1:], attn[:, :, 0, 1:]
    kept = prunekit.select("vispruner", features, attentions.mean(1), k=budget, important_ratio=ratio)
    mask = official_vispruner(features, attentions, budget, ratio)
    for b in range(features.shape[0]):
        assert kept[b].tolist() == mask[b].nonzero().squeeze(1).tolist()


def test_vispruner_small_residuals_keep_exactly_k():
    """Where the official loop fails (an odd residual, or more to drop than its first half holds) prunekit keeps
    exactly k tokens: the important ones plus what the de-duplication leaves."""
    hidden, attn = _random_tower(3, B=1, n=40)
    for k in range(1, 40):
        kept = prunekit.select("vispruner", hidden[:, 1:], attn[:, :, 0, 1:].mean(1), k=k)
        assert kept.shape == (1, k) and kept.unique().numel() == k
        top = torch.sort(attn[0, :, 0, 1:].mean(0), descending=True, stable=True).indices[: int(k * 0.5)]
        assert set(top.tolist()) <= set(kept[0].tolist())


# --- the tiny LLaVA: the model's own [CLS] attention, keys and features ----------------------------------------------
def _official_tower(model, pixel_values):
    """What the official VisionZip reads from the vision tower: the [CLS]-first hidden states of the feature layer
    (``hidden_states[-2]``), that layer's attention recomputed as its attention forward does (utils.py L22-61), and
    its keys, mean over heads (utils.py L23, L89)."""
    tower = model.model.vision_tower
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    assert model.config.vision_feature_layer == -2  # the layer both official codes read
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]  # its output is hidden_states[-2]; its input hidden_states[-3]
    x = layer.layer_norm1(states[-3])
    attn = layer.self_attn
    B, L, _ = x.shape
    q = (attn.q_proj(x) * attn.scale).view(B, L, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(x).view(B, L, attn.num_heads, attn.head_dim).transpose(1, 2)
    weights = (q @ keys.transpose(-1, -2)).softmax(-1)  # [B, H, L, L]
    return weights, states[-2], keys.mean(1)


def _llm_visual_inputs(model, inputs, k):
    """Run the patched model; per sample, the ``k`` visual rows the language model received, in sequence order."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    question = 3  # tiny_llava_inputs: prefix, the image's tokens, then three question tokens
    return seen["embeds"][:, -question - k:-question]


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("keep, contextual", [(16, 2), (32, 5), (10, None)])
def test_visionzip_in_the_model_equals_the_official_code(model, inputs, keep, contextual, cls_token):
    """Kept tokens, their order and the projected values the LLM receives, against the official code run on the
    same vision tower: by default called with dominant = k - C, every row (the [CLS] first) projected;
    with cls_token=False called with dominant = k - C + 1, its [CLS] row left out."""
    options = {} if contextual is None else {"contextual_tokens": contextual}
    prunekit.build("visionzip", model, keep_tokens=keep, cls_token=cls_token, **options)
    received = _llm_visual_inputs(model, inputs, keep)
    report = assert_pruned(model)
    prunekit.remove(model)
    C = contextual if contextual is not None else round(keep * 10 / 64)
    weights, hidden, metric = _official_tower(model, inputs["pixel_values"])
    official = official_visionzip(weights, hidden, metric, keep - C + (not cls_token), C)
    n = hidden.shape[1] - 1
    for b, off in enumerate(official):
        patches = (torch.cat([off["dominant"][1:], off["targets"]]) - 1).tolist()
        joined = [j > 0 for j in off["joined"]]
        if cls_token:
            assert report.stages[0].kept[b].tolist() == sorted([cls_place(off, n)] + patches)
            assert report.stages[0].merged[b].tolist() == [True] + [False] * (keep - C - 1) + joined
            expect = model.model.multi_modal_projector(off["tokens"])
        else:
            assert report.stages[0].kept[b].tolist() == sorted(patches)
            assert report.stages[0].merged[b].tolist() == [False] * (keep - C) + joined
            expect = model.model.multi_modal_projector(off["tokens"][1:])
        torch.testing.assert_close(received[b], expect, rtol=1e-4, atol=1e-5)


def test_visionzip_on_llava_next_puts_the_base_views_cls_first():
    """LLaVA-NeXT (AnyRes): the prompt's first visual token is the base view's, so the [CLS] feature it carries is
    the base view's (crop 0) at the feature layer, projected, in the first place the LLM sees."""
    model, rows = tiny_adapter_model("llava_next")
    row = rows[0]  # one image
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    prunekit.build("visionzip", model, keep_ratio=0.3)
    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)  # after prunekit's
    try:
        model(**row)
    finally:
        handle.remove()
    report = assert_pruned(model)
    prunekit.remove(model)
    first = int((row["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    states = model.model.vision_tower(row["pixel_values"][0, :1], output_hidden_states=True).hidden_states
    expect = model.model.multi_modal_projector(states[model.config.vision_feature_layer][0, :1])[0]
    torch.testing.assert_close(seen["embeds"][0, first], expect, rtol=1e-4, atol=1e-5)
    assert bool(report.stages[0].merged[0][0])


@pytest.mark.parametrize("keep", [16, 24, 32])
def test_vispruner_in_the_model_equals_the_official_code(model, inputs, keep):
    """The kept tokens against the official selection on the eager tower's own attentions (as VisPruner reads
    them: ``output_attentions`` of ``select_layer``, clip_encoder.py L37-43)."""
    prunekit.build("vispruner", model, keep_tokens=keep)
    model(**inputs)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)
    out = _eager_copy(model).model.vision_tower(inputs["pixel_values"], output_hidden_states=True,
                                                output_attentions=True)
    layer = model.config.vision_feature_layer
    features, attentions = out.hidden_states[layer][:, 1:], out.attentions[layer][:, :, 0, 1:]
    mask = official_vispruner(features, attentions, keep, 0.5)
    for b in range(2):
        assert report.stages[0].kept[b].tolist() == mask[b].nonzero().squeeze(1).tolist()


def official_fastervlm(image_attentions, visual_token_num):
    """FasterVLM's encode_images (Theia-4869/FasterVLM llava_arch.py L141-157), literally: the [CLS] row of
    select_layer's attention over the patches (clip_encoder.py L38-41), mean over heads, top-k, as an index mask."""
    image_attentions = image_attentions.mean(dim=1)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]
    index_masks = torch.zeros(image_attentions.shape, dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    return index_masks


@pytest.mark.parametrize("keep", [8, 16, 32])
def test_fastervlm_in_the_model_equals_the_official_code(model, inputs, keep):
    """The kept tokens against the official index mask on the eager tower's own attentions: ``attentions`` of
    ``select_layer`` (the layer that produces the projector's features), [CLS] row, mean over heads."""
    prunekit.build("fastervlm", model, keep_tokens=keep)
    model(**inputs)
    report = assert_pruned(model)
    prunekit.remove(model)
    out = _eager_copy(model).model.vision_tower(inputs["pixel_values"], output_attentions=True)
    attentions = out.attentions[model.config.vision_feature_layer][:, :, 0, 1:]
    mask = official_fastervlm(attentions, keep)
    for b in range(2):
        assert report.stages[0].kept[b].tolist() == mask[b].nonzero().squeeze(1).tolist()
