"""Property tests (hypothesis) of every registered selector and of every method's model-free ``prunekit.select``.

Every registered method and selector is picked up from the registry, so a new one is tested without editing this
file (a new method must be given a place in ``EQUIVARIANT`` / ``POSITIONAL`` below: the permutation test says so).

Properties:

* the output is valid: ``[B, k]`` int64, each row strictly increasing (sorted, no repeats), inside ``0..N-1``;
* the rows of a batch are independent: selecting a batch equals selecting each row alone;
* permutations: permuting the tokens permutes the selection, for the methods whose rule reads only token content
  (see ``EQUIVARIANT``); the others depend on token positions by design (``POSITIONAL`` says why). Equivariance
  is tested on inputs without exact ties, because ties go to the lowest index, which a permutation moves;
* where a naive reference exists (``naive_tops`` in test_selection.py, ``plugins_naive.py``), the selection
  equals it;
* the memory cap never changes a selection: TOPS with ``max_similarity_mib=0`` (every row of the similarity
  computed on demand, a block at a time) equals TOPS with the matrix held, ties included.

The examples are generated with ``derandomize=True`` and no example database, so CI runs the same cases every
time; ``N``, ``D`` and ``B`` are kept small so that the whole file runs in seconds. Tensors are drawn as a seed plus
a *kind*: ``normal`` (continuous, no ties), ``ties`` (duplicated tokens and relevance values), ``ints`` (small
integers: zero vectors, parallel vectors, exact ties everywhere) or ``raw`` (float32 values drawn by hypothesis
itself, extremes included).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import prunekit
from plugins_naive import naive_divprune, naive_scope, naive_visionzip
from prunekit.plugin import SelectionInput, registry
from test_selection import naive_tops

#: examples per test function (and per parametrised case); see the module docstring for the total
EXAMPLES = 25


def _settings(examples: int = EXAMPLES):
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=slow)


METHODS = registry.names("methods")
SELECTABLE = [m for m in METHODS if prunekit.get_method(m).SelectionConfig is not None]
SELECTORS = registry.names("selectors")
SCORERS = registry.names("scorers")

#: methods whose selection is permuted with the tokens. ``exact``: bit for bit (they read the exact similarity
#: of SelectionInput, stable top-k, or the relevance alone); ``float64``: in exact arithmetic, and tested on
#: float64 inputs, because their cosine / distance matrix products may round an entry differently when it sits at
#: another place of the matrix (near-ties could then go either way).
EQUIVARIANT = {
    "tops": "exact", "divprune": "exact", "scope": "exact", "fastv": "exact", "pdrop": "exact",
    "fastervlm": "exact", "cdpruner": "float64", "dart": "float64", "sparsevlm": "float64",
}
#: methods that depend on where a token sits, with the reason
POSITIONAL = {
    "random": "a seeded random subset of positions: the same positions whatever the tokens hold",
    "pool": "average-pools the token grid: cells are fixed regions of positions",
    "visionzip": "contextual targets are taken at a uniform stride over the remaining tokens in sequence order",
    "vispruner": "de-duplication splits the remaining tokens into alternating halves by sequence order",
    "prumerge_plus": "tokens beyond the outliers are spatial samples evenly spaced in sequence order",
    "trim": "the mean token of the unselected ones takes a place fixed by sequence order",
}
#: methods whose selection ignores token content entirely: permuting the tokens keeps the same positions
CONTENT_FREE = {"random", "pool"}
#: the least budget a method accepts (visionzip keeps one dominant and one contextual token)
MIN_K = {"visionzip": 2}


@st.composite
def tensors(draw, max_b=3, max_n=10, max_d=5, min_d=1, kinds=("normal", "ties", "ints", "raw"), dtypes=None):
    """``(features [B, N, D], relevance [B, N], query [B, Q, D])`` of one drawn kind (see the module docstring)."""
    B, N, D = draw(st.integers(1, max_b)), draw(st.integers(1, max_n)), draw(st.integers(min_d, max_d))
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(dtypes or [torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    Q = draw(st.integers(0, 3))
    query = torch.randn(B, Q, D, generator=g, dtype=dtype)
    if kind == "raw":
        values = st.floats(-1e6, 1e6, width=32)
        H = torch.tensor(draw(st.lists(values, min_size=B * N * D, max_size=B * N * D)), dtype=dtype).view(B, N, D)
        r = torch.tensor(draw(st.lists(values, min_size=B * N, max_size=B * N)), dtype=dtype).view(B, N)
        return H, r, query
    if kind == "ints":
        H = torch.randint(-2, 3, (B, N, D), generator=g).to(dtype)
        r = torch.randint(0, 3, (B, N), generator=g).to(dtype)
        return H, r, query
    H = torch.randn(B, N, D, generator=g, dtype=dtype)
    r = torch.rand(B, N, generator=g, dtype=dtype)
    if kind == "ties":  # every token a copy of a random one; relevance likewise
        source = torch.randint(0, N, (B, N), generator=g)
        H = H.gather(1, source[..., None].expand(-1, -1, D))
        r = r.gather(1, torch.randint(0, N, (B, N), generator=g))
    return H, r, query


@st.composite
def cases(draw, name: str | None = None, **shape):
    """``(features, relevance, query, k)``: :func:`tensors` of ``shape`` and a budget the method ``name`` accepts."""
    H, r, query = draw(tensors(**shape))
    N = H.shape[1]
    return H, r, query, draw(st.integers(min(N, MIN_K.get(name, 1)), N))


def _select(name: str, H, r, query, k: int, fn=prunekit.select, **config):
    """``prunekit.select`` (or ``fn``) with what the method needs: relevance always, the query when it reads one,
    the grid for pool (one row of tokens unless ``config`` gives it)."""
    method = prunekit.get_method(name)
    if "query" in inspect.signature(method.select).parameters:
        config["query"] = query
    if name == "pool":
        config.setdefault("grid", (1, H.shape[1]))
    return fn(name, H, r, k=k, **config)


def _assert_valid(kept: torch.Tensor, B: int, N: int, k: int) -> None:
    assert kept.dtype == torch.long and tuple(kept.shape) == (B, k), (kept.dtype, tuple(kept.shape))
    if k:
        assert int(kept.min()) >= 0 and int(kept.max()) < N, kept
        assert bool((kept[:, 1:] > kept[:, :-1]).all()), f"not strictly increasing: {kept}"


# --- every method's model-free select -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SELECTABLE)
@_settings(40)
@given(data=st.data())
def test_method_selects_k_valid_sorted_unique_indices(name, data):
    H, r, query, k = data.draw(cases(name))
    B, N, _ = H.shape
    kept = _select(name, H, r, query, k)
    _assert_valid(kept, B, N, k)
    reduction = _select(name, H, r, query, k, fn=prunekit.reduce)
    assert torch.equal(reduction.indices, kept)
    assert tuple(reduction.values.shape) == (B, k, H.shape[-1]) and torch.isfinite(reduction.values).all()


@pytest.mark.parametrize("name", SELECTABLE)
@_settings(20)
@given(data=st.data())
def test_method_rows_are_independent(name, data):
    H, r, query, k = data.draw(cases(name, max_b=3))
    B = H.shape[0]
    together = _select(name, H, r, query, k)
    for b in range(B):
        alone = _select(name, H[b: b + 1], r[b: b + 1], query[b: b + 1], k)
        assert torch.equal(alone[0], together[b]), (b, alone[0], together[b])


def test_every_method_has_a_permutation_class():
    for name in SELECTABLE:
        assert (name in EQUIVARIANT) != (name in POSITIONAL), (
            f"method {name!r}: add it to EQUIVARIANT (permuting the tokens permutes its selection) or to POSITIONAL "
            "(with the reason it depends on positions) in tests/test_selection_properties.py"
        )


def _untied(select, N: int) -> torch.Tensor:
    """``select(order)`` selects on the tokens taken in ``order``; returns ``select`` of the tokens as they are.

    Ties go to the lowest index. Where one decides, another order of the tokens (or a reference that rounds
    differently) may legitimately choose otherwise: when reversing the order, which turns every tie-break
    around, changes the selection, the example is discarded."""
    kept = select(torch.arange(N))
    reverse = torch.arange(N - 1, -1, -1)
    assume(torch.equal(reverse[select(reverse)].sort(-1).values, kept))
    return kept


def _assert_equivariant(select, N: int, perm: torch.Tensor) -> None:
    kept = _untied(select, N)
    assert torch.equal(perm[select(perm)].sort(-1).values, kept), (perm, kept, select(perm))


@pytest.mark.parametrize("name", sorted(EQUIVARIANT))
@_settings(20)
@given(data=st.data())
def test_permuting_the_tokens_permutes_the_selection(name, data):
    dtypes = [torch.float64] if EQUIVARIANT[name] == "float64" else None
    H, r, query, k = data.draw(cases(name, min_d=2, kinds=("normal",), dtypes=dtypes))
    N = H.shape[1]
    perm = torch.tensor(data.draw(st.permutations(range(N))), dtype=torch.long)
    _assert_equivariant(lambda order: _select(name, H[:, order], r[:, order], query, k), N, perm)


@pytest.mark.parametrize("name", sorted(CONTENT_FREE))
@_settings(10)
@given(data=st.data())
def test_content_free_methods_keep_the_same_positions(name, data):
    H, r, query, k = data.draw(cases(name, min_d=2))
    N = H.shape[1]
    perm = torch.tensor(data.draw(st.permutations(range(N))), dtype=torch.long)
    assert torch.equal(_select(name, H[:, perm], r[:, perm], query, k), _select(name, H, r, query, k))


# --- naive references -------------------------------------------------------------------------------------------
PRINCIPLE_SETS = [["relevance", "coverage", "diversity"], ["coverage"], ["relevance", "coverage"], ["diversity"],
                  ["relevance", "diversity"]]


def _tops_case(data, **shape):
    """``(features, relevance, k, fields)`` of a TOPS selection: any principles, normalisation and weights."""
    H, r, _, k = data.draw(cases(**shape))
    fields = {"principles": data.draw(st.sampled_from(PRINCIPLE_SETS)),
              "normalize": data.draw(st.sampled_from(["minmax", "mean"])),
              "diversity_weight": data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
              "coverage_weight": data.draw(st.sampled_from([0.0, 0.5, 2.0]))}
    return H, r, k, fields


@_settings(60)
@given(data=st.data())
def test_tops_equals_the_naive_spec(data):
    """Ties included: the naive loop reads the same similarity matrix and sums coverage exactly."""
    H, r, k, fields = _tops_case(data, max_b=2, max_n=9)
    kept = prunekit.select("tops", H, r, k=k, **fields)
    F = SelectionInput(H).similarity
    for b in range(H.shape[0]):
        assert kept[b].tolist() == naive_tops(F[b], r[b], k, fields["diversity_weight"], fields["coverage_weight"],
                                              fields["principles"], fields["normalize"])


@_settings(40)
@given(data=st.data())
def test_divprune_and_scope_equal_their_naive_rules(data):
    """The naive rules compute cosines in float64 from the raw features, rounding differently, so they are
    compared where no tie decides: on continuous inputs, without the examples a tie decides for prunekit (two
    mutual nearest neighbours are equally isolated, DivPrune's first pick), and for SCOPE with α > 0 (at α = 0
    two last candidates that cover each other tie in real arithmetic: their gains differ only by their
    self-similarities, 1 up to rounding, and each side's rounding decides)."""
    H, r, _, k = data.draw(cases(max_b=2, max_n=9, min_d=2, kinds=("normal",), dtypes=[torch.float64]))
    N = H.shape[1]
    alpha = data.draw(st.sampled_from([0.5, 0.7, 1.0, 2.0]))
    divprune = _untied(lambda order: prunekit.select("divprune", H[:, order], k=k), N)
    scope = _untied(lambda order: prunekit.select("scope", H[:, order], r[:, order], k=k, alpha=alpha), N)
    for b in range(H.shape[0]):
        if k == N:  # everything is kept (the naive rule needs a nearest neighbour for its first pick)
            assert divprune[b].tolist() == scope[b].tolist() == list(range(N))
            continue
        assert divprune[b].tolist() == sorted(naive_divprune(H[b], k))
        assert scope[b].tolist() == sorted(naive_scope(H[b], r[b], k, alpha))


@_settings(30)
@given(data=st.data())
def test_visionzip_equals_its_naive_rule(data):
    H, r, _, k = data.draw(cases("visionzip", max_b=2, max_n=10, min_d=2, kinds=("normal",), dtypes=[torch.float64]))
    N = H.shape[1]
    contextual = data.draw(st.integers(1, max(1, k - 1))) if k < N else None
    red = prunekit.reduce("visionzip", H, r, k=k, contextual_tokens=contextual)
    for b in range(H.shape[0]):
        if k == N:
            assert red.indices[b].tolist() == list(range(N))
            continue
        idx, values, merged = naive_visionzip(H[b], r[b], H[b], k, contextual)
        order = sorted(range(k), key=lambda i: idx[i])
        assert red.indices[b].tolist() == [idx[i] for i in order]
        torch.testing.assert_close(red.values[b], torch.stack([values[i] for i in order]))
        assert red.merged[b].tolist() == [merged[i] for i in order]


# --- the memory cap never changes a selection -----------------------------------------------------------------------
@_settings(60)
@given(data=st.data())
def test_capped_tops_equals_uncapped(data):
    H, r, k, fields = _tops_case(data, max_n=24, max_d=6)
    held = prunekit.select("tops", H, r, k=k, **fields)
    assert torch.equal(prunekit.select("tops", H, r, k=k, max_similarity_mib=0, **fields), held)


# --- every registered selector -----------------------------------------------------------------------------------
def _scorer_terms(draw):
    names = draw(st.lists(st.sampled_from(SCORERS), min_size=1, max_size=3))
    return [(registry.get("scorers", n)(), draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))) for n in names]


