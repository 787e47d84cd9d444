"""Greedy selection on a GPU: the Triton kernels against the tensor reference (docs/performance.md).

    python benchmarks/gpu_selection.py --out results/        # on a CUDA machine with Triton
    python benchmarks/gpu_selection.py --smoke --device cpu  # a seconds-long run of every part on CPU

For TOPS, DivPrune and SCOPE (their selectors' kernels, ``prunekit.kernels``), on clustered random features
(``prunekit.tools.bench.clustered_features``):

1. **exactness**: the kept indices on the GPU (Triton kernels) equal those of the same selection on CPU (the
   reference), for several sizes, batches and seeds, with exact duplicate tokens in the batch;
2. **host syncs per step**: ``torch.cuda.set_sync_debug_mode("warn")`` warnings of ``k = K2`` minus ``k = K1``,
   divided by the extra steps;
3. **kernels per step**: CUDA kernels (and memsets/copies) the profiler records, same difference, and the device
   time per step of the eight costliest (N = 576 at batch 1 and 8, and N = 10,816 at batch 1);
4. **CUDA graph**: the greedy selector's replay (``prunekit.kernels.GraphCache``): first call, recording call,
   replay time, and every call's indices against the CPU reference;
5. **time**: median wall time of ``prunekit.select`` with the Triton kernels run eagerly
   (``PRUNEKIT_CUDA_GRAPHS=0``), replayed from a CUDA graph (steady state), and with ``PRUNEKIT_KERNELS=reference``
   (the same selection as tensor operations), per size and batch; the first two with the default path, with the
   step loop (``PRUNEKIT_FUSED_SELECTION=0``: a pick and the scorers' updates launched per step), and up to 4,096
   tokens with each fused path forced: the whole-selection kernel (``run``: every step after the first in one
   launch, one program per sample) and the wide steps (``wide``: three launches per step over many programs), to
   place the limits between them (``greedy.RUN_MAX_TOKENS``, ``RUN_MAX_COVERAGE_TOKENS``).

6. **tune** (asked for by name): TOPS's steady-state time for each launch configuration of the two fused paths
   (``RUN_CONFIGS``, ``WIDE_CONFIGS``: warps, changed rows summed at once, tokens per program), with each one's
   indices against the defaults', at the sizes of part 5 up to 4,096 tokens: where the defaults come from.

Parts 2 and 3 run with the step loop and with the whole-selection kernel.

Writes ``gpu_selection.json`` into ``--out`` and prints each result as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

import prunekit
from prunekit.tools.bench import clustered_features
from prunekit.tools.measure import _sync, _timed as _call_ms

METHODS = ("tops", "divprune", "scope")


def _select(method, feats, rel, k, reference=False, **kw):
    os.environ["PRUNEKIT_KERNELS"] = "reference" if reference else ""
    try:
        return prunekit.select(method, feats, rel, k=k, **kw)
    finally:
        os.environ["PRUNEKIT_KERNELS"] = ""


def _timed(fn, device, repeats):
    fn()  # warm-up (and Triton's compilation)
    return statistics.median(_call_ms(fn, device) for _ in range(repeats))


def _features(n, dim, batch, seed, device):
    feats, rel = clustered_features(n, dim, batch=batch, seed=seed)
    if batch > 1:  # an exact duplicate of the first sample, and duplicate tokens inside it
        feats[-1] = feats[0]
        rel[-1] = rel[0]
        feats[0, 1::7] = feats[0, 0]
    return feats.to(device), rel.to(device)


def exactness(device, cases, dim, cpu_up_to=2880 * 1024):
    """Against the reference on CPU up to ``cpu_up_to`` N·K·B (the CPU's time), above against the reference's
    tensor operations on the same GPU (exact too: min, max, IEEE arithmetic and integer sums)."""
    rows = []
    for method in METHODS:
        for n, k, batch, seed in cases:
            feats, rel = _features(n, dim, batch, seed, device)
            on_cpu = n * k * batch <= cpu_up_to
            if on_cpu:
                want = _select(method, feats.cpu(), rel.cpu(), k, reference=True)
            else:
                want = _select(method, feats, rel, k, reference=True).cpu()
            # the default path, and each fused path forced where both can run
            for path in ("default", "wide", "run") if n <= 4096 else ("default",):
                _fused(True if path == "default" else path)
                got = _select(method, feats, rel, k).cpu()
                _fused(True)
                rows.append({"method": method, "n": n, "k": k, "batch": batch, "seed": seed, "path": path,
                             "reference": "cpu" if on_cpu else "gpu tensor ops",
                             "equal": bool(torch.equal(got, want))})
                print(f"exact {rows[-1]}", flush=True)
    return rows


def per_step(device, n, k1, k2, dim, batch):
    """Host syncs and device kernels per greedy step (k2 minus k1 steps)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    feats, rel = _features(n, dim, batch, 0, device)
    for method, reference, fused in [(m, r, f) for m in METHODS for r in (False, True) for f in (True, False)]:
        if reference and not fused:
            continue  # the reference runs the step loop either way
        _fused(fused)
        counts = {}
        for k in (k1, k2):
            _select(method, feats, rel, k, reference)  # warm-up
            _sync(device)
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _select(method, feats, rel, k, reference)
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _select(method, feats, rel, k, reference)
                _sync(device)
            device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy: dict[str, float] = {}
            for e in device_events:  # device time by kernel name (µs)
                busy[e.name] = busy.get(e.name, 0.0) + e.device_time_total
            counts[k] = (syncs, len(device_events), busy)
        steps = k2 - k1
        _fused(True)
        kernels = "reference" if reference else "triton" if fused else "triton, step loop"
        row = {"method": method, "kernels": kernels, "n": n, "batch": batch,
               "syncs_per_step": (counts[k2][0] - counts[k1][0]) / steps,
               "device_kernels_per_step": (counts[k2][1] - counts[k1][1]) / steps,
               "syncs_total": counts[k2][0],
               # where a step's device time goes: µs per step by kernel (names truncated), largest first
               "device_us_per_step": dict(sorted(
                   ((name[:60], round((counts[k2][2].get(name, 0.0) - counts[k1][2].get(name, 0.0)) / steps, 2))
                    for name in set(counts[k2][2]) | set(counts[k1][2])), key=lambda kv: -kv[1])[:8])}
        out.append(row)
        print(f"per step {row}", flush=True)
    return out


def _fused(on: bool | str) -> None:
    """``True``: the default (one program per sample up to ``greedy.RUN_MAX_TOKENS`` tokens, or
    ``RUN_MAX_COVERAGE_TOKENS`` with a coverage term, the wide steps above), ``False``: the step loop, ``"wide"``:
    the wide steps at any size, ``"run"``: one program per sample up to ``RUN_MAX_TOKENS`` whatever the terms."""
    os.environ["PRUNEKIT_FUSED_SELECTION"] = on if isinstance(on, str) else "1" if on else "0"


def _graphs(on: bool) -> None:
    os.environ["PRUNEKIT_CUDA_GRAPHS"] = "1" if on else "0"


def _clear_graphs():
    from prunekit_plugins.selectors.greedy import GRAPHS

    GRAPHS.clear()


def _once(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) * 1000


def graph(device, n, k, dim, batch=1):
    """The selector's CUDA-graph replay (GraphCache): the first call runs as is, the second records, later calls
    replay; every call's indices against the CPU reference."""
    feats, rel = _features(n, dim, batch, 3, device)
    want = _select("tops", feats.cpu(), rel.cpu(), k, reference=True)
    _clear_graphs()
    _graphs(True)
    calls = [_once(lambda: _select("tops", feats, rel, k), device) for _ in range(4)]
    replay = _timed(lambda: _select("tops", feats, rel, k), device, 10)
    _graphs(False)
    eager = _timed(lambda: _select("tops", feats, rel, k), device, 5)
    _graphs(True)
    row = {"n": n, "k": k, "batch": batch, "equal": all(torch.equal(o.cpu(), want) for o, _ in calls),
           "first_ms": calls[0][1], "record_ms": calls[1][1], "replay_ms": replay, "eager_ms": eager}
    print(f"graph {row}", flush=True)
    return row


def timing(device, sizes, batches, dim, repeats, reference_up_to_steps):
    """Per method and size: eager (no graph), the steady state with graph replay (median after the first and the
    recording call), and the tensor reference once."""
    rows = []
    for n, k in sizes:
        for batch in batches:
            if n > 4096 and batch > 1:
                continue  # video size: batch 1 (a batch of 8 streams its similarity rows above 2 GiB)
            feats, rel = _features(n, dim, batch, 0, device)
            for method in METHODS:
                # TOPS holds the matrices of a batch of video-size samples on a large GPU (the others stream them)
                cap = {"max_similarity_mib": 16384} if device.type == "cuda" and method == "tops" else {}
                run = lambda: _select(method, feats, rel, k, **cap)  # noqa: E731
                times = {}
                # both fused paths where each can run: where the limits between them belong
                modes = (True, False, "wide", "run") if n <= 4096 else (True, False)
                for fused in modes:
                    _fused(fused)
                    _graphs(False)
                    eager = _timed(run, device, repeats)
                    _graphs(True)
                    _clear_graphs()
                    run(), run()  # the first call, then the recording
                    times[fused] = (eager, _timed(run, device, repeats))
                    _clear_graphs()
                _fused(True)
                (eager, steady), (loop_eager, loop_steady) = times[True], times[False]
                ref = None
                if k <= reference_up_to_steps:
                    ref = _timed(lambda: _select(method, feats, rel, k, reference=True, **cap), device, 1)
                rows.append({"method": method, "n": n, "k": k, "batch": batch, "eager_ms": eager,
                             "replay_ms": steady, "loop_eager_ms": loop_eager, "loop_replay_ms": loop_steady,
                             "wide_eager_ms": times.get("wide", (None, None))[0],
                             "wide_replay_ms": times.get("wide", (None, None))[1],
                             "run_eager_ms": times.get("run", (None, None))[0],
                             "run_replay_ms": times.get("run", (None, None))[1], "reference_ms": ref})
                print(f"time {rows[-1]}", flush=True)
    return rows


#: what ``tune`` tries: the one-program kernel's warps and changed rows summed at once (per power-of-two block of
#: tokens), and the wide steps' tokens per program, changed rows at once and warps of their coverage kernel
RUN_CONFIGS = {1024: [(4, 8), (4, 4), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)],
               4096: [(32, 2), (16, 4), (32, 4), (32, 8), (32, 16)]}
