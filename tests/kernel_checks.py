"""The Triton kernels of selection against their tensor references, in Triton's interpreter on CPU.

Run by tests/test_kernels.py in a subprocess with ``TRITON_INTERPRET=1`` (set before Triton is imported; in the
test session itself it would send every CPU selection through the interpreter). Prints one JSON object:
check name -> "ok" or the failure. ``PRUNEKIT_KERNELS=reference`` switches a call to the reference.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

import prunekit
from prunekit.plugin import SelectionInput, registry
from prunekit_plugins.scorers import facility_location as fl
from prunekit_plugins.selectors import greedy

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"


def _reference(on: bool) -> None:
    os.environ["PRUNEKIT_KERNELS"] = "reference" if on else ""


def _both(fn):
    """fn() with the reference and with the Triton kernels."""
    _reference(True)
    try:
        want = fn()
    finally:
        _reference(False)
    return want, fn()


def _assert_equal(want, got, what):
    for a, b in zip(want, got):
        assert torch.equal(a, b), f"{what}: reference {a} != triton {b}"


def check_pick_kernel():
    """Scores with ties, constant terms, NaN and infinities; chosen tokens; minmax and none; one and several rows."""
    assert greedy.PICK.uses_triton(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        T, B, N = 1 + trial % 3, 1 + trial % 4, 5 + 7 * trial
        gains = torch.randint(0, 4, (T, B, N), generator=g).to(torch.float64) / 3  # many exact ties
        if trial % 2:
            gains += torch.rand(T, B, N, generator=g, dtype=torch.float64)
        if trial % 3 == 2:
            gains[0, :, 1] = float("nan")
            gains[-1, :, 2] = float("inf")
            gains[-1, :, 3] = float("-inf")
        if trial % 4 == 3:
            gains[0] = 0.5  # a constant term: span 0
        weights = tuple(float(w) for w in torch.rand(T, generator=g, dtype=torch.float64) * 3)
        chosen = torch.rand(B, N, generator=g) < 0.3
        chosen[:, 0] = False  # at least one candidate
        binary = tuple(float(w > 1) for w in weights)  # the product's exponents the kernel covers: 0 and 1
        for normalize, combine, w in (("minmax", "sum", weights), ("none", "sum", weights),
                                      ("none", "product", binary), ("minmax", "product", binary)):
            def run():
                penalty = torch.zeros(B, N, dtype=torch.float64).masked_fill(chosen, float("inf"))
                picks = torch.full((B, 4), -1, dtype=torch.long)
                out = greedy.PICK(torch.device("cpu"), gains - 0.4 * (combine == "product"), w,
                                  torch.tensor(w, dtype=torch.float64), penalty, picks, 2, normalize, combine).clone()
                return out, penalty, picks

            want, got = _both(run)
            _assert_equal(want, got, f"trial {trial} {normalize} {combine}")


def _coverage_steps(features, picks_per_step, floor, cap):
    """Drive a coverage run through fixed picks; the gains (int and float) and m after every step."""
    inputs = SelectionInput(features, max_similarity_bytes=cap)
    run = fl.FacilityLocationCoverage(floor).start(inputs)
    B, N = features.shape[:2]
    out = torch.empty(B, N, dtype=torch.float64)
    seen = []
    for picked in picks_per_step:
        run.gains_into(out)
        run.update(picked)
        run.gains_into(out)
        seen += [out.clone(), run.gain.clone(), run.best.clone(), run.chosen.clone()]
    return seen


def check_coverage_kernels():
    """Held integer matrix and float matrix put on the grid as read; floors; duplicates; several rows."""
    g = torch.Generator().manual_seed(1)
    for B, N, floor in ((1, 40, None), (3, 33, 0.0), (2, 70, None)):
        features = torch.randn(B, N, 8, generator=g)
        features[0, 1::5] = features[0, 0]  # exact duplicates: equal similarities
        order = torch.stack([torch.randperm(N, generator=g)[:12] for _ in range(B)], 1)  # [12, B]
        picks = [order[i] for i in range(12)]
        nbytes = B * N * N * 4
        for cap, held in ((1 << 30, "int64 matrix"), (nbytes, "float matrix")):
            want, got = _both(lambda: _coverage_steps(features, picks, floor, cap))
            _assert_equal(want, got, f"B={B} N={N} floor={floor} {held}")
        inputs = SelectionInput(features, max_similarity_bytes=nbytes)
        run = fl.FacilityLocationCoverage(floor).start(inputs)
        assert run.fixed.matrix is None and not inputs.streamed  # the float case above read F on the grid


def check_greedy_methods():
    """Every registered method whose selection runs the greedy selector: the same indices both ways."""
    g = torch.Generator().manual_seed(2)
    for name in ("tops", "divprune", "scope"):
        assert registry.get("methods", name) is not None
        for B, N, k in ((1, 50, 17), (3, 41, 9)):
            feats = torch.randn(B, N, 16, generator=g)
            if B > 1:
                feats[1] = feats[0]
                feats[2, 1::2] = feats[2, 0::2][: (N // 2)]
            rel = torch.rand(B, N, generator=g)
            want, got = _both(lambda: (prunekit.select(name, feats, rel, k=k),))
            _assert_equal(want, got, f"{name} B={B} N={N} k={k}")


def _selector(terms, seed=None, normalize="minmax", combine="sum"):
    """A greedy selector over registered scorers: ``terms`` (name, weight) or (name, weight, options)."""
    scorer = lambda name, options=None: registry.get("scorers", name)(**(options or {}))  # noqa: E731
    return greedy.GreedySelector([(scorer(n, *o), w) for n, w, *o in terms], normalize=normalize, combine=combine,
                                 seed=None if seed is None else scorer(seed))


def _check_fused(launch: str, steps_per_launch: bool, which=range(7), sizes=((1, 45, 20), (3, 37, 12), (2, 40, 39))):
    """A fused path (greedy.RUN or greedy.WIDE_STEP) against the step loop over term combinations (``which`` of the
    seven below) and inputs."""
    from prunekit.kernels import observe_launches

    g = torch.Generator().manual_seed(3)
    setups = [
        ([("relevance", 1.0), ("facility_location", 1.0), ("diversity", 1.0)], "relevance", "minmax"),
        ([("diversity", 0.7), ("relevance", 0.0), ("facility_location", 2.5)], "relevance", "minmax"),
        ([("diversity", 1.0)], "isolation", "minmax"),
        ([("facility_location", 1.0), ("isolation", 0.5)], None, "none"),
        ([("relevance", 0.2), ("diversity", 0.3), ("facility_location", 0.4), ("isolation", 0.1)], None, "minmax"),
        # SCOPE's product (coverage from a floor of 0, saliency), unnormalised; and a term switched off by w = 0
        ([("facility_location", 1.0, {"floor": 0.0}), ("relevance", 1.0)], None, "none", "product"),
        ([("diversity", 1.0), ("relevance", 0.0), ("facility_location", 1)], "relevance", "minmax", "product"),
    ]
    for trial, (terms, seed, normalize, *combine) in enumerate(setups):
        if trial not in which:
            continue
        for B, N, k in sizes:
            feats = torch.randn(B, N, 6, generator=g)
            feats[0, 1::4] = feats[0, 0]  # exact duplicates: ties in every term
            rel = torch.rand(B, N, generator=g)
            if trial == 1:
                rel[0, 2], rel[-1, 3], rel[-1, 4] = float("nan"), float("inf"), float("-inf")
            # the int64 grid held, or the float matrix put on the grid as read; float64 features for TOPS's terms
            runs = [(1 << 30, torch.float32), (B * N * N * 4, torch.float32)]
            runs += [(1 << 30, torch.float64), (B * N * N * 8, torch.float64)] if trial == 0 else []
            for cap, dtype in runs:
                def select():
                    launched = []
                    with observe_launches(launched.append):
                        selector = _selector(terms, seed, normalize, *combine)
                        picks = selector.select(SelectionInput(feats.to(dtype), rel.to(dtype), None, cap), k)
                    return picks, launched

                (want, _), (got, launched) = _both(select)
                assert launched.count(launch) == (k - 1 if steps_per_launch else 1), launched
                _assert_equal((want,), (got,), f"{terms} seed={seed} {normalize} B={B} N={N} k={k} cap={cap} {dtype}")


def check_greedy_wide():
    """The wide steps (greedy.WIDE_STEP, several programs per sample) against the step loop: TOPS's terms, a single
    nearest term, coverage with a constant term unnormalised, and SCOPE's product (the others combine the same
    pieces)."""
    from prunekit_plugins.selectors import _greedy_triton

    os.environ["PRUNEKIT_FUSED_SELECTION"] = "wide"
    launch = _greedy_triton.WIDE_LAUNCH
    # two to three programs per sample at these sizes, and a few changed rows at a time
    _greedy_triton.WIDE_LAUNCH = ((None, (16, 4, 4)),)
    try:
        _check_fused("greedy_wide_step", steps_per_launch=True, which=(0, 2, 3, 5), sizes=((1, 45, 20), (3, 37, 12)))
    finally:
        os.environ["PRUNEKIT_FUSED_SELECTION"] = "1"
        _greedy_triton.WIDE_LAUNCH = launch


def check_greedy_run():
    """The whole-selection kernel (greedy.RUN) against the step loop: every term kind and order, seeded or not,
    minmax and none, held grid and float similarity, exact duplicates, NaN and ±inf relevance, one and several
    rows; and it is the kernel that ran."""
    if SMALL:  # the tiles of changed rows are what the small blocks change: TOPS's and SCOPE's terms suffice
        _check_fused("greedy_run", steps_per_launch=False, which=(0, 5), sizes=((1, 45, 20), (3, 37, 12)))
    else:
        _check_fused("greedy_run", steps_per_launch=False)


#: set while the checks run again with small blocks
SMALL = False

CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

def _small_blocks():
    """Chunks of a few tokens, so that every loop of the kernels (and the running argmax across chunks) runs."""
    from prunekit_plugins.scorers import _coverage_triton
    from prunekit_plugins.selectors import _greedy_triton

    _greedy_triton.BLOCK = 4
    _greedy_triton.RUN_TILE = 64  # two to four changed rows at a time
    global SMALL
    SMALL = True
    _coverage_triton.PREPARE_BLOCK, _coverage_triton.DELTA_ROWS, _coverage_triton.DELTA_COLS = 8, 2, 4


if __name__ == "__main__":
    results = {}
    for blocks in ("default", "small"):
        if blocks == "small":
            _small_blocks()
        for name in sys.argv[1:] or CHECKS:
            if blocks == "small" and name in ("greedy_methods", "greedy_wide"):
                continue  # the kernels' own checks cover the chunk loops (greedy_wide sets its own small blocks)
            try:
                CHECKS[name]()
                results.setdefault(name, "ok")
            except Exception:
                results[name] = f"{blocks} blocks: " + traceback.format_exc()
    print(json.dumps(results))
