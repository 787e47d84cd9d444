"""What a greedy selection step costs on a GPU, counted on CPU: its kernel launches and its host reads.

On a GPU each operation of a greedy step is a kernel launch (several µs, whatever its size), and an operation that
reads a value back to the host (``nonzero``, ``.item()``, ``bool(t)``, ``int(t)``) stalls the stream. Both are
counted at the dispatcher with :func:`prunekit.testing.count_ops`, so a step that gains a launch or a host read fails
here, on a machine without a GPU.

What counts, per greedy step:

* **launches**: aten operations that run a kernel. Views (``view``, ``slice``, ``select``, ``expand``,
  ``diagonal``, ...), metadata reads and uninitialised allocations (``empty``) do not count; in-place and
  ``out=`` operations do;
* **operations**: every aten operation dispatched, views included;
* **syncs**: host-synchronising operations (``prunekit.testing.HOST_SYNC_OPS``: value reads, operations whose
  output size depends on values, boolean-mask indexing).

A fused step (:class:`prunekit.kernels.Kernel`: the greedy pick, the coverage update) counts as one launch and no
sync: on a GPU it is one Triton kernel. Its tensor reference, which runs here, is not counted inside; that the two
agree is tests/test_kernels.py's job, and that the Triton kernels read nothing back is checked on a GPU
(benchmarks/gpu_selection.py).

A step's cost is the difference between two selections of the same inputs with different ``k``, divided by the
difference in steps: the setup (input checks, the similarity matrix, the first gains) cancels. Counted for every
registered method whose model-free selection runs a registered selector, through ``prunekit.select``:

* ``one``: one sample;
* ``batch``: three samples of equal size in one call (a selector's batch), one with exact duplicates, so the
  rows' updates touch different numbers of tokens in a step;
* ``mixed``: three samples with different visual counts (96, 80, 96), as a model's stage selects them: samples
  that share a token count and budget are selected together (``StageContext.select_grouped``), so this batch runs
  two selections and a step of the batch costs both.

The ceilings are what the code measured when they were recorded (launches / operations / syncs per step); a
change that makes a step cheaper lowers them. They are counted with the whole-selection kernel switched off
(``PRUNEKIT_FUSED_SELECTION=0``: the step loop, what runs above ``greedy.RUN_MAX_TOKENS`` tokens). With it, the
selections of :data:`FUSED` run every step after the first in one launch (``prunekit::greedy_run``): nothing per
step.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil

import pytest
import torch

import prunekit
from prunekit.plugin import SelectionInput, registry
from prunekit.interfaces import StageContext
from prunekit.testing import count_ops

N, D = 96, 64  # D >= K: the DPP's kernel keeps its rank over every counted step
K1, K2 = 8, 40
MIXED = (96, 80, 96)

#: per greedy step, (launches, operations, syncs) for ``one``, ``batch`` and ``mixed`` (see the module docstring)
CEILINGS = {
    "tops": {"one": (6, 14, 0), "batch": (8, 17, 0), "mixed": (14, 31, 0)},
    "scope": {"one": (3, 5, 0), "batch": (3, 5, 0), "mixed": (6, 10, 0)},
    "divprune": {"one": (4, 10, 0), "batch": (6, 13, 0), "mixed": (10, 23, 0)},
    "cdpruner": {"one": (22, 39, 0), "batch": (22, 39, 0), "mixed": (44, 78, 0)},
}

#: methods whose steps after the first run in one launch of the greedy selector's whole-selection kernel
FUSED = ("divprune", "scope", "tops")


@pytest.fixture
def step_loop(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_FUSED_SELECTION", "0")


def _reads_query(name: str) -> bool:
    return "query" in inspect.signature(registry.get("methods", name).select).parameters


def _select(name: str, features, relevance, query, k: int):
    return prunekit.select(name, features, relevance, k=k, **({"query": query} if _reads_query(name) else {}))


@contextlib.contextmanager
def selectors_wrapped(wrap):
    """Every registered selector's ``select`` replaced by ``wrap(original)`` inside the block."""
    patched = []
    for sel in prunekit.list_selectors():
        cls = registry.get("selectors", sel)
        patched.append((cls, vars(cls).get("select")))
        cls.select = wrap(cls.select)
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                del cls.select
            else:
                cls.select = own