WIDE_CONFIGS = [(128, 16, 8), (64, 16, 8), (32, 16, 4), (64, 32, 8), (256, 16, 8)]


#: the library's launch settings, kept at the first change (restored by ``_configured()``)
_DEFAULTS: list = []


def _configured(run=None, wide=None, block=None):
    """Set the Triton launchers' tuning (``run``: (warps, rows) at ``block`` tokens; ``wide``: (cols, rows, warps)
    at every size), or restore the library's own (None)."""
    from prunekit_plugins.selectors import _greedy_triton as g

    if not _DEFAULTS:
        _DEFAULTS.extend([dict(g.RUN_LAUNCH), g.WIDE_LAUNCH])
    g.RUN_LAUNCH, g.WIDE_LAUNCH = dict(_DEFAULTS[0]), _DEFAULTS[1]
    if run is not None:
        g.RUN_LAUNCH[block] = tuple(run)
    if wide is not None:
        g.WIDE_LAUNCH = ((None, tuple(wide)),)


def tune(device, sizes, batches, dim, repeats):
    """TOPS's selection time (steady state: replayed from a CUDA graph) for each configuration of the one-program
    kernel and of the wide steps, and whether its indices equal those of the library's defaults."""
    import triton

    rows = []
    for n, k in sizes:
        block = triton.next_power_of_2(n)
        for batch in batches:
            feats, rel = _features(n, dim, batch, 0, device)
            run = lambda: _select("tops", feats, rel, k)  # noqa: E731
            _configured()
            _fused(True)
            want = run().cpu()
            tries = [("run", c) for c in RUN_CONFIGS.get(block, [])] + [("wide", c) for c in WIDE_CONFIGS]
            for path, config in tries:
                _fused(path)  # "run" or "wide" at any size either can take
                _configured(**{path: config}, block=block)
                _graphs(True)
                _clear_graphs()
                try:
                    equal = bool(torch.equal(run().cpu(), want))
                    run()  # the recording
                    ms = _timed(run, device, repeats)
                except Exception as err:  # e.g. more shared memory than the GPU has
                    equal, ms = None, f"{type(err).__name__}: {str(err)[:200]}"
                _clear_graphs()
                rows.append({"n": n, "k": k, "batch": batch, "path": path, "config": list(config),
                             "replay_ms": ms, "equal": equal})
                print(f"tune {rows[-1]}", flush=True)
            _configured()
            _fused(True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a run on CPU")
    p.add_argument("--quick", action="store_true", help="N <= 2,880 only (a first check on a GPU)")
    p.add_argument("--parts", nargs="+", default=["exact", "steps", "graph", "time"])
    args = p.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        cases = [(48, 12, 1, 0), (48, 12, 3, 1)]
        sizes, batches, dim, repeats = [(64, 16)], [1, 2], 16, 1
    elif args.quick:
        cases = [(576, 128, 1, 0), (576, 128, 8, 1), (2880, 256, 1, 0), (2880, 256, 8, 1)]
        sizes, batches, dim, repeats = [(576, 128), (2880, 256)], [1, 8], args.dim, 3
    else:
        cases = [(n, k, b, s) for n, k in ((576, 128), (2880, 256)) for b in (1, 8) for s in (0, 1)]
        cases += [(10816, 4096, 1, 0)]
        sizes, batches, dim, repeats = [(576, 128), (2880, 256), (10816, 4096)], [1, 8], args.dim, 3
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dim": dim}
    parts = {
        "exact": lambda: exactness(device, cases, dim),
        "steps": lambda: (per_step(device, 576, 8, 40, dim, 1) + per_step(device, 576, 8, 40, dim, 8)
                          + ([] if args.smoke or args.quick else per_step(device, 10816, 8, 40, dim, 1))),
        "graph": lambda: [graph(device, 576, 128, dim), graph(device, 2880, 256, dim, 8)],
        "time": lambda: timing(device, sizes, batches, dim, repeats, reference_up_to_steps=4096),
        "tune": lambda: tune(device, [s for s in sizes if s[0] <= 4096], batches, dim, max(repeats, 10)),
    }
    for name in args.parts:
        if device.type != "cuda" and name in ("steps", "graph", "tune"):
            continue
        try:
            result[name] = parts[name]()
        except Exception as err:  # keep the other parts' results
            traceback.print_exc()
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_selection.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
