"""TOPS selection on plain tensors against a naive implementation of tops-spec.md written here."""

import itertools

import pytest
import torch
from pydantic import ValidationError

import prunekit
from prunekit import SelectionInput, registry

PRINCIPLES = ["relevance", "coverage", "diversity"]
SUBSETS = [list(c) for n in (1, 2, 3) for c in itertools.combinations(PRINCIPLES, n)]  # the paper's 7


def _normalize(values, how):
    if how == "minmax":
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]
    mean = sum(values) / len(values)
    return [v / mean if mean != 0 else 0.0 for v in values]


def naive_tops(H, r, k, alpha=0.5, lam=0.5, principles=PRINCIPLES, normalize="minmax"):
    """Literal O(K·N²) greedy of the spec, one token at a time, in Python."""
    Hn = torch.nn.functional.normalize(H.double(), dim=-1)
    F = (Hn @ Hn.T).tolist()
    N = len(F)
    use_r, use_d, use_c = ("relevance" in principles), ("diversity" in principles), ("coverage" in principles)
    S, m = [], None
    if use_r:
        rr = r.double().tolist()
        S.append(max(range(N), key=lambda i: (rr[i], -i)))
        m = [F[j][S[0]] for j in range(N)]
    while len(S) < k:
        cand = [i for i in range(N) if i not in S]
        terms = []
        if use_r:
            terms.append((1.0, [rr[i] for i in cand]))
        if use_d:
            terms.append((alpha, [1.0 if m is None else 1.0 - m[i] for i in cand]))
        if use_c:
            base = [0.0] * N if m is None else m
            cov = [sum(max(0.0, F[i][j] - base[j]) for j in range(N) if j not in S) for i in cand]
            terms.append((lam, cov))
        scores = [0.0] * len(cand)
        for w, vals in terms:
            for t, v in enumerate(_normalize(vals, normalize)):
                scores[t] += w * v
        best = max(range(len(cand)), key=lambda t: (scores[t], -t))
        pick = cand[best]
        S.append(pick)
        m = [F[j][pick] for j in range(N)] if m is None else [max(m[j], F[j][pick]) for j in range(N)]
    return sorted(S)


def _data(seed, B=2, N=40, D=8, dtype=torch.float64, ties=False):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    r = torch.rand(B, N, generator=g, dtype=torch.float64)
    if ties:  # duplicated tokens and duplicated relevance values
        H[:, 1::4] = H[:, 0::4][:, : H[:, 1::4].shape[1]]
        r[:, 1::4] = r[:, 0::4][:, : r[:, 1::4].shape[1]]
    return H.to(dtype), r.to(dtype)


@pytest.mark.parametrize("principles", SUBSETS, ids=lambda p: "+".join(x[0].upper() for x in p))
@pytest.mark.parametrize("normalize", ["minmax", "mean"])
@pytest.mark.parametrize("seed", range(4))
def test_tops_equals_naive_float64(principles, normalize, seed):
    H, r = _data(seed, ties=seed % 2 == 1)
    k = 12
    got = prunekit.select("tops", H, r, k=k, principles=principles, normalize=normalize,
                          diversity_weight=0.7, coverage_weight=0.3)
    assert got.dtype == torch.long and got.shape == (2, k)
    for b in range(2):
        assert got[b].tolist() == naive_tops(H[b], r[b], k, 0.7, 0.3, principles, normalize)


@pytest.mark.parametrize("seed", range(6))
def test_tops_equals_naive_float32(seed):
    H, r = _data(100 + seed, dtype=torch.float32, N=48)
    got = prunekit.select("tops", H, r, k=16)
    for b in range(2):
        assert got[b].tolist() == naive_tops(H[b], r[b], 16)


def test_select_output_contract():
    H, r = _data(7)
    out = prunekit.select("tops", H, r, k=40)
    assert out.tolist() == [list(range(40))] * 2
    out = prunekit.select("tops", H, r, k=1)
    assert out[:, 0].tolist() == r.argmax(-1).tolist()  # the seed is the most relevant token


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"k": 0}, "k"),
        ({"k": 41}, "k"),
        ({"k": 5, "diversity_weight": -1}, "diversity_weight"),
        ({"k": 5, "normalize": "zscore"}, "normalize"),
        ({"k": 5, "principles": []}, "principles"),
        ({"k": 5, "principles": ["relevance", "beauty"]}, "principles"),
        ({"k": 5, "coverage_scorer": "nope"}, "coverage_scorer"),
        ({"k": 5, "keep_tokens": 3}, "keep_tokens"),
    ],
)
def test_select_rejects_bad_input(kwargs, field):
    H, r = _data(0)
    with pytest.raises((ValidationError, ValueError)) as info:
        prunekit.select("tops", H, r, **kwargs)
    assert field in str(info.value)


def test_relevance_principle_needs_relevance():
    H, _ = _data(0)
    with pytest.raises(ValueError, match="relevance"):
        prunekit.select("tops", H, None, k=5)
    assert prunekit.select("tops", H, None, k=5, principles=["coverage", "diversity"]).shape == (2, 5)


@pytest.mark.parametrize("name", registry.names("scorers"))
def test_every_scorer_is_a_valid_greedy_term(name):
    """Each registered scorer: finite [B, N] gains, incremental updates, usable alone in the greedy selector."""
    H, r = _data(3, dtype=torch.float32)
    query = torch.randn(2, 3, H.shape[-1], generator=torch.Generator().manual_seed(0))
    inputs = SelectionInput(H, r, query)
    scorer = registry.get("scorers", name)()
    run = scorer.start(inputs)
    g0 = run.gains()
    assert g0.shape == (2, 40) and torch.isfinite(g0).all()
    run.update(torch.tensor([0, 5]))
    assert run.gains().shape == (2, 40)
    selector = registry.get("selectors", "greedy")([(scorer, 1.0)])
    kept = selector.select(inputs, 10)
    assert kept.shape == (2, 10)
    for row in kept:
        assert row.unique().numel() == 10 and torch.equal(row, row.sort().values)


@pytest.mark.parametrize("name", registry.names("selectors"))
def test_every_selector_is_registered_with_a_name(name):
    assert registry.get("selectors", name).name == name