def _make_selector(draw, name: str, max_similarity_bytes=None):
    """A selector built the ways its constructor allows; a selector with a constructor of no arguments needs
    nothing here."""
    cls = registry.get("selectors", name)
    if name == "greedy":
        seed = draw(st.sampled_from([None, *SCORERS]))
        return cls(_scorer_terms(draw), combine=draw(st.sampled_from(["sum", "product"])),
                   normalize=draw(st.sampled_from(["minmax", "mean", "none"])),
                   seed=None if seed is None else registry.get("scorers", seed)(),
                   max_similarity_bytes=max_similarity_bytes)
    return cls()


#: selectors whose selection is permuted with the tokens bit for bit whatever the scorers (the greedy one reads
#: exact similarities; with ``query_similarity``, whose cosine with the query is a float matrix product, only in
#: exact arithmetic); dpp: in exact arithmetic (its incremental Cholesky rows are matrix products), tested in float64
SELECTOR_EQUIVARIANCE = {"greedy": "exact", "dpp": "float64"}


def _uses_query_similarity(selector) -> bool:
    terms = [s for s, _ in getattr(selector, "terms", [])] + [getattr(selector, "seed", None)]
    return any(getattr(s, "name", None) == "query_similarity" for s in terms)


@pytest.mark.parametrize("name", SELECTORS)
@_settings(60)
@given(data=st.data())
def test_selector_output_and_batch_rows(name, data):
    H, r, query, k = data.draw(cases())
    B, N, _ = H.shape
    cap = data.draw(st.sampled_from([None, 0]))
    selector = _make_selector(data.draw, name, cap)
    kept = selector.select(SelectionInput(H, r, query), k)
    _assert_valid(kept.long(), B, N, k)
    for b in range(B):
        alone = selector.select(SelectionInput(H[b: b + 1], r[b: b + 1], query[b: b + 1]), k)
        assert torch.equal(alone[0], kept[b])