def _methods_with_selectors() -> list[str]:
    """The registered methods whose model-free selection calls a registered selector's ``select``."""
    used: list[str] = []

    def spy(original):
        def select(self, inputs, k):
            used.append("yes")
            return original(self, inputs, k)
        return select

    found = []
    with selectors_wrapped(spy):
        g = torch.Generator().manual_seed(0)
        # 36 tokens: a square grid, for the methods that pool one
        H, r, q = torch.randn(1, 36, 8, generator=g), torch.rand(1, 36, generator=g), torch.randn(1, 3, 8, generator=g)
        for name in prunekit.list_methods():
            if registry.get("methods", name).SelectionConfig is None:
                continue  # needs a model to select
            used.clear()
            _select(name, H, r, q, 9)
            if used:
                found.append(name)
    return found


GREEDY = _methods_with_selectors()


def _inputs(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, D, generator=g) for n in counts]
    if len(feats) > 1:
        feats[1][::2] = feats[1][1::2]  # exact duplicates in one sample: ties, and a different update per step
    rel = [torch.rand(n, generator=g) for n in counts]
    query = [torch.randn(5, D, generator=g) for _ in counts]
    return feats, rel, query


def _run(name: str, case: str, steps: int):
    if case != "mixed":
        feats, rel, query = _inputs((N,) if case == "one" else (N, N, N))
        return lambda: _select(name, torch.stack(feats), torch.stack(rel), torch.stack(query), steps)
    feats, rel, query = _inputs(MIXED)
    method = registry.get("methods", name)
    config = method.SelectionConfig()
    ctx = StageContext(None, feats, [steps] * len(feats), signal=None)  # type: ignore[arg-type]
    return lambda: ctx.select_grouped(rel, lambda inputs, k: method.batch_rule(inputs, k, config),
                                      query=query if _reads_query(name) else None)


def per_step(name: str, case: str) -> tuple[float, float, float]:
    """(launches, operations, syncs) per greedy step of ``name``'s selection in ``case``."""
    a, b = (count_ops(_run(name, case, k))[1] for k in (K1, K2))
    steps = K2 - K1
    return ((b.launches - a.launches) / steps, (b.operations - a.operations) / steps, (b.syncs - a.syncs) / steps)


def test_every_greedy_method_has_ceilings():
    assert GREEDY, "no registered method's selection runs a selector"
    assert sorted(GREEDY) == sorted(CEILINGS), "record the per-step ceilings of every greedy/DPP method in CEILINGS"


@pytest.mark.parametrize("case", ["one", "batch", "mixed"])
@pytest.mark.parametrize("name", GREEDY)
def test_greedy_step_launches_and_host_reads_stay_under_their_ceilings(name, case, step_loop):
    launches, operations, syncs = per_step(name, case)
    ceiling = CEILINGS[name][case]
    got = (launches, operations, syncs)
    assert all(x <= c for x, c in zip(got, ceiling)), f"{name} ({case}): {got} per step, ceiling {ceiling}"


@pytest.mark.parametrize("case", ["one", "batch"])
def test_a_tops_step_is_at_most_twelve_launches_and_reads_nothing_back(case, step_loop):
    """TOPS's per-step target: a GPU runs the K steps of a selection without waiting for the host."""
    launches, _, syncs = per_step("tops", case)
    assert launches <= 12 and syncs == 0, (launches, syncs)


@pytest.mark.parametrize("case", ["one", "batch", "mixed"])
@pytest.mark.parametrize("name", GREEDY)
def test_the_whole_selection_kernel_runs_every_step_after_the_first_in_one_launch(name, case):
    if name not in FUSED:
        assert per_step(name, case) == per_step_without_fusion(name, case)
        return
    assert per_step(name, case) == (0, 0, 0)
    _, count = count_ops(_run(name, case, K2))
    selections = 2 if case == "mixed" else 1
    assert count.by_name.get("prunekit::greedy_run") == selections, count.by_name
    # TOPS and DivPrune pick their first token by a seed, SCOPE by one step of the loop
    assert count.by_name.get("prunekit::greedy_pick", 0) == (selections if name == "scope" else 0), count.by_name


