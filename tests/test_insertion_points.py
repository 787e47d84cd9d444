"""The insertion points are the library's own: listed and looked up like a plugin kind, never registered by one."""

import types

import pytest

import prunekit
from prunekit.plugin import InsertionPoint, hookimpl, registry
from prunekit.registry import RegistryError
from prunekit.testing import registered


def test_the_three_points_the_runtime_implements():
    assert prunekit.list_insertion_points() == ["after_projector", "decoder_layer", "vision_features"]
    for name in prunekit.list_insertion_points():
        entry = registry.entry("insertion_points", name)
        assert issubclass(entry.cls, InsertionPoint) and entry.cls.name == name and entry.plugin == "prunekit"
        assert entry.cls.signals and entry.cls.description
    assert registry.get("insertion_points", "decoder_layer").needs_layer


def test_every_adapter_offers_only_those_points():
    for cls in registry.classes("adapters"):
        assert cls.insertion_points <= set(prunekit.list_insertion_points()), cls.name


def test_a_plugin_cannot_register_an_insertion_point():
    class Elsewhere(InsertionPoint):
        name = "inside_vit"
        description = "between two vision-encoder layers"
        signals = frozenset()

    plugin = types.SimpleNamespace(
        prunekit_register_insertion_points=hookimpl(lambda register: register(Elsewhere)))
    with registered(plugin, "points_plugin"), pytest.raises(RegistryError, match="not a plugin kind"):
        registry.names("methods")
    assert "inside_vit" not in prunekit.list_insertion_points()
