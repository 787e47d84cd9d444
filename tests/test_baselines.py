"""Baselines against independent naive implementations of their published rules."""

import itertools

import pytest
import torch

import prunekit
from prunekit.budget import BudgetError
from plugins_naive import naive_divprune, naive_scope, naive_visionzip
from test_llava import _eager_copy


def _random(B, N, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=dtype), torch.rand(B, N, generator=g, dtype=dtype)


@pytest.mark.parametrize("seed", range(6))
def test_divprune_is_the_max_min_greedy(seed):
    feats, _ = _random(2, 40, 6, seed)
    kept = prunekit.select("divprune", feats, k=9)
    for b in range(2):
        assert kept[b].tolist() == sorted(naive_divprune(feats[b], 9))


def test_divprune_in_the_model_uses_the_projected_tokens(model, inputs):
    prunekit.build("divprune", model, keep_tokens=10)
    model(**inputs)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    for b in range(2):
        assert report.stages[0].kept[b].tolist() == sorted(naive_divprune(feats[b].double(), 10))


def _logdet(L, subset):
    return torch.linalg.slogdet(L[list(subset)][:, list(subset)])


@pytest.mark.parametrize("seed", range(8))
def test_dpp_fast_greedy_equals_brute_force_greedy(seed):
    """Each step of the fast (incremental Cholesky) greedy equals an exhaustive search over log det(L_S∪{i})."""
    from prunekit_plugins.selectors.dpp import dpp_greedy_map

    N, k = 9, 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    r = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    unit = torch.nn.functional.normalize(x, dim=-1)
    L = r[:, None] * (unit @ unit.T) * r[None, :]
    fast = dpp_greedy_map(L[None], k)[0].tolist()
    chosen = []
    for _ in range(k):
        best = max((i for i in range(N) if i not in chosen), key=lambda i: _logdet(L, chosen + [i]).logabsdet)
        chosen.append(best)
    assert fast == chosen
    # and the greedy set is never better than the exhaustive MAP over all k-subsets
    best_exact = max(_logdet(L, s).logabsdet for s in itertools.combinations(range(N), k))
    assert _logdet(L, chosen).logabsdet <= best_exact + 1e-9