def per_step_without_fusion(name: str, case: str) -> tuple[float, float, float]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_FUSED_SELECTION", "0")
        return per_step(name, case)


def test_dpp_steps_after_the_kernel_rank_is_spent_read_nothing_from_the_host():
    """Past the kernel's rank (D < k) the DPP takes the fallback order; choosing it costs no host read either."""
    g = torch.Generator().manual_seed(1)
    H, r, q = torch.randn(2, N, 4, generator=g), torch.rand(2, N, generator=g), torch.randn(2, 5, 4, generator=g)
    a, b = (count_ops(_select, "cdpruner", H, r, q, k)[1] for k in (K1, K2))
    assert b.syncs == a.syncs, b.sync_names
    assert (b.launches - a.launches) / (K2 - K1) <= CEILINGS["cdpruner"]["batch"][0]


def test_above_the_one_program_limit_a_cpu_runs_the_step_loop(monkeypatch):
    """Above greedy.RUN_MAX_TOKENS the wide steps need Triton; without it the step loop runs, with its counts."""
    from prunekit_plugins.selectors import greedy

    monkeypatch.setattr(greedy, "RUN_MAX_COVERAGE_TOKENS", N - 1)  # TOPS has a coverage term
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, count = count_ops(_run("tops", "one", K1))
    assert "prunekit::greedy_run" not in count.by_name and "prunekit::greedy_wide_step" not in count.by_name
    assert count.by_name.get("prunekit::greedy_pick") == K1 - 1, count.by_name
    monkeypatch.setattr(greedy, "RUN_MAX_COVERAGE_TOKENS", N)
    assert per_step("tops", "one") == (0, 0, 0)


@pytest.mark.parametrize("setting", ["1", "run", "wide"])
def test_the_fused_path_depends_on_the_size_and_on_a_coverage_term(monkeypatch, setting):
    """One program per sample up to RUN_MAX_TOKENS, RUN_MAX_COVERAGE_TOKENS with coverage (where the wide steps
    measured faster on a GPU), the wide steps above where Triton runs, else the step loop."""
    from prunekit.plugin import FusedTerm
    from prunekit_plugins.selectors import greedy

    mode = greedy.GreedySelector._fused_mode
    monkeypatch.setenv("PRUNEKIT_FUSED_SELECTION", setting)
    sim = torch.zeros(1, 4, 4)
    nearest = [FusedTerm("nearest", similarity=sim, best=torch.zeros(1, 4))]
    coverage = [FusedTerm("coverage", similarity=sim, best=torch.zeros(1, 4, dtype=torch.long),
                          chosen=torch.zeros(1, 4, dtype=torch.bool), gain=torch.zeros(1, 4, dtype=torch.long),
                          scale=1.0, out=1)]
    small, middle, large = greedy.RUN_MAX_COVERAGE_TOKENS, greedy.RUN_MAX_COVERAGE_TOKENS + 1, greedy.RUN_MAX_TOKENS + 1
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(greedy.Kernel, "uses_triton", lambda self, device: device.type == "cuda")
    if setting == "wide":
        assert [mode(n, gpu, t) for n in (small, middle, large) for t in (nearest, coverage)] == ["wide"] * 6
        assert mode(small, cpu, coverage) == "run"  # no Triton: the wide steps cannot run
        return
    assert mode(small, gpu, coverage) == mode(small, gpu, nearest) == "run"
    assert mode(middle, gpu, nearest) == "run"
    assert mode(middle, gpu, coverage) == ("run" if setting == "run" else "wide")
    assert mode(middle, cpu, coverage) == ("run" if setting == "run" else None)
    assert mode(large, gpu, nearest) == mode(large, gpu, coverage) == "wide"
    assert mode(large, cpu, nearest) is None


@pytest.mark.parametrize("value", ["2", "yes", "wide-ish"])
def test_a_bad_fused_selection_setting_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("PRUNEKIT_FUSED_SELECTION", value)
    with pytest.raises(ValueError, match="PRUNEKIT_FUSED_SELECTION must be '1'.*'0', 'wide' or 'run'"):
        _run("tops", "one", K1)()


