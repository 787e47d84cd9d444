"""TOPS selection on plain tensors against a naive implementation of tops-spec.md written here."""

import itertools

import pytest
import torch
from pydantic import ValidationError

import prunekit
from prunekit.plugin import SelectionInput, Selector, registry
from prunekit_plugins.scorers.facility_location import fixed_point_bits

PRINCIPLES = ["relevance", "coverage", "diversity"]
SUBSETS = [list(c) for n in (1, 2, 3) for c in itertools.combinations(PRINCIPLES, n)]  # the paper's 7


def _normalize(values, how):
    if how == "minmax":
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]
    mean = sum(values) / len(values)
    return [v / mean if mean != 0 else 0.0 for v in values]


def naive_tops(F, r, k, alpha=0.5, lam=0.5, principles=PRINCIPLES, normalize="minmax"):
    """Literal O(K·N²) greedy of the spec, one token at a time, in Python, on the similarity matrix ``F``.

    Coverage sums are exact integer sums on F rounded to the fixed-point grid prunekit documents, so that exact
    ties are ties here too; everything else is float64 arithmetic in the spec's order."""
    N = F.shape[0]
    bits = fixed_point_bits(N)
    F = F.double().tolist()
    Fq = [[round(x * 2**bits) for x in row] for row in F]
    use_r, use_d, use_c = ("relevance" in principles), ("diversity" in principles), ("coverage" in principles)
    S, m, mq = [], None, None
    if use_r:
        rr = r.double().tolist()
        S.append(max(range(N), key=lambda i: (rr[i], -i)))
        m = [F[j][S[0]] for j in range(N)]
        mq = [Fq[j][S[0]] for j in range(N)]
    while len(S) < k:
        cand = [i for i in range(N) if i not in S]
        terms = []
        if use_r:
            terms.append((1.0, [rr[i] for i in cand]))
        if use_d:
            terms.append((alpha, [1.0 if m is None else 1.0 - m[i] for i in cand]))
        if use_c:
            base = [0] * N if mq is None else mq
            cov = [sum(max(0, Fq[i][j] - base[j]) for j in range(N) if j not in S) for i in cand]
            terms.append((lam, [float(c) / 2**bits for c in cov]))
        scores = [0.0] * len(cand)
        for w, vals in terms:
            for t, v in enumerate(_normalize(vals, normalize)):
                scores[t] += w * v
        best = max(range(len(cand)), key=lambda t: (scores[t], -t))
        pick = cand[best]
        S.append(pick)
        if m is None:
            m, mq = [F[j][pick] for j in range(N)], [Fq[j][pick] for j in range(N)]
        else:
            m = [max(m[j], F[j][pick]) for j in range(N)]
            mq = [max(mq[j], Fq[j][pick]) for j in range(N)]
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
    F = SelectionInput(H).similarity
    for b in range(2):
        assert got[b].tolist() == naive_tops(F[b], r[b], k, 0.7, 0.3, principles, normalize)


@pytest.mark.parametrize("seed", range(6))
def test_tops_equals_naive_float32(seed):
    H, r = _data(100 + seed, dtype=torch.float32, N=48)
    got = prunekit.select("tops", H, r, k=16)
    F = SelectionInput(H).similarity
    for b in range(2):
        assert got[b].tolist() == naive_tops(F[b], r[b], 16)


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


def test_every_selector_is_registered_with_a_name():
    """Each selector a plugin registers (its ``prunekit_register_selectors`` hook, called here directly) is a
    Selector found under its ``name`` as that very class: none dropped, renamed or swapped by the registry."""
    from importlib.metadata import entry_points

    declared = {}
    for ep in entry_points(group="prunekit"):
        hook = getattr(ep.load(), "prunekit_register_selectors", None)
        if hook is not None:
            hook(register=lambda cls: declared.setdefault(cls.name, cls))
    assert {"greedy", "dpp"} <= set(declared)
    assert registry.names("selectors") == prunekit.list_selectors() == sorted(declared)
    for name, cls in declared.items():
        assert issubclass(cls, Selector) and registry.get("selectors", name) is cls, name


# --- the incremental coverage against the from-scratch reference ------------------------------------------------
def _select(H, r, k, coverage_scorer, max_similarity_bytes=None, device="cpu", **fields):
    from prunekit_plugins.methods.tops import TopsSelection

    selector = TopsSelection(coverage_scorer=coverage_scorer, **fields).selector()
    inputs = SelectionInput(H.to(device), None if r is None else r.to(device),
                            max_similarity_bytes=max_similarity_bytes)
    return selector.select(inputs, k).cpu()