@pytest.mark.parametrize("name", SELECTORS)
@_settings(40)
@given(data=st.data())
def test_selector_permutation(name, data):
    mode = SELECTOR_EQUIVARIANCE.get(name, "float64")
    H, r, query, k = data.draw(cases(min_d=2, kinds=("normal",), dtypes=[torch.float64] if mode == "float64" else None))
    N = H.shape[1]
    selector = _make_selector(data.draw, name)
    if _uses_query_similarity(selector):
        H, r, query = H.double(), r.double(), query.double()
    perm = torch.tensor(data.draw(st.permutations(range(N))), dtype=torch.long)
    _assert_equivariant(lambda order: selector.select(SelectionInput(H[:, order], r[:, order], query), k), N, perm)


@_settings(60)
@given(data=st.data())
def test_greedy_incremental_coverage_equals_naive_capped_or_not(data):
    """The incremental facility-location scorer against the from-scratch one, each held and streamed."""
    H, r, _, k = data.draw(cases(max_n=20))
    weights = data.draw(st.sampled_from([(1.0, 0.0), (1.0, 0.5), (0.3, 1.0)]))
    outs = []
    for coverage in ("facility_location", "facility_location_naive"):
        for cap in (None, 0):
            terms = [(registry.get("scorers", coverage)(), weights[0]), (registry.get("scorers", "diversity")(),
                                                                        weights[1])]
            selector = registry.get("selectors", "greedy")(terms, seed=registry.get("scorers", "relevance")(),
                                                           max_similarity_bytes=cap)
            outs.append(selector.select(SelectionInput(H, r), k))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# --- regressions: inputs the properties above found bugs with -----------------------------------------------------
