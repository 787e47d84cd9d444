"""The conformance suite: what every (adapter, method) pair must do on a real model, as an importable mixin.

Runs under pytest or unittest and needs neither at import time: a pair is skipped by raising
:class:`unittest.SkipTest`, which both runners report as a skip with its reason.
"""

from __future__ import annotations

import copy
import itertools
import sys
import unittest
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

import torch

import prunekit
from prunekit.plugin import registry

from .models import batch_of, tiny_adapter_model

#: the checks of :class:`PruningConformance`, in the order its tests run for each pair
CHECKS = (
    "keep_all_is_bit_exact",
    "pruning_changes_the_output",
    "disabled_equals_unpatched_and_reenabled_equals_pruned",
    "generate_prunes",
    "remove_leaves_no_trace",
)

_PRIMITIVE = (bool, int, float, complex, str, bytes, type(None))


# --- what a patch leaves on a model --------------------------------------------------------------------------------
def patch_footprint(model: Any) -> dict[str, Any]:
    """Everything a patch could leave on ``model``, as a comparable dict.

    Per submodule (by name): its class; the hooks in each of its hook tables (forward hooks, pre-hooks, their
    with-kwargs and always-called tables, backward and state-dict hooks), by handle id; its instance attributes
    (a primitive by value, anything else by identity, so a forward wrapper or recorder set on the instance shows
    as a new key or a new identity); its parameters, buffers and child modules by identity. Then the attributes of
    every class in those modules' method resolution orders (a method patched on a class), the model's config and
    generation config, and torch's global module hooks. Take one before ``prunekit.build`` and one after
    ``prunekit.remove``: equal footprints mean nothing was left behind (:func:`footprint_difference` says what was,
    less the entries the model's own calls change: :func:`own_state`).
    """
    out: dict[str, Any] = {}
    classes: dict[type, None] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        entry: dict[str, Any] = {"<class>": type(module)}
        for key, value in vars(module).items():
            if "hooks" in key and isinstance(value, dict):
                entry[key] = tuple(value)
            elif key in ("_parameters", "_buffers", "_modules"):
                entry[key] = {k: id(v) for k, v in value.items()}
            else:
                entry[key] = value if isinstance(value, _PRIMITIVE) else ("id", id(value))
        out[f"module {name or '<model>'!r}"] = entry
        classes.update(dict.fromkeys(type(module).__mro__))
    for cls in classes:
        if cls is not object:
            out[f"class {cls.__module__}.{cls.__qualname__}"] = {k: ("id", id(v)) for k, v in vars(cls).items()}
    for attribute in ("config", "generation_config"):
        config = getattr(model, attribute, None)
        if config is not None:
            out[attribute] = {k: repr(v) for k, v in config.to_dict().items()}
    module_module = torch.nn.modules.module
    out["torch global module hooks"] = {k: tuple(v) for k, v in vars(module_module).items()
                                        if k.startswith("_global") and isinstance(v, dict)}
    return out


