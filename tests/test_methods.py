"""Every registered method on the tiny LLaVA, parametrised over the registry: a new plugin is tested on registration."""

import inspect as pyinspect

import pytest
import torch

import prunekit
from prunekit.plugin import registry
from prunekit.budget import BudgetError
from prunekit.testing import tiny_llava, tiny_llava_inputs
from conftest import unpad_row

GEN = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
METHODS = registry.names("methods")


@pytest.mark.parametrize("name", METHODS)
def test_keep_all_is_exact(deep_model, inputs, name):
    ref = deep_model(**inputs).logits
    prunekit.build(name, deep_model, keep_ratio=1.0)
    assert torch.equal(deep_model(**inputs).logits, ref)
    report = prunekit.pruning_report(deep_model)
    assert report.layer_average == [64.0, 64.0]
    assert all(c == [0, 0] for c in (s.merged_counts for s in report.stages))
    prunekit.remove(deep_model)
    assert torch.equal(deep_model(**inputs).logits, ref)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("keep_tokens", [40, 12])
def test_generate_counts_batches_and_determinism(deep_model, inputs, name, keep_tokens):
    """Exact layer-averaged counts inside generate (KV cache, sdpa) at budget_meaning="layer_average"; padded batch =
    rows alone; deterministic.

    A budget a method cannot reach (in-LLM methods keep every token before their first layer) must be a clear
    BudgetError, never a silent change; every method must reach 40 of 64 on 8 layers.
    """
    prunekit.build(name, deep_model, keep_tokens=keep_tokens, budget_meaning="layer_average")
    try:
        out = deep_model.generate(**inputs, **GEN)
    except BudgetError as err:
        assert keep_tokens == 12, err
        assert "out of reach" in str(err) or "minimum" in str(err)
        return
    assert deep_model.config._attn_implementation == "sdpa"
    report = prunekit.pruning_report(deep_model)
    assert report.stages, "the method pruned nothing"
    for avg in report.layer_average:
        assert abs(avg - keep_tokens) <= 1.0
    for stage in report.stages:
        assert len(set(stage.counts)) == 1
        for kept, merged in zip(stage.kept, stage.merged):
            assert kept.unique().numel() == kept.numel() and merged.shape == kept.shape
    kept_first = [k.clone() for k in report.stages[0].kept]
    again = deep_model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, again.sequences)
    for b in range(2):
        alone = deep_model.generate(**unpad_row(inputs, b), **GEN)
        assert out.sequences[b, -3:].tolist() == alone.sequences[0, -3:].tolist()
        assert torch.equal(prunekit.pruning_report(deep_model).stages[0].kept[0], kept_first[b])
        for x, y in zip(out.scores, alone.scores):
            torch.testing.assert_close(x[b], y[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_keep_ratio_budget(deep_model, inputs, name):
    prunekit.build(name, deep_model, keep_ratio=0.75, budget_meaning="layer_average")
    deep_model(**inputs)
    assert all(abs(a - 48) <= 1.0 for a in prunekit.pruning_report(deep_model).layer_average)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_stays_finite(name, dtype, half_models):
    model = half_models[dtype]
    x = tiny_llava_inputs(model)
    prunekit.build(name, model, keep_tokens=40)
    try:
        logits = model(**x).logits
    finally:
        prunekit.remove(model)
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def half_models():
    return {d: tiny_llava(num_layers=8, dtype=d) for d in (torch.float16, torch.bfloat16)}


def _selection_args(cls, B=2, N=30, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    relevance = torch.rand(B, N, generator=g, dtype=torch.float64)
    kwargs = {}
    if "query" in pyinspect.signature(cls.select).parameters:
        kwargs["query"] = torch.randn(B, 3, D, generator=g, dtype=torch.float64)
    return features, relevance, kwargs


@pytest.mark.parametrize("name", [n for n in METHODS if registry.get("methods", n).SelectionConfig is not None])
@pytest.mark.parametrize("k", [1, 7, 30])
def test_model_free_selection(name, k):
    cls = registry.get("methods", name)
    features, relevance, kwargs = _selection_args(cls, N=36)
    try:
        kept = prunekit.select(name, features, relevance, k=k, **kwargs)
    except BudgetError as err:  # below the method's documented minimum
        assert k == 1 and "minimum" in str(err)
        return
    assert kept.shape == (2, k) and kept.dtype == torch.long
    assert bool((kept[:, 1:] > kept[:, :-1]).all()) and 0 <= int(kept.min()) and int(kept.max()) < 36
    assert torch.equal(kept, prunekit.select(name, features, relevance, k=k, **kwargs))
    # a row's selection does not depend on the other rows of the batch
    alone = prunekit.select(name, features[1:], relevance[1:], k=k,
                            **{a: v[1:] for a, v in kwargs.items()})
    assert torch.equal(alone[0], kept[1])
    red = prunekit.reduce(name, features, relevance, k=k, **kwargs)
    assert torch.equal(red.indices, kept) and red.values.shape == (2, k, 8) and torch.isfinite(red.values).all()


@pytest.mark.parametrize("name", [n for n in METHODS if registry.get("methods", n).SelectionConfig is not None])
def test_model_free_selection_rejects_bad_k(name):
    cls = registry.get("methods", name)
    features, relevance, kwargs = _selection_args(cls)
    for k in (0, 31, 2.5):
        with pytest.raises(ValueError, match="k must be an int in 1..30"):
            prunekit.select(name, features, relevance, k=k, **kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_config_field_is_rejected(deep_model, name):
    with pytest.raises(ValueError, match="keep_tokenz"):
        prunekit.build(name, deep_model, keep_tokenz=3)
    assert not prunekit.is_patched(deep_model)


@pytest.mark.parametrize("name", registry.names("adapters"))
def test_every_adapter_names_its_insertion_points(name):
    adapter = registry.get("adapters", name)
    assert adapter.insertion_points <= set(registry.names("insertion_points"))
    assert adapter.model_classes