def test_cdpruner_model_free_matches_its_kernel_rule():
    from prunekit_plugins.selectors.dpp import dpp_greedy_map

    feats, _ = _random(1, 20, 5, 3)
    query = torch.randn(1, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    kept = prunekit.select("cdpruner", feats, k=6, query=query, negate_relevance=False)  # the paper's sign
    unit = torch.nn.functional.normalize(feats[0], dim=-1)
    sim = (unit @ torch.nn.functional.normalize(query[0], dim=-1).T).mean(-1)
    r = (sim - sim.min()) / (sim.max() - sim.min())
    L = r[:, None] * (unit @ unit.T) * r[None, :]
    assert kept[0].tolist() == sorted(dpp_greedy_map(L[None], 6, fallback=r[None])[0].tolist())


def test_cdpruner_in_the_model_reads_the_instruction(model, inputs):
    prunekit.build("cdpruner", model, keep_tokens=10)
    model(**inputs)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    embed = model.get_input_embeddings()
    for b in range(2):
        ids = inputs["input_ids"][b]
        last = int((ids == model.config.image_token_id).nonzero().max())
        query = embed(ids[last + 1:])[None]
        expect = prunekit.select("cdpruner", feats[b][None], k=10, query=query)
        assert report.stages[0].kept[b].tolist() == expect[0].tolist()


def test_fastv_keeps_the_top_k_of_eager_last_token_attention(deep_model, inputs):
    K, T = 3, 40
    prunekit.build("fastv", deep_model, keep_tokens=T, layer=K)
    deep_model(**inputs)
    report = prunekit.pruning_report(deep_model)
    prunekit.remove(deep_model)
    eager = _eager_copy(deep_model)
    out = eager(**inputs, output_attentions=True)
    image = deep_model.config.image_token_id
    k = report.stages[0].counts[0]
    assert k == T  # nominal: T tokens from layer K on
    for b in range(2):
        vis = (inputs["input_ids"][b] == image).nonzero().squeeze(1)
        attn = out.attentions[K - 1][b, :, -1, vis].mean(0)  # last token → visual tokens, mean over heads
        expect = torch.sort(attn, descending=True, stable=True).indices[:k].sort().values
        assert report.stages[0].kept[b].tolist() == expect.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_matches_the_naive_rule(seed):
    feats, cls = _random(2, 50, 6, seed)
    red = prunekit.reduce("visionzip", feats, cls, k=12)
    for b in range(2):
        idx, values, merged = naive_visionzip(feats[b], cls[b], feats[b], 12, contextual=2)
        order = sorted(range(12), key=lambda i: idx[i])
        assert red.indices[b].tolist() == [idx[i] for i in order]
        torch.testing.assert_close(red.values[b], torch.stack([values[i] for i in order]))
        assert red.merged[b].tolist() == [merged[i] for i in order]


@pytest.mark.parametrize("seed", range(4))
def test_scope_matches_the_naive_rule(seed):
    feats, cls = _random(2, 30, 5, seed)
    kept = prunekit.select("scope", feats, cls, k=8, alpha=0.7)
    for b in range(2):
        assert kept[b].tolist() == sorted(naive_scope(feats[b], cls[b], 8, 0.7))


def test_pool_equals_adaptive_average_pooling_on_divisible_grids():
    feats, _ = _random(1, 64, 4, 0)
    red = prunekit.reduce("pool", feats, k=16)
    grid = feats[0].T.reshape(4, 8, 8)
    expect = torch.nn.functional.adaptive_avg_pool2d(grid, (4, 4)).reshape(4, 16).T
    torch.testing.assert_close(red.values[0], expect)
    assert red.merged.all()
    assert prunekit.reduce("pool", feats, k=13).indices.shape == (1, 13)  # any k, exactly


def test_random_is_seeded_and_batch_invariant(model, inputs):
    prunekit.build("random", model, keep_tokens=10, seed=3)
    model(**inputs)
    kept = prunekit.pruning_report(model).stages[0].kept
    assert kept[0].tolist() == kept[1].tolist()
    prunekit.build("random", model, keep_tokens=10, seed=4)
    model(**inputs)
    assert prunekit.pruning_report(model).stages[0].kept[0].tolist() != kept[0].tolist()


def test_merging_methods_report_merged_tokens(deep_model, inputs):
    for name in ("visionzip", "prumerge_plus", "pool", "sparsevlm"):
        prunekit.build(name, deep_model, keep_tokens=20)
        deep_model(**inputs)
        report = prunekit.pruning_report(deep_model)
        assert any(any(s.merged_counts) for s in report.stages), name
        assert "merged" in report.summary()


def test_visionzip_budget_below_its_minimum_is_an_error(model, inputs):
    prunekit.build("visionzip", model, keep_tokens=1)
    with pytest.raises(BudgetError, match="minimum"):
        model(**inputs)
    prunekit.build("visionzip", model, keep_tokens=8, contextual_tokens=8)
    with pytest.raises(BudgetError, match="minimum"):
        model(**inputs)


def test_in_llm_budget_out_of_reach_names_the_least_possible(deep_model, inputs):
    prunekit.build("fastv", deep_model, keep_tokens=8, budget_meaning="layer_average")
    with pytest.raises(BudgetError, match="least possible is 16.8"):
        deep_model(**inputs)


def test_more_tokens_than_present_is_an_error(model, inputs):
    for name in ("fastervlm", "visionzip", "pool"):
        prunekit.build(name, model, keep_tokens=65)
        with pytest.raises(BudgetError, match="more than the 64 visual tokens"):
            model(**inputs)


def test_random_in_the_decoder_and_a_stray_layer(deep_model, inputs):
    prunekit.build("random", deep_model, keep_tokens=40, insertion_point="decoder_layer", layer=3)
    deep_model(**inputs)
    assert prunekit.pruning_report(deep_model).stages[0].layer == 3
    with pytest.raises(ValueError, match="insertion_point='decoder_layer'"):
        prunekit.build("random", deep_model, keep_tokens=40, layer=3)


@pytest.mark.parametrize("field,value,match", [
    ("layer", 8, "layer"), ("contextual_ratio", 1.5, "contextual_ratio"), ("recycle_ratio", -1, "recycle_ratio"),
    ("relevance_scorer", "nope", "registered scorers"),
])
def test_bad_fields_name_the_field(deep_model, field, value, match):
    name = {"layer": "fastv", "contextual_ratio": "visionzip", "recycle_ratio": "sparsevlm",
            "relevance_scorer": "cdpruner"}[field]
    with pytest.raises(ValueError, match=match):
        prunekit.build(name, deep_model, **{field: value})


def test_cdpruner_takes_a_relevance_computed_elsewhere():
    """The documented path for a CLIP text relevance: pass it and name the plain `relevance` scorer."""
    from prunekit_plugins.selectors.dpp import dpp_greedy_map

    feats, rel = _random(1, 16, 5, 4)
    kept = prunekit.select("cdpruner", feats, rel, k=5, relevance_scorer="relevance", negate_relevance=False)
    unit = torch.nn.functional.normalize(feats[0], dim=-1)
    r = (rel[0] - rel[0].min()) / (rel[0].max() - rel[0].min())
    L = r[:, None] * (unit @ unit.T) * r[None, :]
    assert kept[0].tolist() == sorted(dpp_greedy_map(L[None], 5, fallback=r[None])[0].tolist())
