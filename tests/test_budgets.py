"""Budgets stated honestly: the nominal budget is each method's own accounting, the layer-averaged mode meets its
target for every registered method, and every report shows the budget, the layer average and the prefill FLOPs."""

import re

import pytest
import torch

import prunekit
from prunekit.budget import BudgetError, StagePlacement, layer_average
from prunekit.interfaces import ModelSpec
from prunekit.registry import registry
from prunekit.testing import assert_pruned, tiny_adapter_model

#: LLaVA-1.5-7B as a method sees it: 32 decoder layers, 576 visual tokens per image
LLAVA_7B = ModelSpec("llava", num_layers=32, hidden_size=4096, visual_tokens_per_image=576)
N = 576


def plan(method: str, spec: ModelSpec = LLAVA_7B, n: int = N, **config):
    """(per-stage counts, per-stage first layers) of ``method`` for ``n`` visual tokens."""
    cls = registry.get("methods", method)
    stages = cls(cls.Config(**config)).plan(spec)
    return [s.keep(n) for s in stages], [0 if s.layer is None else s.layer for s in stages]


def averaged(counts, layers, n=N, num_layers=32) -> float:
    return layer_average(n, counts, [StagePlacement(layer, 1.0) for layer in layers], num_layers)


@pytest.mark.parametrize("method", registry.names("methods"))
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_layer_average_mode_meets_the_budget(method, budget):
    """budget_meaning='layer_average' compares methods at equal compute: the layer average is T (to rounding)."""
    try:
        counts, layers = plan(method, keep_tokens=budget, budget_meaning="layer_average")
    except BudgetError as e:  # layers that see every token before the first stage: an error, never a quiet miss
        assert budget < 192 and "least possible" in str(e)
        return
    assert abs(averaged(counts, layers) - budget) <= 0.5 * len(counts), (counts, layers)


@pytest.mark.parametrize("method", registry.names("methods"))
def test_one_stage_before_the_llm_means_the_same_in_both_modes(method):
    counts, layers = plan(method, keep_tokens=192)
    if any(layers):
        pytest.skip("prunes inside the language model")
    assert counts == plan(method, keep_tokens=192, budget_meaning="layer_average")[0] == [192]


@pytest.mark.parametrize("method, budget, counts, layers", [
    # FastV as the literature compares it: T tokens from layer K = 2 on (layers 0 and 1 see all 576)
    ("fastv", 64, [64], [2]),
    ("fastv", 128, [128], [2]),
    # DART's official code: each of the 8 pivots claims B // 8 tokens, the 4 visual pivots kept on top
    ("dart", 64, [68], [2]),
    ("dart", 128, [132], [2]),
    ("dart", 192, [196], [2]),
    # TOPS, the paper's Table 9: 2T before the LLM, T from layer 12, T/4 from layer 24
    ("tops", 128, [256, 128, 32], [0, 12, 24]),
    ("tops", 64, [128, 64, 16], [0, 12, 24]),
])
def test_nominal_budget_is_the_methods_own_accounting(method, budget, counts, layers):
    assert plan(method, keep_tokens=budget) == (counts, layers)


def test_a_fractional_nominal_budget_is_rounded_to_the_nearest_count():
    """keep_ratio × tokens is fractional (0.111 × 144 = 15.98): the nominal count is the nearest, not the floor."""
    spec = ModelSpec("llava", num_layers=8, hidden_size=64, visual_tokens_per_image=144)
    assert plan("fastv", spec, 144, keep_ratio=0.111)[0] == [16]
    assert plan("dart", spec, 144, keep_ratio=0.111)[0] == [8 * 2 + 4]


def test_pdrop_quotes_the_layer_average():
    """PyramidDrop's comparisons quote the layer-averaged count: nominal and layer-averaged budgets agree."""
    assert plan("pdrop", keep_tokens=192) == plan("pdrop", keep_tokens=192, budget_meaning="layer_average")


def test_the_nominal_fastv_budget_averages_more_tokens_than_it_names():
    counts, layers = plan("fastv", keep_tokens=64)
    assert averaged(counts, layers) == (2 * 576 + 30 * 64) / 32  # 96: what a reader must be able to see


def test_budget_meaning_rejects_unknown_values():
    with pytest.raises(ValueError, match="budget_meaning"):
        registry.get("methods", "fastv").Config(budget_meaning="average")


def _decoder_flops(model, batch) -> int:
    """FLOPs measured by torch's counter inside the decoder layers of one forward pass."""
    from prunekit.tools.bench import count_flops

    return count_flops(lambda: model(**batch), {"decoder": lambda name: re.search(r"language_model\.layers\.\d+$", name)
                                                  is not None})["decoder"]


def test_report_flops_equal_the_measured_decoder_flops():
    """The report's analytic FLOPs are what torch counts in the decoder layers, unpruned and pruned before the LLM."""
    model, rows = tiny_adapter_model("llava")
    batch = rows[0]
    model.set_attn_implementation("eager")  # torch's counter sees no attention FLOPs in the CPU sdpa kernel
    try:
        with torch.no_grad():
            unpruned = _decoder_flops(model, batch)
            prunekit.build("random", model, keep_tokens=4)
            pruned = _decoder_flops(model, batch)
    finally:
        model.set_attn_implementation("sdpa")
    report = prunekit.pruning_report(model)
    assert_pruned(model)
    assert report.prefill_flops_unpruned == [unpruned]
    assert report.prefill_flops == [pruned] and pruned < unpruned


def test_report_shows_budget_layer_average_and_flops_side_by_side():
    model, rows = tiny_adapter_model("llava")
    prunekit.build("fastv", model, keep_tokens=3, layer=1)
    with torch.no_grad():
        model(**rows[0])
    report = prunekit.pruning_report(model)
    assert_pruned(model)
    n = report.visual_tokens[0]
    assert report.budget == [3.0] and report.budget_meaning == "nominal"
    assert report.layer_average[0] == pytest.approx((n + 3 * (report.num_layers - 1)) / report.num_layers)
    assert report.prefill_flops[0] < report.prefill_flops_unpruned[0]
    text = report.summary()
    assert "budget (nominal): 3" in text and "layer-averaged visual tokens" in text and "GFLOPs" in text
    data = report.as_dict()
    assert data["budget"] == [3.0] and data["layer_average"] == report.layer_average
    assert data["prefill_flops"] == report.prefill_flops


def test_a_schedule_is_reported_as_a_schedule():
    model, rows = tiny_adapter_model("llava")
    prunekit.build("fastv", model, schedule=[3], layer=1)
    with torch.no_grad():
        model(**rows[0])
    report = prunekit.pruning_report(model)
    assert_pruned(model)
    assert report.budget == [None] and report.budget_meaning == "schedule"
