import pytest
from pydantic import ValidationError

import prunekit
from prunekit.budget import BudgetError, StagePlacement, layer_average, resolve_counts
from prunekit_plugins.methods.tops import TopsConfig


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": 0}, "keep_ratio"),
        ({"keep_tokens": 0}, "keep_tokens"),
        ({"keep_tokens": "many"}, "keep_tokens"),
        ({"relevance_scorer": "nope"}, "relevance_scorer"),
        ({"raters": "everyone"}, "raters"),
        ({"positions": "shuffled"}, "positions"),
        ({"insertion_points": ["inside_vit"]}, "insertion_points"),
        ({"layers": (5, 3)}, "layers"),
        ({"preset": "gpt-5"}, "preset"),
        ({"schedule": [10, 20]}, "schedule"),
        ({"keep_tokens": 4, "keep_ratio": 0.5}, "keep_ratio"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValidationError) as info:
        TopsConfig(**overrides)
    assert field in str(info.value)


def test_unknown_scorer_lists_the_registered_ones():
    with pytest.raises(ValidationError) as info:
        TopsConfig(coverage_scorer="nope")
    for name in prunekit.list_scorers():
        assert name in str(info.value)


def test_unknown_method_lists_the_registered_ones(model):
    with pytest.raises(KeyError) as info:
        prunekit.build("magic", model)
    assert "tops" in str(info.value)


def test_build_rejects_bad_overrides(model):
    with pytest.raises(ValidationError, match="keep_ratio"):
        prunekit.build("tops", model, keep_ratio=1.5)
    assert not prunekit.is_patched(model)


def test_paper_budgets_are_layer_averaged():
    # LLaVA-1.5-7B: 32 layers, p1=12, p2=24, 576 tokens: T=64 keeps 128 -> 32 -> 16.
    placements = [StagePlacement(0, 2.0), StagePlacement(12, 0.5), StagePlacement(24, 0.25)]
    for T, expected in [(128, [256, 64, 32]), (64, [128, 32, 16]), (32, [64, 16, 8])]:
        counts = resolve_counts(576, T, placements, 32)
        assert counts == expected
        assert layer_average(576, counts, placements, 32) == T
    # 13B: 40 layers, 15/30
    placements13 = [StagePlacement(0, 2.0), StagePlacement(15, 0.5), StagePlacement(30, 0.25)]
    assert resolve_counts(576, 64, placements13, 40) == [128, 32, 16]


def test_budget_caps_and_errors():
    placements = [StagePlacement(0, 2.0), StagePlacement(12, 0.5), StagePlacement(24, 0.25)]
    counts = resolve_counts(576, 320, placements, 32)  # 2T > N: stage I capped, later stages scaled up
    assert counts[0] == 576 and abs(layer_average(576, counts, placements, 32) - 320) < 1
    assert resolve_counts(576, 576, placements, 32) == [576, 576, 576]
    with pytest.raises(BudgetError, match="more than"):
        resolve_counts(576, 600, placements, 32)
    with pytest.raises(BudgetError, match="out of reach"):
        resolve_counts(576, 10, [StagePlacement(24, 0.5)], 32)
