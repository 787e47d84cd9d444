"""Where a model-free TOPS selection and a batch-1 prefill spend their time on a GPU (docs/performance.md, "Third H200
run").

    python benchmarks/gpu_diagnose.py --out results/      # on a CUDA machine (about 40 s on an H200)
    python benchmarks/gpu_diagnose.py --smoke --out tmp/  # a seconds-long run of the same steps on CPU

1. **selection**: ``prunekit.select("tops", ...)`` (as ``prunekit bench``'s selection part calls it) eight times in a
   row at N = 576 (feature width 1,024 and 4,096, batch 1 and 8) and N = 2,880: each call's wall time (the first
   runs eagerly, the second records the CUDA graph, later ones replay it), the device time and kernels of one more
   call under the profiler, and the recorded graph's replay alone (wall, and the host's part of it).
2. **prefill**: LLaVA-1.5-7B's shapes at full depth (random weights, bf16), batch 1: unpruned, VisionZip and TOPS
   at T = 64 layer-averaged tokens (``--smoke``: the tiny LLaVA at 8 of its 64), seven prefills' wall times after three, then one prefill under ``cProfile``
   (host time by Python function: the costliest by own time, and prunekit's by cumulative time).

Writes ``diagnose.json`` and ``cprofile_<method>.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit.tools.bench import build_model, clustered_features, model_inputs
from prunekit.tools.measure import _sync, _timed


def _times(fn, device, n):
    """Wall time (ms) of each of ``n`` calls, the device synchronised around each."""
    return [_timed(fn, device) for _ in range(n)]


def _device_time(fn, device):
    """Device time (ms), kernel count and the eight costliest kernels (µs) of one call under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    total, count, names = 0.0, 0, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total += e.device_time
            count += 1
            names[e.name[:50]] = names.get(e.name[:50], 0.0) + e.device_time
    return total / 1000, count, dict(sorted(names.items(), key=lambda kv: -kv[1])[:8])


def selection(device, sizes):
    from prunekit_plugins.selectors import greedy

    rows = []
    for n, k, dim, batch in sizes:
        feats, rel = clustered_features(n, dim, batch=batch, device=device)
        call = lambda: prunekit.select("tops", feats, rel, k=k, coverage_scorer="facility_location",  # noqa: E731
                                       max_similarity_mib=16384)
        calls = _times(call, device, 8)
        gpu_ms, kernels, top = _device_time(call, device)
        replay, host = [], []
        if greedy.GRAPHS._graphs:  # the recorded graph, replayed alone: its wall time and the host's part of it
            graph = list(greedy.GRAPHS._graphs.values())[-1][0]
            replay = _times(graph.replay, device, 5)
            for _ in range(5):
                _sync(device)
                start = time.perf_counter()
                graph.replay()
                host.append((time.perf_counter() - start) * 1000)
                _sync(device)
        row = {"n": n, "k": k, "dim": dim, "batch": batch, "calls_ms": [round(t, 3) for t in calls],
               "device_ms": round(gpu_ms, 3), "kernels": kernels, "top_kernels_us": top,
               "replay_ms": round(statistics.median(replay), 3) if replay else None,
               "replay_host_ms": round(statistics.median(host), 3) if host else None}
        print(f"selection {json.dumps(row)}", flush=True)
        rows.append(row)
        greedy.GRAPHS.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _profile_text(prof: cProfile.Profile) -> str:
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in pstats.Stats(prof).stats.items():
        where = path.split("site-packages/")[-1]
        where = "prunekit" + where.split("prunekit", 1)[1] if "prunekit" in where else where
        rows.append((f"{where}:{line}({name})", calls, own * 1e6, cumulative * 1e6))
    line = lambda r: f"{r[3]:10.0f} {r[2]:10.0f} {r[1]:6d}  {r[0]}"  # noqa: E731
    text = ["cumulative_us own_us calls  function", "# the costliest by own time"]
    text += [line(r) for r in sorted(rows, key=lambda r: -r[2])[:40]]
    text += ["# prunekit's, by cumulative time"]
    text += [line(r) for r in sorted(rows, key=lambda r: -r[3]) if r[0].startswith(("prunekit", "plugins"))][:60]
    return "\n".join(text) + "\n"


def prefill(device, out: Path, smoke: bool, keep: int):
    if smoke:
        model, _ = build_model("tiny", decoder_layers=4)
    else:
        model, _ = build_model("7b", decoder_layers=32, vision_layers=24, dtype=torch.bfloat16, device=device)
    inputs = model_inputs(model, batch=1)

    def run():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    rows = []
    for method in ("unpruned", "visionzip", "tops"):
        if method != "unpruned":
            prunekit.build(method, model, keep_tokens=keep, budget_meaning="layer_average")
        for _ in range(3):
            run()
        walls = _times(run, device, 7)
        prof = cProfile.Profile()
        _sync(device)
        prof.enable()
        run()
        _sync(device)
        prof.disable()
        (out / f"cprofile_{method}.txt").write_text(_profile_text(prof))
        row = {"method": method, "wall_ms": [round(t, 2) for t in walls]}
        if method != "unpruned":  # what the pruned prefills kept (the report of the profiled one)
            report = prunekit.pruning_report(model)
            row.update(visual_tokens=report.visual_tokens, layer_average=report.layer_average)
        rows.append(row)
        print(f"prefill {json.dumps(rows[-1])}", flush=True)
        if method != "unpruned":
            prunekit.remove(model)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 16, 32, 1)] if args.smoke else [(576, 128, 1024, 1), (576, 128, 4096, 1), (576, 128, 4096, 8),
                                                   (2880, 256, 4096, 1)]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "selection": selection(device, sizes)}
    result["prefill"] = prefill(device, out, args.smoke, 8 if args.smoke else 64)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
