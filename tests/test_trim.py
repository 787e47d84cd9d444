"""TRIM against a literal transcription of its official rule (FreedomIntelligence/TRIM, commit f5a232d,
``llava/model/multimodal_encoder/clip_encoder.py`` ``token_reduction``, L67-142), and on the tiny LLaVA.

The transcription below is plain Python over lists, one image at a time, and never calls prunekit:

* L89-90: the scores are ``softmax(−s)`` over the image's tokens;
* L92-104: ``TRIM:-1`` keeps the tokens whose score lies above ``Q3 + 1.5·IQR`` (``numpy.percentile``);
* L111-120: the best-scored tokens, in sequence order;
* L122-132: the mean of all the others, placed after them.

prunekit keeps ``k`` tokens in all, so the official call that keeps ``m`` tokens is compared with ``k = m + 1``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import prunekit
from prunekit_plugins.methods.trim import iqr_count
from conftest import unpad_row


# --- transcription of the official rule ----------------------------------------------------------------------------
def official_scores(similarity, negate=True):
    """L89-90: softmax over the tokens of the negated similarity (``negate=False``: of the similarity)."""
    s = [-float(v) if negate else float(v) for v in similarity]
    top = max(s)
    e = [math.exp(v - top) for v in s]
    total = sum(e)
    return [v / total for v in e]


def official_outliers(similarity, negate=True):
    """L94-104 for one image: how many scores lie above Q3 + 1.5·IQR."""
    scores = np.asarray(official_scores(similarity, negate), dtype=np.float64)
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    return int((scores > q3 + 1.5 * (q3 - q1)).sum())


def official_trim(features, similarity, m, negate=True):
    """L108-132 for one image keeping ``m`` tokens: (the selected indices in sequence order, the rows the projector
    receives: the selected features in sequence order, then the mean of all the other tokens)."""
    scores = official_scores(similarity, negate)
    n = len(scores)
    best = sorted(range(n), key=lambda i: -scores[i])[:m]  # L111 (no two scores are equal here)
    selected = [i for i in range(n) if i in best]  # L117-120: the mask keeps sequence order
    rest = [i for i in range(n) if i not in best]
    rows = [list(map(float, features[i])) for i in selected]
    width = len(rows[0]) if rows else len(features[0])
    mean = [sum(float(features[i][d]) for i in rest) / len(rest) for d in range(width)]  # L127
    return selected, rows + [mean]  # L132: the mean follows the selected tokens


def _random(B, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=torch.float64), torch.randn(B, N, generator=g, dtype=torch.float64)


# --- model-free -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("N, m", [(576, 63), (576, 127), (40, 7), (40, 0), (40, 38)])
@pytest.mark.parametrize("negate", [True, False])
def test_reduce_equals_the_official_rule(seed, N, m, negate):
    """Token for token, and the mean token value for value, on random tensors."""
    features, similarity = _random(2, N, 6, seed)
    red = prunekit.reduce("trim", features, similarity, k=m + 1, negate_similarity=negate)
    own = prunekit.reduce("trim", features, similarity, k=m + 1, negate_similarity=negate, mean_order="last_rest")
    for b in range(2):
        selected, rows = official_trim(features[b].tolist(), similarity[b].tolist(), m, negate)
        rest = [i for i in range(N) if i not in selected]
        # the places: the selected tokens and the last token the mean averages
        assert red.indices[b].tolist() == sorted(selected + [rest[-1]]) == own.indices[b].tolist()
        # 'after' (the official sequence): the selected tokens in sequence order, then the mean
        assert red.values[b, :m].tolist() == rows[:m]
        torch.testing.assert_close(red.values[b, m], torch.tensor(rows[m], dtype=torch.float64), rtol=1e-13, atol=1e-13)
        assert red.merged[b].tolist() == [False] * m + [True]
        # 'last_rest': every kept token at its own place, the mean at rest[-1]
        at = own.indices[b].tolist().index(rest[-1])
        assert torch.equal(own.values[b, at], red.values[b, m])
        assert own.merged[b].tolist() == [i == at for i in range(m + 1)]
        assert [own.values[b, j].tolist() for j in range(m + 1) if j != at] == rows[:m]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("negate", [True, False])
def test_iqr_count_equals_the_official_outlier_rule(seed, negate):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randn(3, 576, generator=g, dtype=torch.float64) * 3  # scores spread enough to have outliers
    counts = iqr_count(similarity, negate=negate)
    expect = [official_outliers(row.tolist(), negate) for row in similarity]
    assert counts.tolist() == expect and any(expect)
    # the official TRIM:-1 for one image: its outliers and the mean token
    features = torch.randn(1, 576, 4, generator=g, dtype=torch.float64)
    m = expect[0]
    red = prunekit.reduce("trim", features, similarity[:1], k=int(counts[0]) + 1, negate_similarity=negate)
    selected, rows = official_trim(features[0].tolist(), similarity[0].tolist(), m, negate)
    assert red.values[0, :m].tolist() == rows[:m]


def test_without_the_mean_token_it_is_top_k_of_the_scores():
    features, similarity = _random(2, 50, 5, 7)
    kept = prunekit.select("trim", features, similarity, k=9, mean_token=False)
    for b in range(2):
        assert kept[b].tolist() == official_trim(features[b].tolist(), similarity[b].tolist(), 9)[0]
    red = prunekit.reduce("trim", features, similarity, k=9, mean_token=False)
    assert not red.merged.any() and torch.equal(red.values, features[torch.arange(2)[:, None], kept])


def test_model_free_needs_the_similarity():
    features, _ = _random(1, 10, 4, 0)
    with pytest.raises(ValueError, match="similarity to the question"):
        prunekit.select("trim", features, k=3)


# --- the tiny LLaVA -------------------------------------------------------------------------------------------------
def _llava_signals(model, row):
    """What prunekit's TRIM reads on the tiny LLaVA for one unpadded row: the vision features the projector reads
    (feature layer −2, [CLS] dropped) and each visual token's mean cosine to the instruction's input embeddings."""
    tower = model.model.vision_tower
    assert model.config.vision_feature_layer == -2
    vision = tower(row["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
    ids = row["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    text = model.get_input_embeddings()(ids[int(image.max()) + 1:])
    projected = model.model.multi_modal_projector(vision)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    return vision, (unit(projected) @ unit(text).T).mean(1)


def _received(model, inputs, keep):
    """Run the patched model; per row, the ``keep`` visual rows the language model received (its input embeddings,
    ``hidden_states[0]``), in sequence order: the rows end with three question tokens (tiny_llava_inputs)."""
    return model(**inputs, output_hidden_states=True).hidden_states[0][:, -3 - keep:-3]


@pytest.mark.parametrize("keep", [10, 24])
def test_build_prunes_and_feeds_the_official_sequence(model, inputs, keep):
    """Built on the tiny LLaVA: each row keeps ``keep`` tokens, one of them merged, and the language model receives
    the projector's output of [the selected vision features in sequence order, the mean of the others]."""
    prunekit.build("trim", model, keep_tokens=keep)
    received = _received(model, inputs, keep)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)
    n = report.visual_tokens[0]
    assert report.stages[0].point == "vision_features" and keep < n
    assert report.stages[0].counts == [keep, keep] and report.stages[0].merged_counts == [1, 1]
    assert report.layer_average == [float(keep)] * 2
    for b in range(2):
        vision, similarity = _llava_signals(model, unpad_row(inputs, b))
        selected, rows = official_trim(vision.tolist(), similarity.tolist(), keep - 1)
        rest = [i for i in range(n) if i not in selected]
        assert report.stages[0].kept[b].tolist() == sorted(selected + [rest[-1]])
        expect = model.model.multi_modal_projector(torch.tensor(rows, dtype=vision.dtype))
        torch.testing.assert_close(received[b], expect, rtol=1e-4, atol=1e-5)


def test_after_the_projector_the_mean_is_of_projected_tokens(model, inputs):
    """``insertion_point="after_projector"``: the same tokens, the mean taken over the projected ones; with
    ``mean_order="last_rest"`` it sits at the place of the last token it averages."""
    keep = 12
    prunekit.build("trim", model, keep_tokens=keep, insertion_point="after_projector", mean_order="last_rest")
    received = _received(model, inputs, keep)
    stage = prunekit.pruning_report(model).stages[0]
    prunekit.remove(model)
    assert stage.point == "after_projector" and stage.counts == [keep, keep] and stage.merged_counts == [1, 1]
    for b in range(2):
        vision, similarity = _llava_signals(model, unpad_row(inputs, b))
        selected, _ = official_trim(vision.tolist(), similarity.tolist(), keep - 1)
        rest = [i for i in range(vision.shape[0]) if i not in selected]
        kept = sorted(selected + [rest[-1]])
        assert stage.kept[b].tolist() == kept and stage.merged[b].tolist() == [i == rest[-1] for i in kept]
        projected = model.model.multi_modal_projector(vision)
        torch.testing.assert_close(received[b, kept.index(rest[-1])], projected[rest].mean(0), rtol=1e-4, atol=1e-5)
