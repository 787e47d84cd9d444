"""Bad input to ``prunekit.select`` / ``prunekit.reduce`` and to every method config is rejected, and the error names
the argument and what it takes.

Parametrised over the registry, so a new method (or a new config field) is tested without editing this file: a
method whose ``SelectionConfig`` is None must instead refuse model-free selection with its own clear error.
"""

from __future__ import annotations

import inspect
import types
import typing

import pytest
import torch
from pydantic import ValidationError

import prunekit
from prunekit.plugin import Method, hookimpl, registry
from prunekit.config import MethodConfig
from prunekit.testing import registered

METHODS = registry.names("methods")
B, N, D = 2, 9, 4  # N = 9: a square grid for pool
MODEL_ONLY = "needs a model to select tokens; use prunekit.build"
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def _reads_query(name: str) -> bool:
    return "query" in inspect.signature(prunekit.get_method(name).select).parameters


def _arguments(name: str, **changes) -> dict:
    """Valid arguments of a selection by ``name`` (relevance always, a query when the method reads one), with
    ``changes`` applied."""
    g = torch.Generator().manual_seed(0)
    args = {"features": torch.randn(B, N, D, generator=g), "relevance": torch.rand(B, N, generator=g), "k": 3}
    if _reads_query(name):
        args["query"] = torch.randn(B, 2, D, generator=g)
    args.update(changes)
    return args


def _call(fn, name: str, **changes):
    args = _arguments(name, **changes)
    return fn(name, args.pop("features"), args.pop("relevance"), **args)


def _rejects(name: str, *words: str, **changes) -> None:
    """``select`` and ``reduce`` with ``changes`` raise an error naming every one of ``words`` (a method without a
    model-free selection: its own error)."""
    for fn in (prunekit.select, prunekit.reduce):
        with pytest.raises((ValueError, ValidationError)) as info:
            _call(fn, name, **changes)
        message = str(info.value)
        if prunekit.get_method(name).SelectionConfig is None:
            assert MODEL_ONLY in message, message
            continue
        for word in words:
            assert word in message, f"{fn.__name__}({name!r}) error does not say {word!r}: {message}"


@pytest.mark.parametrize("name", METHODS)
def test_valid_arguments_select(name):
    """The arguments the other tests spoil are valid as they are."""
    if prunekit.get_method(name).SelectionConfig is None:
        _rejects(name)
        return
    assert tuple(_call(prunekit.select, name).shape) == (B, 3)
    assert tuple(_call(prunekit.reduce, name).values.shape) == (B, 3, D)


# --- tensors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_features(name, bad):
    features = torch.randn(B, N, D)
    features[1, 4, 2] = bad
    _rejects(name, "features", "finite", features=features)


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_relevance(name, bad):
    relevance = torch.rand(B, N)
    relevance[0, 7] = bad
    _rejects(name, "relevance", "finite", relevance=relevance)


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_query(name, bad):
    query = torch.randn(B, 2, D)
    query[1, 0, 3] = bad
    if _reads_query(name):
        _rejects(name, "query", "finite", query=query)
    else:
        _rejects(name, "does not read a query", query=query)


@pytest.mark.parametrize("shape", [(0, N, D), (B, 0, D), (B, N, 0)], ids=["B=0", "N=0", "D=0"])
@pytest.mark.parametrize("name", METHODS)
def test_empty_dimensions(name, shape):
    _rejects(name, "features", "B, N, D >= 1", str(tuple(shape)), features=torch.randn(*shape),
             relevance=torch.rand(*shape[:2]), **({"query": torch.randn(shape[0], 2, shape[2])} if _reads_query(name)
                                                  else {}))


@pytest.mark.parametrize("name", METHODS)
def test_features_must_be_a_real_3d_tensor(name):
    _rejects(name, "features", "[B, N, D]", features=torch.randn(N, D))
    _rejects(name, "features", "[B, N, D]", features=[[[0.0] * D] * N] * B)
    _rejects(name, "features", "real numbers", features=torch.ones(B, N, D, dtype=torch.bool))


@pytest.mark.parametrize("name", METHODS)
def test_relevance_must_match_the_features(name):
    _rejects(name, "relevance", "[B, N] = [2, 9]", relevance=torch.rand(B, N + 1))
    _rejects(name, "relevance", "[B, N] = [2, 9]", relevance=torch.rand(B * N))
    _rejects(name, "relevance", "[B, N] = [2, 9]", relevance=[0.5] * N)


@pytest.mark.parametrize("name", [m for m in METHODS if _reads_query(m)])
def test_query_must_match_the_features(name):
    _rejects(name, "query", "[B, Q, D] = [2, Q, 4]", query=torch.randn(B, 2, D + 1))
    _rejects(name, "query", "[B, Q, D] = [2, Q, 4]", query=torch.randn(B + 1, 2, D))
    _rejects(name, "query", "[B, Q, D]", query=torch.randn(2, D))


@pytest.mark.parametrize("k", [True, False, 0, -1, N + 1, 2.0, "3", None], ids=repr)
@pytest.mark.parametrize("name", METHODS)
def test_k_must_be_a_count_of_tokens(name, k):
    _rejects(name, "k must be an int in 1..9", k=k)


# --- config fields --------------------------------------------------------------------------------------------------
def _kinds(annotation) -> set:
    """The scalar types a field annotation is made of (``bool`` kept apart from ``int``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_kinds(a) for a in args))


def _shaped(annotation, leaf):
    """A value of the field's shape (a scalar, a list or a tuple of it) made of ``leaf``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _shaped(next(a for a in args if a is not type(None)), leaf)
    if origin is typing.Annotated:
        return _shaped(args[0], leaf)
    if origin is tuple:
        return tuple(leaf for _ in args)
    if origin is list:
        return [leaf]
    return leaf


