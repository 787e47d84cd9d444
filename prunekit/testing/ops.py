"""Counting the operations a computation dispatches: what selection costs on a GPU, measured on any machine.

On a GPU every operation that computes something is a kernel launch (several µs, whatever its size), and every
operation that reads a tensor's value back to the host, or whose output size depends on tensor values, stalls the
stream until the device catches up. Both are visible at the dispatcher on CPU, so :func:`count_ops` counts them
there with a ``TorchDispatchMode``: a test can then fail on a machine without a GPU when a loop gains a launch or a
host read.

A :class:`prunekit.kernels.Kernel` call counts as one launch named ``prunekit::<name>`` and no host read, whichever
implementation runs: on a GPU with Triton it is one kernel that reads nothing back. The operations of its tensor
reference (what runs on CPU) are not counted.

Imports only torch (and prunekit.kernels, which imports only torch); :func:`count_decode_step` reads the
transformers contract when it runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import inside_kernel, observe_launches

__all__ = ["HOST_SYNC_OPS", "OpCount", "count_ops"]

#: operations that read a tensor's value back to the host (``.item()``, ``bool(t)``, ``int(t)``), or whose output
#: shape depends on tensor values (the size must be read before the output is allocated): on a GPU each one waits
#: for the stream to drain. Indexing by a boolean mask (``x[mask]``) counts too.
HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::nonzero", "aten::nonzero_static_fallback",
    "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::equal", "aten::allclose", "aten::repeat_interleave", "aten::bincount",
    "aten::histc", "aten::argwhere", "aten::_assert_async", "aten::masked_scatter", "aten::where.condition",
})

#: tensor methods that copy a tensor's values to the host without dispatching an aten operation on CPU (there the
#: data is read in place), so the dispatcher never sees them; on a GPU each is a device->host copy that waits for the
#: stream. Counted at the Python level (a ``TorchFunctionMode``), one host read per call, under their own names.
_HOST_COPY_METHODS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}

#: indexing operations that sync when an index is a boolean mask (its true entries must be counted on the host)
_MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})

#: operations that make views, read metadata or allocate without writing: no kernel on any device
_FREE = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::slice", "aten::select",
    "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::alias", "aten::detach", "aten::lift_fresh", "aten::diagonal", "aten::unbind", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::view_as_real", "aten::view_as_complex",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::dim",
    "aten::size", "aten::stride", "aten::numel", "aten::is_same_size", "aten::_reshape_alias", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::set_", "aten::_nested_tensor_size", "aten::resize_",
    "aten::unfold", "aten::movedim", "aten::expand_as", "aten::view_as", "aten::real", "aten::imag",
})


def _name(func: Any) -> str:
    schema = func._schema
    return schema.name if schema.overload_name == "" else f"{schema.name}.{schema.overload_name}"


def _launches(func: Any) -> bool:
    """False for an operation that only makes a view, reads metadata or allocates uninitialised memory."""
    schema = func._schema
    if schema.name in _FREE:
        return False
    # an operation whose every output aliases an input without writing it is a view (as_strided, diagonal, ...)
    returns = schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


def _masked(func: Any, args: tuple) -> bool:
    if func._schema.name not in _MASK_INDEXING or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


class OpCount:
    """What :func:`count_ops` saw.

    * ``launches``: operations that run a kernel (every aten operation but views, metadata reads and
      uninitialised allocations; in-place and ``out=`` operations count, since they write);
    * ``syncs``: of those, the ones that wait for a device→host read (:data:`HOST_SYNC_OPS`);
    * ``operations``: every aten operation dispatched, views and metadata included;
    * ``by_name`` / ``sync_names``: each launching / synchronising operation and how often it ran.
    """

    def __init__(self) -> None:
        self.launches = 0
        self.syncs = 0
        self.operations = 0
        self.by_name: dict[str, int] = {}
        self.sync_names: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"OpCount(launches={self.launches}, operations={self.operations}, syncs={self.syncs})"


def _count_sync(count: OpCount, name: str) -> None:
    count.syncs += 1
    count.sync_names[name] = count.sync_names.get(name, 0) + 1


class _HostCopies(TorchFunctionMode):
    """Counts :data:`_HOST_COPY_METHODS` calls as host reads (and launches: on a GPU each is a copy)."""

    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _HOST_COPY_METHODS.get(func)
        if name is not None and not inside_kernel():
            count = self.count
            count.operations += 1
            count.launches += 1
            count.by_name[name] = count.by_name.get(name, 0) + 1
            _count_sync(count, name)
        return func(*args, **(kwargs or {}))


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def kernel(self, name: str) -> None:
        if inside_kernel():  # a kernel called by a kernel's reference is part of that one launch
            return
        name = f"prunekit::{name}"
        self.count.operations += 1
        self.count.launches += 1
        self.count.by_name[name] = self.count.by_name.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if inside_kernel():
            return func(*args, **(kwargs or {}))
        count = self.count
        count.operations += 1
        if _launches(func):
            name = _name(func)
            count.launches += 1
            count.by_name[name] = count.by_name.get(name, 0) + 1
            if name in HOST_SYNC_OPS or func._schema.name in HOST_SYNC_OPS or _masked(func, args):
                _count_sync(count, name)
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` and count the aten operations it dispatches: ``(result, OpCount)``.

    Counted at the dispatcher (a ``TorchDispatchMode``), below autograd and Python: the operations a GPU would
    launch as kernels and the ones that would stall its stream are the ones counted, on whatever device ``fn``
    runs. Per-iteration costs of a loop are best taken as the difference between two runs of different lengths,
    which cancels the setup. Operations run inside ``torch.no_grad`` or not are counted alike. ``Tensor.tolist``
    and ``Tensor.numpy`` count as one host read each: they copy to the host on a GPU, but dispatch nothing on CPU."""
    count = OpCount()
    counter = _Counter(count)
    with _HostCopies(count), counter, observe_launches(counter.kernel):
        out = fn(*args, **kwargs)
    return out, count


def count_decode_step(model: Any, inputs: dict) -> OpCount:
    """Prefill ``model`` on ``inputs`` (a batch with an ``attention_mask``) with a KV cache, then count one decode
    step on that cache: the greedy next token of every row, the mask grown by one. A decode step of ``generate``
    at batch 1 is bound by the host, so its launches and reads are what it costs on a GPU."""
    from .. import contracts as C  # the model's cache keyword on the installed transformers

    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        cache = {C.MODEL_CACHE.key: C.OUTPUT_CACHE.get(out)}
        _, count = count_ops(lambda: model(input_ids=token, attention_mask=mask, use_cache=True, **cache))
    return count