CASES = [  # (seed, B, N, D, k): large k exhausts coverage, where exact ties between gains are common
    (0, 1, 64, 8, 63), (1, 3, 97, 16, 48), (2, 2, 200, 64, 150), (3, 4, 50, 4, 25), (4, 1, 300, 256, 120),
    (5, 2, 128, 32, 127), (6, 3, 61, 3, 40), (7, 1, 576, 128, 256),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("principles", [["coverage"], ["relevance", "coverage"], PRINCIPLES],
                         ids=["C", "R+C", "R+D+C"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[1]}N{c[2]}D{c[3]}k{c[4]}")
def test_incremental_coverage_equals_recomputed(case, principles, dtype):
    """Exact: the same selection as recomputing every gain every step, batched, ties included."""
    seed, B, N, D, k = case
    H, r = _data(seed, B=B, N=N, D=D, dtype=dtype, ties=seed % 2 == 0)
    fast = _select(H, r, k, "facility_location", principles=principles)
    naive = _select(H, r, k, "facility_location_naive", principles=principles)
    assert torch.equal(fast, naive)


@pytest.mark.parametrize("normalize", ["minmax", "mean"])
@pytest.mark.parametrize("seed", range(3))
def test_incremental_coverage_equals_recomputed_with_mean_normalisation(normalize, seed):
    H, r = _data(seed, B=2, N=120, D=12, dtype=torch.float32, ties=True)
    fields = {"normalize": normalize, "diversity_weight": 0.3, "coverage_weight": 1.0}
    assert torch.equal(_select(H, r, 90, "facility_location", **fields),
                       _select(H, r, 90, "facility_location_naive", **fields))


def test_incremental_gains_equal_recomputed_gains_every_step():
    H, _ = _data(11, B=3, N=80, D=6, dtype=torch.float32, ties=True)
    inputs = SelectionInput(H)
    fast = registry.get("scorers", "facility_location")().start(inputs)
    naive = registry.get("scorers", "facility_location_naive")().start(inputs)
    order = torch.stack([torch.randperm(80, generator=torch.Generator().manual_seed(b)) for b in range(3)])
    for step in range(79):
        assert torch.equal(fast.gains(), naive.gains()), step
        fast.update(order[:, step])
        naive.update(order[:, step])


def test_exact_ties_are_ties():
    """Two tokens that only cover each other have equal gains in real arithmetic: equal here, lowest index wins."""
    H = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]], dtype=torch.float64)
    run = registry.get("scorers", "facility_location")().start(SelectionInput(H))
    run.update(torch.tensor([0]))
    run.update(torch.tensor([1]))
    gains = run.gains()
    assert gains[0, 2] == gains[0, 3]


@pytest.mark.parametrize("principles", [["coverage"], PRINCIPLES], ids=["C", "R+D+C"])
def test_streamed_similarity_rows_select_the_same(principles):
    """Rows computed on demand (no held N×N matrix) give the held-matrix selection (exactly: F is exact)."""
    H, r = _data(21, B=2, N=150, D=48)
    held = _select(H, r, 40, "facility_location", principles=principles)
    assert SelectionInput(H, max_similarity_bytes=0).streamed
    assert torch.equal(_select(H, r, 40, "facility_location", max_similarity_bytes=0, principles=principles), held)
    assert torch.equal(_select(H, r, 40, "facility_location_naive", max_similarity_bytes=0,
                               principles=principles), held)


def test_max_similarity_bytes_is_checked():
    with pytest.raises(ValueError, match="max_similarity_bytes"):
        SelectionInput(torch.randn(1, 4, 3), max_similarity_bytes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_incremental_coverage_on_cuda_equals_cpu(dtype):
    """The same tokens on CUDA as on the CPU, token for token (exact ties included), and the same as the
    recomputed reference on CUDA."""
    H, r = _data(5, B=4, N=500, D=64, dtype=dtype, ties=True)
    cpu = _select(H, r, 200, "facility_location")
    assert cpu.shape == (4, 200)
    cuda = _select(H, r, 200, "facility_location", device="cuda")
    assert torch.equal(cuda, cpu), f"{int((cuda != cpu).sum())} of {cpu.numel()} kept indices differ"
    assert torch.equal(_select(H, r, 200, "facility_location_naive", device="cuda"), cpu)


def test_tops_max_similarity_mib_streams_rows():
    H, r = _data(22, B=2, N=150, D=48)
    held = prunekit.select("tops", H, r, k=30)
    assert torch.equal(prunekit.select("tops", H, r, k=30, max_similarity_mib=0), held)
    with pytest.raises(ValidationError, match="max_similarity_mib"):
        prunekit.select("tops", H, r, k=30, max_similarity_mib=-1)


def _peak_torch_bytes(fn):
    """``(peak, result)``: the most bytes torch's CPU allocator held at once during ``fn()``, above what it held before
    (``prunekit.tools.bench.peak_memory_mib``: the profiler's timeline of every tensor allocation and free)."""
    from prunekit.tools.bench import peak_memory_mib

    out = []
    peak = peak_memory_mib(lambda: out.append(fn()), torch.device("cpu"))
    return peak * 2**20, out[0]


def test_max_similarity_mib_caps_the_peak_memory():
    """With ``max_similarity_mib`` = M, a selection's peak memory stays under M MiB plus ``(24·D + 1024)·N`` bytes per
    sample (docs/methods/tops.md), and the selection is the one without a cap, token for token."""
    B, N, D, k = 1, 3000, 8, 8
    H, r = _data(30, B=B, N=N, D=D, dtype=torch.float32, ties=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory does not depend on it; time does, on a busy machine (hundreds of small blocks)
    try:
        held_peak, held = _peak_torch_bytes(lambda: prunekit.select("tops", H, r, k=k))
        assert held_peak >= B * N * N * 4  # the instrument sees the held similarity matrix (and its integer copy)
        working_set = B * N * (24 * D + 1024)
        for mib in (0, 1, 4, 16, 64):  # 64 MiB holds the float matrix (34 MiB) but not its int64 copy as well
            peak, kept = _peak_torch_bytes(lambda: prunekit.select("tops", H, r, k=k, max_similarity_mib=mib))
            assert peak <= mib * 2**20 + working_set, f"cap {mib} MiB: peak {peak / 2**20:.2f} MiB"
            assert torch.equal(kept, held)
    finally:
        torch.set_num_threads(threads)
