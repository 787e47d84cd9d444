"""Measuring tools of ``prunekit bench``: device-synchronised timers, per-layer clocks, peak memory and FLOP
counts, progress output."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


class _StepClock:
    """A logits processor that changes nothing and notes when each step's scores arrive: the time between two
    steps is one decode step, measured directly (not as the difference of two runs, which noise can make
    negative)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> float:
        """Median time of one decode step (ms) over the last generate call's steps."""
        steps = [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]
        self.stamps = []
        return statistics.median(steps)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory that ``fn`` allocates above what was allocated before it (MiB).

    CUDA: the caching allocator's peak. CPU: the profiler's memory timeline (every tensor allocation and free,
    in order), so the figure does not depend on what the C allocator keeps or returns to the system."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**20


class LayerClock:
    """Wall time spent inside a set of modules (e.g. decoder layers), per call of an outer module.

    The pre-hook is appended and the post-hook prepended, so work that other hooks on the same modules do (such
    as prunekit's pruning at a layer boundary) is not counted as layer time."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self._start = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, prepend=True))

    def _pre(self, module, args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        _sync(self.device)
        self.total += (time.perf_counter() - self._start) * 1000.0

    def reset(self) -> None:
        self.total = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def count_flops(fn: Callable[[], Any], groups: dict[str, Callable[[str], bool]]) -> dict[str, int]:
    """Exact FLOPs of ``fn`` (matmuls, convolutions, attention), in total and per group of module names."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    out = {"total": int(counter.get_total_flops())}
    per_module = counter.get_flop_counts()
    for name, match in groups.items():
        out[name] = int(sum(sum(ops.values()) for mod, ops in per_module.items() if match(mod)))
    return out


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _say(message: str, progress: bool) -> None:
    """One finished measurement: written above the progress bar, or plainly when there is none."""
    from tqdm.auto import tqdm

    if progress:
        tqdm.write(message)
    else:
        print(message, flush=True)
