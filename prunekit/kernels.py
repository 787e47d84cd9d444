"""Device kernels of selection: each call is one launch on a GPU, and never reads a value back to the host.

A greedy selection is a loop of small steps. On a GPU each aten operation of a step is a kernel launch (several µs,
whatever its size) and each host read stalls the stream, so a step written as a chain of tensor operations costs
more than the work it does. A :class:`Kernel` is one fused step of that work with two implementations:

* ``triton``: a Triton kernel, used for CUDA tensors when ``triton`` imports (it ships with PyTorch's CUDA builds);
  one launch, no host read, static shapes (a variable amount of work is a loop bound read on the device), so a whole
  selection can be captured in a CUDA graph;
* ``reference``: tensor operations computing exactly the same values (bit for bit: the same float operations in
  the same order, or exact integer sums). It runs everywhere else (CPU, CUDA without Triton) and is what the
  Triton implementation is tested against.

:func:`prunekit.testing.count_ops` counts a kernel call as one launch named ``prunekit::<name>`` without a host
read, whichever implementation runs, and does not count the operations of its reference inside: it counts what a
GPU with Triton runs. That the Triton implementation indeed never reads the host is checked on a GPU with
``torch.cuda.set_sync_debug_mode("error")`` (``benchmarks/gpu.sh``).

``PRUNEKIT_KERNELS=reference`` in the environment makes every kernel run its reference (for comparisons);
``TRITON_INTERPRET=1`` runs the Triton implementations on CPU tensors in Triton's interpreter (slow; for tests).

Imports only torch; Triton is imported the first time a kernel runs on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Any, Callable, Iterator

import torch

__all__ = ["Kernel", "GraphCache", "triton_available", "observe_launches"]

#: callbacks told of every kernel call (name), while :func:`observe_launches` is active
_observers: list[Callable[[str], Any]] = []


def triton_available() -> bool:
    """Whether Triton imports here and the environment does not ask for the references."""
    if os.environ.get("PRUNEKIT_KERNELS", "").strip().lower() == "reference":
        return False
    return _triton_imports()


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any failure to import (missing, or a build that does not match this machine)
        return False
    return True


@contextlib.contextmanager
def observe_launches(callback: Callable[[str], Any]) -> Iterator[None]:
    """Call ``callback(name)`` at every kernel call made inside the block (used by ``count_ops``)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


class Kernel:
    """One fused step: ``reference`` (tensor operations, any device) and optionally ``triton`` (CUDA).

    ``triton`` names the launcher as ``"module:function"`` (or is a zero-argument callable returning it), imported on
    first use, so that defining a kernel never imports Triton. Both implementations take the same arguments, write
    the same outputs and return the same value."""

    def __init__(self, name: str, reference: Callable[..., Any],
                 triton: str | Callable[[], Callable[..., Any]] | None = None):
        if isinstance(triton, str) and not all(triton.partition(":")[::2]):
            raise ValueError(f"Kernel {name!r}: triton must be 'module:function' or a callable, got {triton!r}")
        self.name = name
        self.reference = reference
        self._triton = triton
        self._launcher: Callable[..., Any] | None = None

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"

    def uses_triton(self, device: torch.device) -> bool:
        """Whether a call on tensors of ``device`` runs the Triton implementation: on CUDA, and on CPU under
        Triton's interpreter (``TRITON_INTERPRET=1``, how the tests compare it with the reference). Not while
        ``torch.compile`` traces: a traced kernel is its reference (the compiler fuses its operations itself)."""
        if self._triton is None or torch.compiler.is_compiling() or not triton_available():
            return False
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")

    def __call__(self, device: torch.device, *args: Any, triton: bool = True) -> Any:
        """Run on tensors of ``device``; ``triton=False``: the reference whatever the device (for inputs the
        Triton implementation does not cover, e.g. similarity rows computed on demand)."""
        if triton and self.uses_triton(device):
            if self._launcher is None:
                if isinstance(self._triton, str):
                    module, _, function = self._triton.partition(":")
                    self._launcher = getattr(importlib.import_module(module), function)
                else:
                    self._launcher = self._triton()  # type: ignore[misc]
            impl = self._launcher
        else:
            impl = self.reference
        if not _observers or not (triton and self._triton is not None):
            return impl(*args)  # a call no Triton implementation covers is counted operation by operation
        for callback in list(_observers):
            callback(self.name)
        with _uncounted():
            return impl(*args)


#: set while a kernel's own operations run under an observer (count_ops skips them)
_inside = [0]


@contextlib.contextmanager
def _uncounted() -> Iterator[None]:
    _inside[0] += 1
    try:
        yield
    finally:
        _inside[0] -= 1


def inside_kernel() -> bool:
    """Whether a kernel's implementation is running now (its operations are part of one launch)."""
    return _inside[0] > 0


class GraphCache:
    """Selections replayed from CUDA graphs, by the shapes and settings that fix their work.

    A selection whose loop never reads the host and keeps its shapes (the greedy selector with its Triton kernels)
    can be recorded once as a CUDA graph and replayed: the K steps then run without any launch from Python, which
    on a GPU costs more than the steps' work. :meth:`run` runs a key's first call as it is (compiling the kernels),
    records the second (after one warm-up run on a side stream), and replays from then on with the new inputs
    copied into the recorded ones. Recorded graphs keep their memory (their inputs, similarity matrices and
    buffers) while cached: at most ``size`` of them, the least recently used dropped first, and none whose
    selection is estimated above ``max_bytes``.

    ``PRUNEKIT_CUDA_GRAPHS=0`` in the environment turns replay off. Not thread-safe: one selection at a time per
    process (as PyTorch's graph capture itself)."""

    def __init__(self, size: int = 8, max_bytes: int = 2 << 30) -> None:
        from collections import OrderedDict

        self.size = size
        self.max_bytes = max_bytes
        self._graphs: "OrderedDict[Any, tuple]" = OrderedDict()
        self._seen: set = set()

    def enabled(self, device: torch.device, nbytes: int) -> bool:
        if os.environ.get("PRUNEKIT_CUDA_GRAPHS", "1").strip() == "0" or device.type != "cuda":
            return False
        return self.size > 0 and nbytes <= self.max_bytes and not torch.cuda.is_current_stream_capturing()

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def run(self, key: Any, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
        """``fn(*inputs)``: run, recorded or replayed (see the class docstring). ``fn`` must depend on nothing
        but the shapes in ``key`` and the values of ``inputs``."""
        device = next(t.device for t in inputs if t is not None)
        with torch.cuda.device(device):  # record and replay on the inputs' GPU, whichever is current
            return self._run(key, fn, inputs)

    def _run(self, key: Any, fn: Callable[..., torch.Tensor], inputs: tuple) -> torch.Tensor:
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:
                if len(self._seen) > 4096:  # keys seen once: forget them rather than grow without bound
                    self._seen.clear()
                self._seen.add(key)
                return fn(*inputs)
            static = [None if t is None else t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*static)  # warm-up outside the capture, as PyTorch asks
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*static)
            entry = (graph, static, out)
            self._graphs[key] = entry
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            graph, static, out = entry
            for held, new in zip(static, inputs):
                if held is not None:
                    held.copy_(new)
        graph, _, out = entry
        graph.replay()
        return out.clone()