def _fields(kind: str) -> list:
    """``(method, field name, annotation)`` for every field of every method's Config and SelectionConfig."""
    out = []
    for name in METHODS:
        method = prunekit.get_method(name)
        for model in (method.Config, method.SelectionConfig):
            if model is None or not hasattr(model, "model_fields"):
                continue
            for field, info in model.model_fields.items():
                kinds = _kinds(info.annotation)
                if (kind == "int" and int in kinds and bool not in kinds) or (kind == "float" and float in kinds):
                    out.append(pytest.param(model, field, info.annotation, id=f"{name}.{model.__name__}.{field}"))
    return out


def _validate(model, field, value):
    """Validate ``field=value`` through the config alone and, for selection fields, through ``prunekit.select``."""
    with pytest.raises(ValidationError) as info:
        model(**{field: value})
    messages = [str(info.value)]
    for name in METHODS:
        if prunekit.get_method(name).SelectionConfig is model:
            with pytest.raises(ValidationError) as info:
                _call(prunekit.select, name, **{field: value})
            messages.append(str(info.value))
    return messages


@pytest.mark.parametrize("model, field, annotation", _fields("int"))
def test_no_count_takes_a_bool(model, field, annotation):
    """``keep_tokens=True`` is not 1 (pydantic would coerce it): the error names the field and what it takes."""
    for value in (True, False):
        for message in _validate(model, field, _shaped(annotation, value)):
            assert f"{field} takes" in message and "an int" in message and "a bool" in message, message


@pytest.mark.parametrize("model, field, annotation", _fields("float"))
def test_no_number_may_be_nan_or_infinite(model, field, annotation):
    for value in NON_FINITE:
        for message in _validate(model, field, _shaped(annotation, value)):
            assert f"{field} takes a finite number" in message and "not finite" in message, message


@pytest.mark.parametrize("model, field, annotation", _fields("float"))
def test_no_number_takes_a_bool(model, field, annotation):
    for message in _validate(model, field, _shaped(annotation, True)):
        assert f"{field} takes a finite number" in message and "a bool" in message, message


@pytest.mark.parametrize("model, field, annotation", _fields("int") + _fields("float"))
def test_numbers_below_their_bound_are_rejected(model, field, annotation):
    """Counts, weights and ratios with a lower bound (weights: >= 0) reject a value under it, naming the field."""
    def metadata(annotation):  # the constraints anywhere in the annotation, e.g. list[Annotated[int, Gt(0)]]
        inner = (m for a in typing.get_args(annotation) for m in metadata(a))
        return [*getattr(annotation, "__metadata__", ()), *inner]

    info = model.model_fields[field]
    constraints = [*info.metadata, *metadata(info.annotation)]
    bounds = [getattr(m, attr) for m in constraints for attr in ("gt", "ge") if hasattr(m, attr)]
    if not bounds:
        pytest.skip(f"{field} has no lower bound")
    below = min(bounds) - 1
    for message in _validate(model, field, _shaped(annotation, below)):
        assert field in message


def test_bool_fields_still_take_bools():
    for name in METHODS:
        for model in (prunekit.get_method(name).Config, prunekit.get_method(name).SelectionConfig):
            for field, info in getattr(model, "model_fields", {}).items():
                if info.annotation is bool:
                    assert getattr(model(**{field: True}), field) is True


def test_the_errors_the_issue_names():
    """The cases issue 15 reported, each by name."""
    from prunekit_plugins.methods.tops import TopsConfig

    with pytest.raises(ValidationError, match=r"keep_tokens takes an int > 0, or None; got True \(a bool\)"):
        TopsConfig(keep_tokens=True)
    with pytest.raises(ValidationError, match="diversity_weight takes a finite number >= 0.0; got inf"):
        TopsConfig(diversity_weight=float("inf"))
    with pytest.raises(ValidationError, match="schedule takes a list of"):
        TopsConfig(schedule=[8, True])
    cfg = TopsConfig()
    with pytest.raises(ValidationError, match="keep_ratio"):  # assignment is validated too
        cfg.keep_ratio = float("nan")


@pytest.mark.parametrize("weight", [-1.0, float("inf"), float("nan"), True, "1"], ids=repr)
def test_greedy_weights_must_be_finite_and_non_negative(weight):
    scorer = registry.get("scorers", "diversity")()
    with pytest.raises(ValueError, match="weight of scorer 'diversity' must be a finite number >= 0"):
        registry.get("selectors", "greedy")([(scorer, weight)])


def test_a_model_only_method_says_so():
    """A method with no model-free selection (``SelectionConfig = None``) refuses it, whatever the arguments."""

    class NeedsAModel(Method):
        name = "needs_a_model"
        Config = MethodConfig

        def plan(self, spec):
            return []

    plugin = types.SimpleNamespace(prunekit_register_methods=hookimpl(lambda register: register(NeedsAModel)))
    with registered(plugin, "needs_a_model_plugin"):
        for fn in (prunekit.select, prunekit.reduce):
            with pytest.raises(ValueError, match=MODEL_ONLY):
                fn("needs_a_model", torch.randn(B, N, D), k=3)
            with pytest.raises(ValueError, match=MODEL_ONLY):
                fn("needs_a_model", torch.full((B, N, D), float("nan")), k=True)