# -- a whole selection traced: torch.compile(fullgraph=True) ---------------------------------------------------------
#: greedy steps of a traced selection (the trace unrolls them: its size, and the time to compile it, grow with k)
K_TRACED = 8


@contextlib.contextmanager
def traced_selections(backend: str):
    """Every selection a registered selector runs inside the block, traced whole by ``torch.compile`` with
    ``fullgraph=True`` (a graph break, a value read back to the host or a shape that depends on values fails it):
    the function a CUDA graph records (``GraphCache``), the inputs' tensors as its inputs. Yields the traced graphs,
    one per selection, each compiled by ``backend``."""
    graphs: list = []

    def counted(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    def traced(original):
        def select(self, inputs, k):
            cap = inputs.max_similarity_bytes
            torch._dynamo.reset()  # each selection traced afresh, whatever was traced before
            whole = torch.compile(lambda f, r, q: original(self, SelectionInput(f, r, q, cap), k),
                                  fullgraph=True, backend=counted)
            return whole(inputs.features, inputs.relevance, inputs.query)
        return select

    with selectors_wrapped(traced):
        yield graphs


@pytest.mark.parametrize("case, path", [("one", "1"), ("batch", "1"), ("batch", "0")])
@pytest.mark.parametrize("name", GREEDY)
def test_a_whole_selection_traces_as_one_graph_with_the_same_indices(name, case, path, monkeypatch):
    """Capturable on a CPU: no host read, no value-dependent shape, no graph break anywhere in the selection
    (its K steps unrolled into one graph), with the whole-selection path (``1``) and the step loop (``0``); the
    traced run keeps the same indices as the eager one."""
    monkeypatch.setenv("PRUNEKIT_FUSED_SELECTION", path)
    run = _run(name, case, K_TRACED)
    expected = run()
    with traced_selections("eager") as graphs:
        got = run()
    assert len(graphs) == 1, f"{name}: {len(graphs)} traced graphs"
    operations = sum(node.op == "call_function" for node in graphs[0].graph.nodes)
    assert operations >= K_TRACED, f"{name}: {operations} operations traced for {K_TRACED} steps"
    assert torch.equal(got, expected)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor compiles C++ on a CPU")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
@pytest.mark.parametrize("name", ["tops", "scope"])
def test_a_selection_compiled_by_inductor_keeps_the_same_indices(name):
    """Compiled (inductor's fused C++ kernels), TOPS's and SCOPE's selections keep the eager indices, exactly: the
    float64 score is the same operations (no contraction into fused multiply-adds), coverage's sums exact
    integers (traced, over every term rather than the changed ones: the same sums)."""
    run = _run(name, "batch", K_TRACED)
    expected = run()
    with traced_selections("inductor") as graphs:
        got = run()
    assert len(graphs) == 1
    assert torch.equal(got, expected)


CAPTURABLE = [name for name in prunekit.list_scorers() if registry.get("scorers", name).capturable]


@pytest.mark.parametrize("name", CAPTURABLE)
def test_every_capturable_scorer_traces_in_a_greedy_selection(name):
    """A scorer that says it is capturable (``Scorer.capturable``: a selection over it may be replayed from a CUDA
    graph) traces whole, alone and beside TOPS's relevance seed, with the same indices as eagerly."""
    feats, rel, query = _inputs((N, N))
    inputs = lambda: SelectionInput(torch.stack(feats), torch.stack(rel), torch.stack(query))  # noqa: E731
    greedy = registry.get("selectors", "greedy")
    scorer = registry.get("scorers", name)
    seed = registry.get("scorers", "relevance")()
    for selector in (greedy([(scorer(), 1.0)]), greedy([(seed, 1.0), (scorer(), 0.5)], seed=seed)):
        expected = selector.select(inputs(), K_TRACED)
        with traced_selections("eager") as graphs:
            got = selector.select(inputs(), K_TRACED)
        assert len(graphs) == 1 and torch.equal(got, expected), name
