"""The transformers contract: every item holds on every adapter's tiny model, and a broken one is loud.

Every check names the contract and the installed transformers release, so a new release that renames something
fails here with a message that says what to change in ``prunekit/contracts.py``.
"""

import dataclasses
import warnings

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.registry import registry
from prunekit.testing import assert_pruned, batch_of, prunable_points, tiny_adapter_model

ADAPTERS = registry.names("adapters")


def tiny(name):
    return tiny_adapter_model(name)


points_of = prunable_points


def pairs():
    for name in ADAPTERS:
        cls = registry.get("adapters", name)
        model, _ = tiny(name)
        for contract in cls(model).all_contracts():
            yield pytest.param(name, contract.name, id=f"{name}:{contract.name}")


@pytest.mark.parametrize("name, contract", list(pairs()))
def test_every_contract_holds_on_every_adapter(name, contract):
    model, _ = tiny(name)
    adapter = prunekit.adapter_for(model)
    item = C.CONTRACTS[contract]
    roots = adapter.contract_roots()
    if item.root is not None and roots.get(item.root) is None:
        pytest.skip(f"{name} has no {item.root}")
    try:
        item.verify(roots.get(item.root))
    except C.ContractError as e:
        pytest.fail(str(e))


def test_every_contract_is_named_once_and_listed():
    assert all(name == c.name for name, c in C.CONTRACTS.items())
    assert len({id(c) for c in C.CONTRACTS.values()}) == len(C.CONTRACTS)
    table = C.describe()
    assert all(f"`{name}`" in table for name in C.CONTRACTS)


def test_the_cache_argument_follows_the_installed_release():
    """5.24 renamed the language models' past_key_values to cache: the contract reads both, writes the current one."""
    key = C.LM_CACHE.key
    assert key == ("cache" if C._version(C.installed()) >= C._version("5.24") else "past_key_values")
    kwargs = {"past_key_values": 1}
    assert C.LM_CACHE.get(kwargs) == 1  # a caller's older spelling is still read
    C.LM_CACHE.set(kwargs, 2)
    assert kwargs == {key: 2}  # never both: transformers ignores one of them


def test_a_broken_contract_names_itself_and_the_release():
    model, _ = tiny("llava")
    broken = dataclasses.replace(C.LM_CACHE, spellings=(("5.0", "kv_cache_renamed"),))
    with pytest.raises(C.ContractError) as e:
        broken.verify(prunekit.adapter_for(model).language_model())
    message = str(e.value)
    assert "'language_model.cache'" in message and C.installed() in message and "kv_cache_renamed" in message
    assert isinstance(e.value, prunekit.PruningError)


def test_build_refuses_a_model_that_breaks_a_contract(monkeypatch):
    """Simulate the next rename: the cache argument takes a name this release does not have."""
    model, rows = tiny("llava")
    monkeypatch.setattr(C, "LM_CACHE", dataclasses.replace(C.LM_CACHE, spellings=(("5.0", "kv_cache_renamed"),)))
    monkeypatch.setattr(C, "CORE", tuple(C.LM_CACHE if c.name == "language_model.cache" else c for c in C.CORE))
    with pytest.raises(C.ContractError, match=r"language_model\.cache.*transformers " + C.installed().replace(".", r"\.")):
        prunekit.build("tops", model, keep_ratio=0.5)
    assert not prunekit.is_patched(model)


def test_a_cache_the_model_ignores_fails_the_prefill(monkeypatch):
    """Break the contract after build (as 5.24 did to earlier prunekit): prunekit passes its cache under a name the
    model ignores. Generate must raise, not answer unpruned."""
    model, rows = tiny("llava")
    prunekit.build("tops", model, keep_ratio=0.5)
    monkeypatch.setattr(C, "LM_CACHE", dataclasses.replace(C.LM_CACHE, spellings=(("5.0", "kv_cache_renamed"),)))
    with pytest.raises(C.ContractError, match="did not use the KV cache"):
        model(**rows[0])
    prunekit.remove(model)


def test_visual_tokens_not_found_raise(monkeypatch):
    """Images in the call but no placeholder found (e.g. a renamed image token id): raise, never run unpruned."""
    model, rows = tiny("llava")
    adapter_cls = type(prunekit.adapter_for(model))
    monkeypatch.setattr(adapter_cls, "visual_token_ids", lambda self: [3])  # an id the prompt's images do not use
    row = dict(rows[0], input_ids=rows[0]["input_ids"].masked_fill(rows[0]["input_ids"] == 3, 4))
    prunekit.build("tops", model, keep_ratio=0.5)
    with pytest.raises(prunekit.PruningError, match=r"none of its tokens is a visual placeholder.*transformers"):
        model.generate(**row, max_new_tokens=2, do_sample=False)
    prunekit.remove(model)


def test_a_stage_that_did_not_run_raises():
    """The decoder layers prunekit hooked are not the ones the model runs: the in-LLM stage never fires."""
    model, rows = tiny("llava")
    prunekit.build("fastv", model, keep_ratio=0.7)
    lm = prunekit.adapter_for(model).language_model()
    hooked = lm.layers
    lm.layers = torch.nn.ModuleList([_copy(layer) for layer in hooked])
    try:
        with pytest.raises(prunekit.PruningError, match=r"did not run \(transformers " + C.installed().replace(".", r"\.")):
            model(**rows[0])
    finally:
        lm.layers = hooked
        prunekit.remove(model)


def _copy(module):
    import copy

    clone = copy.deepcopy(module)
    clone._forward_hooks.clear()
    clone._forward_pre_hooks.clear()
    return clone


def test_the_language_model_not_called_raises():
    """The model reaches its decoder by another path than the hooked language model."""
    model, rows = tiny("llava")
    prunekit.build("tops", model, keep_ratio=0.5)
    inner = prunekit.adapter_for(model).inner
    hooked = inner.language_model
    inner.language_model = _copy(hooked)
    try:
        with pytest.raises(C.ContractError, match=r"'model\.language_model'.*without calling the language model"):
            model(**rows[0])
    finally:
        inner.language_model = hooked
        prunekit.remove(model)


def test_an_unsupported_transformers_release_is_refused_at_build(monkeypatch):
    model, _ = tiny("llava")
    monkeypatch.setattr(C, "installed", lambda: "5.15.1")
    with pytest.raises(prunekit.UnsupportedTransformersError, match=r"transformers >=5\.16,<6.*5\.15\.1"):
        prunekit.build("tops", model, keep_ratio=0.5)
    assert not prunekit.is_patched(model)


def test_supported_range_matches_pyproject():
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirement = next(r for r in project["dependencies"] if r.startswith("transformers"))
    assert requirement == f"transformers{C.SUPPORTED}"
    assert C.OLDEST.startswith(C.SUPPORTED.split(",")[0].lstrip(">="))


@pytest.mark.parametrize("name", ADAPTERS)
def test_pruned_generate_triggers_no_transformers_deprecation(name):
    """No FutureWarning or DeprecationWarning from anything prunekit reads, injects or calls (pre-LLM and in-LLM
    stages, prefill and decode)."""
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        prunekit.build("tops", model, keep_ratio=0.7 if points_of(name) == ["decoder_layer"] else 0.4,
                       insertion_points=points_of(name))
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model(**inputs)
    assert_pruned(model)
    prunekit.remove(model)
