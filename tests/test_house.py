"""House rules that a test can hold: the runtime knows no method and no model."""

import pathlib

import pytest

from prunekit.registry import registry

RUNTIME = sorted((pathlib.Path(__file__).parents[1] / "prunekit" / "runtime").glob("*.py"))


@pytest.mark.parametrize("kind", ["methods", "adapters"])
def test_the_runtime_names_no_method_and_no_adapter(kind):
    for path in RUNTIME:
        text = path.read_text()
        for name in registry.names(kind):
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{path.name} names {kind[:-1]} {name!r}"
