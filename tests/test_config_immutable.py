"""No config is changed after validation: configs are frozen, and planning, building, pruning and the model-free
selection leave every field (and which fields the user set) as they were. Parametrised over the registry: a new
method is checked on registration."""

import inspect

import pytest
import torch
from pydantic import ValidationError

import prunekit
from prunekit.plugin import registry

METHODS = registry.names("methods")


def _snapshot(config) -> tuple:
    """Everything a config holds, deep-copied: its fields' values and the fields the user set."""
    return config.model_dump(), frozenset(config.model_fields_set)


@pytest.mark.parametrize("name", METHODS)
def test_configs_are_frozen(name):
    cls = registry.get("methods", name)
    config = cls.Config(keep_tokens=8)
    with pytest.raises(ValidationError, match="frozen"):
        config.keep_tokens = 4
    with pytest.raises(ValidationError, match="frozen"):
        config.budget_per = "image"
    if cls.SelectionConfig is not None and cls.SelectionConfig.model_fields:
        field = next(iter(cls.SelectionConfig.model_fields))
        selection = cls.SelectionConfig()
        with pytest.raises(ValidationError, match="frozen"):
            setattr(selection, field, getattr(selection, field))


@pytest.mark.parametrize("name", METHODS)
def test_planning_building_and_pruning_leave_the_config_as_given(deep_model, inputs, name):
    cls = registry.get("methods", name)
    config = cls.Config(keep_tokens=40, budget_meaning="layer_average")
    before = _snapshot(config)
    spec = prunekit.adapter_for(deep_model).describe()
    method = cls(config)
    method.plan(spec)
    method.budget_per(spec)
    assert _snapshot(config) == before
    prunekit.build(config, deep_model)
    assert _snapshot(config) == before
    patched = deep_model.__dict__["_prunekit_patch"].config
    given = _snapshot(patched)
    deep_model(**inputs)  # the stages run on the config the method was built with
    assert _snapshot(patched) == given
    assert prunekit.pruning_report(deep_model).stages


@pytest.mark.parametrize("name", [n for n in METHODS if registry.get("methods", n).SelectionConfig is not None])
def test_selecting_leaves_the_config_as_given(name):
    cls = registry.get("methods", name)
    g = torch.Generator().manual_seed(0)
    features, relevance = torch.randn(2, 9, 4, generator=g), torch.rand(2, 9, generator=g)
    kwargs = {"query": torch.randn(2, 2, 4, generator=g)} if "query" in inspect.signature(cls.select).parameters else {}
    config = cls.SelectionConfig()
    before = _snapshot(config)
    cls.select(features, relevance, 3, config, **kwargs)
    assert _snapshot(config) == before


def test_a_preset_budget_unit_reaches_the_patch_not_the_config():
    """TOPS's LLaVA-Video preset budgets per frame: the patch runs per image, the config stays as the user gave it."""
    model = registry.get("adapters", "llava_onevision").tiny(num_layers=28)
    prunekit.build("tops", model, preset="llava-video-7b", keep_tokens=2)
    patch = model.__dict__["_prunekit_patch"]
    assert patch.budget_per == "image"
    assert patch.config.budget_per == "auto" and "budget_per" not in patch.config.model_fields_set
    prunekit.build("tops", model, preset="llava-video-7b", keep_tokens=2, budget_per="prompt")
    assert model.__dict__["_prunekit_patch"].budget_per == "prompt"  # the user's unit wins over the preset's
