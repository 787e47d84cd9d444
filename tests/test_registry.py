import sys
import types
from importlib.metadata import EntryPoint

import pytest
import torch

import prunekit
from prunekit.plugin import hookimpl, registry
registry_module = sys.modules["prunekit.registry"]
from prunekit.registry import Registry, RegistryError
from prunekit.testing import registered

BUILTIN = {
    "methods": {"tops"},
    "scorers": {"relevance", "facility_location", "diversity"},
    "selectors": {"greedy"},
    "adapters": {"llava"},
    "insertion_points": {"after_projector", "decoder_layer"},
}


def test_builtins_registered_through_entry_points():
    from prunekit.registry import _discover_entry_points

    names = {ep.name for ep in _discover_entry_points()}
    assert {"tops", "relevance", "facility_location", "diversity", "greedy", "llava"} <= names
    for kind, expected in BUILTIN.items():
        assert expected <= set(registry.names(kind))
    assert set(prunekit.list_methods()) >= {"tops"}
    assert prunekit.list_scorers("f*") == ["facility_location", "facility_location_naive"]
    assert prunekit.list_scorers("d*") == ["diversity"]


def test_plugins_load_once(monkeypatch):
    reg = Registry()
    calls = []
    real = registry_module._discover_entry_points

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(registry_module, "_discover_entry_points", counting)
    reg.names("methods")
    reg.names("scorers")
    reg.get("methods", "tops")
    assert len(calls) == 1


def test_throwaway_plugin_found_through_the_entry_point_path(monkeypatch):
    real = registry_module._discover_entry_points
    extra = EntryPoint("feature_norm", "throwaway_plugin", "prunekit")
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    monkeypatch.setattr(registry_module, "_discover_entry_points", lambda: list(real()) + [extra])
    registry.reset()
    try:
        assert "feature_norm" in prunekit.list_scorers()
        # ...and is usable at once, e.g. as TOPS's relevance term: relevance alone keeps the largest norms
        H = torch.randn(1, 20, 4, generator=torch.Generator().manual_seed(0))
        norms = H.norm(dim=-1)
        out = prunekit.select("tops", H, None, k=5, relevance_scorer="feature_norm", principles=["relevance"])
        assert torch.equal(out, norms.topk(5).indices.sort().values)
        # with every principle, it seeds the selection: the largest norm is kept, and alone when k=1, whatever
        # relevance= says (zeros would seed the first token)
        assert norms.argmax().item() in prunekit.select("tops", H, None, k=5, relevance_scorer="feature_norm")
        one = prunekit.select("tops", H, torch.zeros(1, 20), k=1, relevance_scorer="feature_norm")
        assert one.tolist() == [[norms.argmax().item()]] != [[0]]
    finally:
        monkeypatch.undo()
        registry.reset()
    assert "feature_norm" not in prunekit.list_scorers()


def test_duplicate_name_names_both_plugins():
    from prunekit_plugins.scorers.relevance import Relevance

    class Impostor(Relevance):
        pass

    plugin = types.SimpleNamespace(prunekit_register_scorers=hookimpl(lambda register: register(Impostor)))
    with registered(plugin, "impostor_plugin"), pytest.raises(RegistryError) as info:
        registry.names("scorers")
    msg = str(info.value)
    assert "'relevance'" in msg and "impostor_plugin" in msg and "Impostor" in msg and "Relevance" in msg
    assert "relevance" in registry.names("scorers")


def test_missing_name_is_an_error():
    class Nameless(prunekit.plugin.Scorer):
        def start(self, inputs):
            raise NotImplementedError

    plugin = types.SimpleNamespace(prunekit_register_scorers=hookimpl(lambda register: register(Nameless)))
    with registered(plugin, "nameless_plugin"), pytest.raises(RegistryError, match="no `name`"):
        registry.names("scorers")
    assert "relevance" in registry.names("scorers")


def test_hook_with_a_typo_is_rejected():
    plugin = types.SimpleNamespace(prunekit_register_scorer=hookimpl(lambda register: None))
    with registered(plugin, "typo_plugin"), pytest.raises(Exception, match="prunekit_register_scorer"):
        registry.names("scorers")


def test_allow_list(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_LOAD_PLUGINS", "relevance,greedy")
    reg = Registry()
    assert reg.names("scorers") == ["relevance"]
    assert reg.names("methods") == []
    monkeypatch.setenv("PRUNEKIT_LOAD_PLUGINS", "")
    assert Registry().names("scorers") == []


def test_failed_import_names_the_plugin(monkeypatch):
    bad = EntryPoint("broken", "no_such_module_xyz", "prunekit")
    monkeypatch.setattr(registry_module, "_discover_entry_points", lambda: [bad])
    with pytest.raises(RegistryError, match="broken"):
        Registry().names("methods")


@pytest.mark.parametrize("missing,methods", [("greedy", ["tops", "scope", "divprune"]), ("dpp", ["cdpruner"])])
def test_a_method_whose_selector_is_not_registered_fails_at_build(missing, methods):
    """Without the selector plugin, build fails naming it (not the first forward, nor a silent fallback)."""
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    names = sorted({ep.name for ep in entry_points(group="prunekit")} - {missing})
    code = (
        "import prunekit\n"
        "from prunekit.testing import tiny_llava\n"
        f"for method in {methods!r}:\n"
        "    model = tiny_llava()\n"
        "    try:\n"
        "        prunekit.build(method, model, keep_tokens=4)\n"
        "    except prunekit.UnknownNameError as err:\n"
        f"        assert {missing!r} in str(err), err\n"
        "        assert not prunekit.is_patched(model)\n"
        "    else:\n"
        "        raise SystemExit(f'{method}: built without its selector')\n"
        "print('refused')\n"
    )
    env = {**os.environ, "PRUNEKIT_LOAD_PLUGINS": ",".join(names)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "refused" in result.stdout, result.stderr[-2000:] + result.stdout
