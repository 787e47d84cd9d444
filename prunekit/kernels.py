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
import os
from typing import Any, Callable, Iterator

import torch

__all__ = ["Kernel", "triton_available", "observe_launches"]

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

    ``triton`` is a zero-argument callable returning the launcher, imported on first use, so that defining a kernel
    never imports Triton. Both implementations take the same arguments, write the same outputs and return the same
    value."""

    def __init__(self, name: str, reference: Callable[..., Any], triton: Callable[[], Callable[..., Any]] | None = None):
        self.name = name
        self.reference = reference
        self._triton = triton
        self._launcher: Callable[..., Any] | None = None

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"

    def uses_triton(self, device: torch.device) -> bool:
        """Whether a call on tensors of ``device`` runs the Triton implementation: on CUDA, and on CPU under
        Triton's interpreter (``TRITON_INTERPRET=1``, how the tests compare it with the reference)."""
        if self._triton is None or not triton_available():
            return False
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")

    def __call__(self, device: torch.device, *args: Any, triton: bool = True) -> Any:
        """Run on tensors of ``device``; ``triton=False``: the reference whatever the device (for inputs the
        Triton implementation does not cover, e.g. similarity rows computed on demand)."""
        if triton and self.uses_triton(device):
            if self._launcher is None:
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