def test_regression_capped_tops_with_duplicated_tokens():
    """Rows computed on demand used to round differently from the held matrix: with the cap this selection was
    [0, 3, 5, 6, 7, 8, 10, 11] instead of [0, 2, 3, 5, 6, 8, 10, 11]."""
    g = torch.Generator().manual_seed(7)
    H = torch.randn(1, 12, 3, generator=g)
    H[:, 1::3] = H[:, 0::3][:, :4].clone()
    r = torch.rand(1, 12, generator=g)
    held = prunekit.select("tops", H, r, k=8)
    assert torch.equal(prunekit.select("tops", H, r, k=8, max_similarity_mib=0), held)


def test_regression_scope_coverage_never_below_zero():
    """SCOPE's running maximum starts from zeros (the official rule, ``naive_scope``); it used to take negative
    similarities as the best cover of a token and chose [4, 5] here instead of [4, 7]."""
    H = torch.tensor([[-0.3113, -0.7130], [-0.7291, -0.2992], [-0.2529, -0.3602], [0.9394, 1.1614],
                      [-0.1706, 0.0149], [-0.0476, 0.5480], [-1.2491, 0.3195], [0.5945, 1.0562]], dtype=torch.float64)
    r = torch.tensor([0.6402, 0.1968, 0.5124, 0.7118, 0.9249, 0.9997, 0.8927, 0.8767], dtype=torch.float64)
    assert prunekit.select("scope", H[None], r[None], k=2, alpha=0.7)[0].tolist() == sorted(naive_scope(H, r, 2, 0.7))


def test_regression_prumerge_plus_weights_summing_to_zero():
    """A merge group whose [CLS] attention summed to 0 (or below) was divided by ~0: NaN values."""
    for attention in ([[0.0, -4.0]], [[0.0, 0.0]]):
        red = prunekit.reduce("prumerge_plus", torch.zeros(1, 2, 4), torch.tensor(attention), k=1)
        assert torch.isfinite(red.values).all()


def test_regression_greedy_never_picks_a_chosen_token_again():
    """NaN and infinite scores (e.g. an overflowing product) used to let argmax pick a chosen token again."""
    from prunekit_plugins.selectors.greedy import _best_candidate

    penalty = torch.tensor([[float("inf"), 0.0, 0.0, float("inf")]], dtype=torch.float64)
    for score in ([float("nan")] * 4, [float("inf")] * 4, [float("-inf")] * 4, [5.0, float("nan"), 1.0, 9.0]):
        picked = int(_best_candidate(torch.tensor([score], dtype=torch.float64), penalty))
        assert picked in (1, 2), (score, picked)