def footprint_difference(before: Mapping[str, Any], after: Mapping[str, Any],
                         ignore: Collection[tuple[str, str]] = ()) -> list[str]:
    """What differs between two :func:`patch_footprint` s, one line per changed entry (empty: nothing).
    ``ignore``: ``(owner, key)`` entries not compared (:func:`own_state` finds those a model's own calls change)."""
    lines = []
    for owner in dict.fromkeys([*before, *after]):
        a, b = before.get(owner, {}), after.get(owner, {})
        if owner not in before or owner not in after:
            lines.append(f"{owner}: {'added' if owner not in before else 'gone'}")
            continue
        for key in dict.fromkeys([*a, *b]):
            if (owner, key) not in ignore and a.get(key, "<absent>") != b.get(key, "<absent>"):
                lines.append(f"{owner}: {key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def own_state(model: Any, run: Callable[[], Any]) -> set[tuple[str, str]]:
    """The footprint entries that ``run()`` (calls of the unpatched ``model``) changes: the model's own per-call
    state (Qwen-VL's ``rope_deltas``, replaced in every forward), which no patch is needed to change."""
    before = patch_footprint(model)
    run()
    after = patch_footprint(model)
    return {(owner, key) for owner in before for key in before[owner]
            if after.get(owner, {}).get(key, "<absent>") != before[owner][key]}


# --- which failures mean "this pair cannot work" -------------------------------------------------------------------
def refusal(exc: BaseException, *plugins: type) -> str | None:
    """The reason, when ``exc`` is prunekit (or one of the ``plugins`` classes) refusing a pair on purpose;
    None for anything else (a bug, which a conformance test must not hide).

    A refusal is a :class:`prunekit.PruningError` or :class:`prunekit.BudgetError` (a signal or insertion point
    the adapter lacks, a budget the model's depth cannot reach), or a ``ValueError`` raised by the code of
    prunekit, its built-in plugins or the plugins under test, the errors ``prunekit.tools.matrix`` classifies
    the same way. A :class:`prunekit.ContractError` (the model or the transformers release breaks what prunekit
    relies on) is never a refusal of the pair.
    """
    if isinstance(exc, (prunekit.ContractError, prunekit.UnsupportedTransformersError)):
        return None
    if not isinstance(exc, (prunekit.PruningError, prunekit.BudgetError)):
        if not isinstance(exc, ValueError) or exc.__traceback__ is None:
            return None
        tb = exc.__traceback__
        while tb.tb_next is not None:  # the frame that raised it
            tb = tb.tb_next
        raised_in = tb.tb_frame.f_globals.get("__name__", "")
        own = {"prunekit", "prunekit_plugins"} | {p.__module__.split(".")[0] for p in plugins}
        if raised_in.split(".")[0] not in own:
            return None
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# --- the mixin -----------------------------------------------------------------------------------------------------
@dataclass
class _Reference:
    model: Any
    inputs: dict
    logits: torch.Tensor
    generated: Any  # generate's output (sequences and step scores)
    own_state: set  # footprint entries the unpatched model's own calls change


@dataclass
class _Observed:
    """What one pair did, recorded once by :meth:`PruningConformance.observe`; each test asserts one property."""

    refused: str | None = None
    error: BaseException | None = None
    pruned: torch.Tensor | None = None
    pruned_report: Any = None
    disabled: torch.Tensor | None = None
    reenabled: torch.Tensor | None = None
    reenabled_report: Any = None
    generated: Any = None
    generate_report: Any = None
    keep_all: torch.Tensor | None = None
    keep_all_report: Any = None
    keep_all_generated: Any = None
    before: dict = field(default_factory=dict)
    patched: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    restored: torch.Tensor | None = None


class PruningConformance:
    """Mixin: the checks every pruning method must pass on every model adapter, one test per (adapter, method,
    check), for a third-party adapter or method to run in its own test suite (pytest or unittest).

    For each pair, on the adapter's tiny model (``ModelAdapter.tiny`` and ``tiny_rows``, collated into one
    left-padded batch) or the model :meth:`make_model` returns:

    - ``keep_all_is_bit_exact``: with ``keep_ratio=1.0`` every visual token is kept, and the logits, and
      ``generate``'s tokens and scores, equal the unpatched model's bit for bit;
    - ``pruning_changes_the_output``: at :attr:`keep_ratio` the report shows every sample dropped tokens, and each
      sample's last logits differ from the unpatched model's;
    - ``disabled_equals_unpatched_and_reenabled_equals_pruned``: inside ``prunekit.disabled(model)`` the logits
      equal the unpatched model's; after it, the pruned logits again, bit for bit;
    - ``generate_prunes``: a pruned ``generate`` runs, prunes its prefill (every sample drops tokens) and
      returns the prompt followed by ``max_new_tokens`` tokens with finite scores;
    - ``remove_leaves_no_trace``: ``prunekit.remove`` (after a ``generate`` and a second ``build`` replacing the
      first) leaves no hook, wrapper or patched attribute (:func:`patch_footprint` equals the one taken before
      ``build``, which the patch did change) and the logits equal the unpatched model's bit for bit.

    A pair that cannot work is skipped, with prunekit's reason, only when building or running the pruned model
    raises a refusal (:func:`refusal`: a signal or insertion point the adapter lacks, a budget the model's depth
    cannot reach); any other error fails all of the pair's tests.

    Set class attributes and inherit the tests; they are generated when the class is defined, named
    ``test_<adapter>__<method>__<check>``::

        import unittest
        from prunekit.testing import PruningConformance

        class TestMyMethodConformance(PruningConformance, unittest.TestCase):  # or a plain class under pytest
            methods = ["my_method"]   # registered names; unset: every registered method
            adapters = ["llava"]      # unset: every registered adapter
            keep_ratio = 0.5          # the pruning budget: a fraction of each sample's visual tokens
            options = {"layer": 2}    # further method options, passed to prunekit.build for every pair

    An adapter author sets ``adapters = ["my_adapter"]`` instead (every registered method on it); its adapter
    class must build a tiny model (``tiny``) and input rows (``tiny_rows``), or the suite overrides
    :meth:`make_model` to return a model of its own. The plugin must be registered (installed, or
    ``prunekit.plugin.registry.register``-ed) before the class is defined. Each pair runs its protocol once
    (:meth:`observe`) and its five tests assert on what it recorded; on tiny models one torch thread
    (``torch.set_num_threads(1)``) is several times faster than several.
    """

    adapters: ClassVar[Sequence[str] | None] = None
    methods: ClassVar[Sequence[str] | None] = None
    keep_ratio: ClassVar[float] = 0.5
    options: ClassVar[Mapping[str, Any]] = {}
    #: decoder layers of the adapters' tiny models (in-LLM methods need room for their layers)
    num_layers: ClassVar[int] = 4
    max_new_tokens: ClassVar[int] = 2

    _references: ClassVar[dict]
    _observed: ClassVar[dict]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._references, cls._observed = {}, {}
        adapters = list(cls.adapters) if cls.adapters is not None else registry.names("adapters")
        methods = list(cls.methods) if cls.methods is not None else registry.names("methods")
        for adapter, method in itertools.product(adapters, methods):
            for check in CHECKS:
                name = f"test_{adapter}__{method}__{check}"
                setattr(cls, name, _test(adapter, method, check, name))

    # -- what a subclass may override ---------------------------------------------------------------------------
    def make_model(self, adapter: str) -> tuple[Any, list[dict] | dict]:
        """``(model, inputs)`` for adapter ``adapter``: an unpatched model in eval mode, and either single-prompt
        input rows (collated into one left-padded batch) or one batch of inputs. Default: the adapter's tiny model
        with :attr:`num_layers` decoder layers, built once per process."""
        return tiny_adapter_model(adapter, self.num_layers)

    def build_options(self, adapter: str, method: str) -> dict[str, Any]:
        """Method options for the pair, besides the budget (``keep_ratio``, which the checks set)."""
        return dict(self.options)

    # -- running a pair once --------------------------------------------------------------------------------------
    def reference(self, adapter: str) -> _Reference:
        """The unpatched model, its inputs and logits (computed once per class and adapter)."""
        if adapter not in self._references:
            model, inputs = self.make_model(adapter)
            if isinstance(inputs, list):
                inputs = batch_of(model, inputs)
            prunekit.remove(model)
            with torch.no_grad():
                logits = model(**inputs).logits
                generated = []
                own = own_state(model, lambda: generated.append(model.generate(**inputs, **self._generate_kwargs())))
            self._references[adapter] = _Reference(model, inputs, logits, generated[0], own)
        return self._references[adapter]

    def observe(self, adapter: str, method: str) -> _Observed:
        """Run the pair's whole protocol once (cached): build, forward, disabled, re-enabled, generate, build
        keep-all over it, remove; each step recorded for the checks."""
        key = (adapter, method)
        if key not in self._observed:
            seen = _Observed()
            try:
                self._run(adapter, method, seen)
            except Exception as exc:  # a failure of this pair: every check of it re-raises it
                seen.error = exc
            self._observed[key] = seen
        return self._observed[key]

    def _run(self, adapter: str, method: str, seen: _Observed) -> None:
        ref = self.reference(adapter)
        model, inputs = ref.model, ref.inputs
        options = self.build_options(adapter, method)
        seen.before = patch_footprint(model)
        try:
            with torch.no_grad():
                try:
                    prunekit.build(method, model, keep_ratio=self.keep_ratio, **options)
                    seen.pruned = model(**inputs).logits
                except Exception as exc:
                    plugins = (registry.get("methods", method), type(prunekit.adapter_for(model)))
                    seen.refused = refusal(exc, *plugins)
                    if seen.refused is None:
                        raise
                    return
                seen.pruned_report = copy.deepcopy(prunekit.pruning_report(model))
                with prunekit.disabled(model):
                    seen.disabled = model(**inputs).logits
                seen.reenabled = model(**inputs).logits
                seen.reenabled_report = copy.deepcopy(prunekit.pruning_report(model))
                seen.generated = model.generate(**inputs, **self._generate_kwargs())
                seen.generate_report = copy.deepcopy(prunekit.pruning_report(model))
                prunekit.build(method, model, keep_ratio=1.0, **options)  # replaces the pruning patch
                seen.keep_all = model(**inputs).logits
                seen.keep_all_report = copy.deepcopy(prunekit.pruning_report(model))
                seen.keep_all_generated = model.generate(**inputs, **self._generate_kwargs())
                seen.patched = patch_footprint(model)
                prunekit.remove(model)
                seen.after = patch_footprint(model)
                seen.restored = model(**inputs).logits
        finally:
            prunekit.remove(model)

    def _generate_kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)

    def _skip(self, reason: str) -> None:
        """Skip the running test: through unittest in a TestCase, else through pytest when it runs the test (so
        the skip names the test), else by raising unittest.SkipTest, which pytest reports as a skip too."""
        pytest = sys.modules.get("pytest")
        if isinstance(self, unittest.TestCase):
            self.skipTest(reason)
        elif pytest is not None:
            pytest.skip(reason)
        raise unittest.SkipTest(reason)

    # -- the checks -------------------------------------------------------------------------------------------------
    def check_keep_all_is_bit_exact(self, adapter: str, method: str, seen: _Observed) -> None:
        report = seen.keep_all_report
        assert report is not None and report.visual_tokens, f"keep_ratio=1.0: no prefill was recorded: {report}"
        assert list(report.layer_average) == [float(n) for n in report.visual_tokens], \
            f"keep_ratio=1.0 dropped visual tokens: {report}"
        ref = self.reference(adapter)
        assert torch.equal(seen.keep_all, ref.logits), \
            f"keep_ratio=1.0 changed the logits (max difference {_max_difference(seen.keep_all, ref.logits)})"
        out = seen.keep_all_generated
        assert torch.equal(out.sequences, ref.generated.sequences), "keep_ratio=1.0 changed what generate returns"
        for step, (a, b) in enumerate(zip(out.scores, ref.generated.scores)):
            assert torch.equal(a, b), f"keep_ratio=1.0 changed generate's scores at step {step}"

    def check_pruning_changes_the_output(self, adapter: str, method: str, seen: _Observed) -> None:
        _assert_dropped(seen.pruned_report, f"keep_ratio={self.keep_ratio}")
        ref = self.reference(adapter).logits
        same = [b for b in range(ref.shape[0]) if torch.equal(seen.pruned[b, -1], ref[b, -1])]
        assert not same, f"rows {same} pruned to {seen.pruned_report.layer_average} tokens give the unpatched logits"

    def check_disabled_equals_unpatched_and_reenabled_equals_pruned(self, adapter: str, method: str,
                                                                   seen: _Observed) -> None:
        ref = self.reference(adapter).logits
        assert torch.equal(seen.disabled, ref), \
            f"inside prunekit.disabled the logits differ from the unpatched model's " \
            f"(max difference {_max_difference(seen.disabled, ref)})"
        _assert_dropped(seen.reenabled_report, "after prunekit.disabled")
        assert torch.equal(seen.reenabled, seen.pruned), \
            f"re-enabled, the logits differ from the pruned ones (max difference " \
            f"{_max_difference(seen.reenabled, seen.pruned)})"

    def check_generate_prunes(self, adapter: str, method: str, seen: _Observed) -> None:
        _assert_dropped(seen.generate_report, "generate")
        out = seen.generated
        prompt = self.reference(adapter).inputs["input_ids"]
        assert out.sequences.shape == (prompt.shape[0], prompt.shape[1] + self.max_new_tokens), out.sequences.shape
        assert torch.equal(out.sequences[:, :prompt.shape[1]], prompt)
        assert len(out.scores) == self.max_new_tokens and all(torch.isfinite(s).all() for s in out.scores)

    def check_remove_leaves_no_trace(self, adapter: str, method: str, seen: _Observed) -> None:
        own = self.reference(adapter).own_state
        assert footprint_difference(seen.before, seen.patched, own), \
            "the patched model shows no footprint: the instrument is blind"
        left = footprint_difference(seen.before, seen.after, own)
        assert not left, "prunekit.remove left behind:\n" + "\n".join(left[:20])
        ref = self.reference(adapter).logits
        assert torch.equal(seen.restored, ref), \
            f"after prunekit.remove the logits differ (max difference {_max_difference(seen.restored, ref)})"


def _test(adapter: str, method: str, check: str, name: str):
    def test(self) -> None:
        seen = self.observe(adapter, method)
        if seen.refused is not None:
            self._skip(f"{method} on {adapter}: refused: {seen.refused}")
        if seen.error is not None:
            raise AssertionError(f"{method} on {adapter} failed: {type(seen.error).__name__}: {seen.error}") \
                from seen.error
        getattr(self, f"check_{check}")(adapter, method, seen)

    test.__name__ = test.__qualname__ = name
    test.__doc__ = f"Conformance of method {method!r} on adapter {adapter!r}: {check.replace('_', ' ')}."
    return test


def _assert_dropped(report: Any, when: str) -> None:
    assert report is not None and report.enabled and report.stages, f"{when}: no pruning was recorded: {report}"
    assert all(a < n for a, n in zip(report.layer_average, report.visual_tokens)), \
        f"{when}: not every sample dropped visual tokens: {report}"


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    return f"{(a.double() - b.double()).abs().max().item():.3g}"
