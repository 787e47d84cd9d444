"""Where a pruned prefill's time goes: the GPU's kernels and the host's operations, attributed to prunekit code.

    python benchmarks/gpu_profile.py --out results/                 # LLaVA-1.5-7B shapes, bf16, on a CUDA GPU
    python benchmarks/gpu_profile.py --model tiny --device cpu      # a seconds-long run on CPU

For the unpruned model and each method (``--methods``, at ``--keep`` layer-averaged tokens) at each ``--batch``:
the prefill's median wall time (no profiler), then one profiled prefill (``torch.profiler``, with Python stacks):
device time in total and by kernel, and device time and host operations by the innermost prunekit function that
launched them (``(model)`` where no prunekit frame is on the stack: the model's own layers). Writes
``gpu_profile.json`` into ``--out`` and prints each table as it comes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit.tools.bench import build_model, model_inputs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _python(event) -> bool:
    """A Python function's event (``path(line): name``; torch < 2.12 has no ``is_python_function``)."""
    flag = getattr(event, "is_python_function", None)
    return flag if flag is not None else ".py(" in event.name


def _owner(event) -> str:
    """The innermost prunekit function (a Python frame the profiler recorded) around ``event``, as
    ``path(line): function``; ``(model)`` where there is none (the model's own code). Older torch releases give
    an operation's frames as its ``stack``; newer ones as Python-function events around it."""
    for frame in getattr(event, "stack", None) or []:
        if "prunekit" in frame and "benchmarks" not in frame:
            return frame.split("prunekit", 1)[-1].lstrip("/_").replace("plugins/", "")
    e = event.cpu_parent
    while e is not None:
        if _python(e) and "prunekit" in e.name and "benchmarks" not in e.name:
            return e.name.split("prunekit", 1)[-1].lstrip("/_").replace("plugins/", "")
        e = e.cpu_parent
    return "(model)"


def profile_prefill(model, inputs, device, repeats):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(**inputs)  # first calls: compilation, graph recording
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            times.append((time.perf_counter() - start) * 1000)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, with_stack=True) as prof:
            model(**inputs)
            _sync(device)
    events = prof.events()
    kernels: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:70]] = kernels.get(e.name[:70], 0.0) + e.time_range.elapsed_us()
    owners: dict[str, dict[str, float]] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or _python(e) or not e.name.startswith("aten::"):
            continue
        launched = sum(k.duration for k in e.kernels)
        top_level = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if not launched and not top_level:
            continue
        o = owners.setdefault(_owner(e), {"device_us": 0.0, "ops": 0, "host_us": 0.0})
        o["device_us"] += launched
        if top_level:  # an operation called from Python: its host time, nested operations included
            o["ops"] += 1
            o["host_us"] += e.cpu_time_total
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    by_owner = dict(sorted(owners.items(), key=lambda kv: -(kv[1]["device_us"] + kv[1]["host_us"]))[:25])
    return {"wall_ms": statistics.median(times), "device_ms": sum(kernels.values()) / 1000,
            "kernels_us": top, "by_owner": by_owner}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="7b", choices=["7b", "tiny"])
    p.add_argument("--methods", nargs="+", default=["visionzip", "tops"])
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = dict(decoder_layers=32, vision_layers=24) if args.model == "7b" else dict(decoder_layers=4)
    model, setting = build_model(args.model, dtype=dtype, device=device, **layers)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": setting.name, "keep": args.keep, "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for batch in args.batch:
        inputs = model_inputs(model, batch=batch)
        for method in [None] + list(args.methods):
            if method is not None:
                prunekit.build(method, model, keep_tokens=args.keep, budget_meaning="layer_average")
            row = {"method": method or "unpruned", "batch": batch, **profile_prefill(model, inputs, device,
                                                                                     args.repeats)}
            if method is not None:
                report = prunekit.pruning_report(model)
                assert report is not None and report.stages, f"{method} pruned nothing"
                prunekit.remove(model)
            result["runs"].append(row)
            print(json.dumps(row, indent=1), flush=True)
            (out / "gpu_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
