"""The conformance suite (prunekit.testing.PruningConformance) for every registered adapter × every registered
method, each on the adapter's tiny model: a plugin is tested here the moment it registers. Then the suite itself:
it runs under unittest, skips only pairs prunekit refuses, and fails a plugin that breaks each of its checks."""

import contextlib
import types
import unittest

import pytest
import torch

import prunekit
from prunekit.plugin import registry
from prunekit.testing import CHECKS, PruningConformance, registered, tiny_llava, tiny_llava_inputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models' ops are too small to share between threads: one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestEveryPair(PruningConformance):
    """Every registered method on every registered adapter (none set: the registry's)."""


#: (adapter, method, check) known to fail, and why: strict expected failures, so a fix shows (remove it here)
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}
for (_adapter, _method, _check), _why in KNOWN_FAILURES.items():
    _name = f"test_{_adapter}__{_method}__{_check}"
    if hasattr(TestEveryPair, _name):
        setattr(TestEveryPair, _name, pytest.mark.xfail(strict=True, reason=_why)(getattr(TestEveryPair, _name)))


def test_every_adapter_and_every_method_prunes_somewhere():
    """Skips are per pair and only on refusals: every adapter runs some method, every method runs on some adapter
    (a refusal that spread to everything would otherwise pass as a wall of skips)."""
    suite = TestEveryPair()
    adapters, methods = registry.names("adapters"), registry.names("methods")
    ran = {(a, m) for a in adapters for m in methods if suite.observe(a, m).refused is None}
    assert {a for a, _ in ran} == set(adapters)
    assert {m for _, m in ran} == set(methods)
    assert all(suite.observe(a, m).error is None for a, m in ran)
    assert {(a, "random") for a in adapters} <= ran  # random reads no signal: no adapter may refuse it


# --- the suite itself ------------------------------------------------------------------------------------------------
def _run_unittest(case: type) -> unittest.TestResult:
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(case).run(result)
    return result


def _failed(result: unittest.TestResult) -> set[str]:
    return {test._testMethodName.rpartition("__")[2] for test, _ in result.failures + result.errors}


class _FreshLlava:
    """A model of its own (the checks below break it on purpose)."""

    adapters = ["llava"]

    def make_model(self, adapter):
        model = tiny_llava(seed=3, num_layers=3)
        return model, tiny_llava_inputs(model)


def test_runs_under_unittest_and_skips_only_refused_pairs():
    class Case(PruningConformance, unittest.TestCase):
        adapters = ["llava", "gemma3"]
        methods = ["random", "fastv"]  # fastv prunes inside the LLM, which gemma3 refuses

    names = unittest.defaultTestLoader.getTestCaseNames(Case)
    assert len(names) == 4 * len(CHECKS)
    result = _run_unittest(Case)
    assert result.testsRun == len(names) and result.wasSuccessful(), result.failures + result.errors
    assert {test._testMethodName for test, _ in result.skipped} == {f"test_gemma3__fastv__{c}" for c in CHECKS}
    assert all("sliding-window" in reason for _, reason in result.skipped)


def test_an_error_that_is_not_a_refusal_fails_the_pair():
    """A method that crashes (an error prunekit did not raise on purpose) fails every check of the pair."""

    class Crashing(prunekit.plugin.Method):
        name = "crashing"
        Config = prunekit.MethodConfig

        def plan(self, spec):
            def choose(ctx):
                return [torch.zeros(3)[10] for _ in ctx.features]  # IndexError

            return [prunekit.plugin.Stage(point="after_projector", keep=lambda n: n // 2, choose=choose)]

    plugin = types.SimpleNamespace(prunekit_register_methods=prunekit.plugin.hookimpl(lambda register: register(Crashing)))
    with registered(plugin, "crashing_plugin"):
        class Case(_FreshLlava, PruningConformance, unittest.TestCase):
            methods = ["crashing"]

        result = _run_unittest(Case)
    assert not result.skipped and _failed(result) == set(CHECKS)


def test_a_method_that_keeps_everything_fails_the_pruning_checks():
    class KeepsAll(prunekit.plugin.Method):
        name = "keeps_all"
        Config = prunekit.MethodConfig

        def plan(self, spec):
            return [prunekit.plugin.Stage(point="after_projector", keep=lambda n: n,
                                          choose=lambda ctx: [torch.arange(f.shape[0]) for f in ctx.features])]

    plugin = types.SimpleNamespace(prunekit_register_methods=prunekit.plugin.hookimpl(lambda register: register(KeepsAll)))
    with registered(plugin, "keeps_all_plugin"):
        class Case(_FreshLlava, PruningConformance, unittest.TestCase):
            methods = ["keeps_all"]

        result = _run_unittest(Case)
    assert _failed(result) == {"pruning_changes_the_output", "disabled_equals_unpatched_and_reenabled_equals_pruned",
                               "generate_prunes"}


@pytest.mark.parametrize("broken, fails", [
    ("remove", "remove_leaves_no_trace"),
    ("disabled", "disabled_equals_unpatched_and_reenabled_equals_pruned"),
])
def test_a_broken_remove_or_disabled_fails_its_check(monkeypatch, broken, fails):
    """``remove`` that leaves a hook behind, ``disabled`` that keeps pruning: each fails its check, only it."""
    real_remove = prunekit.remove

    def leaky_remove(model):
        real_remove(model)
        model.model.language_model.register_forward_pre_hook(lambda module, args: None)
        return model

    @contextlib.contextmanager
    def still_pruning(model):
        yield model

    monkeypatch.setattr(prunekit, broken, leaky_remove if broken == "remove" else still_pruning)

    class Case(_FreshLlava, PruningConformance, unittest.TestCase):
        methods = ["random"]

    assert _failed(_run_unittest(Case)) == {fails}


# --- TOPS at each insertion point alone ------------------------------------------------------------------------------
class TestTopsBeforeTheLLM(PruningConformance):
    """TOPS at the projector alone, on every adapter (Gemma3 included: it refuses only in-LLM pruning)."""

    methods = ["tops"]
    options = {"insertion_points": ["after_projector"]}


class TestTopsInsideTheLLM(PruningConformance):
    """TOPS inside the LLM alone (where the adapter allows it), at a budget 4 decoder layers can reach."""

    methods = ["tops"]
    adapters = [n for n in registry.names("adapters") if not registry.get("adapters", n).no_decoder_pruning]
    options = {"insertion_points": ["decoder_layer"]}
    keep_ratio = 0.7
