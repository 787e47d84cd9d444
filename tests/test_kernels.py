"""Selection's fused kernels (prunekit.kernels): the Triton implementations equal their tensor references bit for
bit (in Triton's interpreter, tests/kernel_checks.py), and count_ops counts a kernel as one launch."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from prunekit.kernels import Kernel, triton_available
from prunekit.testing import count_ops

HERE = pathlib.Path(__file__).parent
CHECKS = ["pick_kernel", "coverage_kernels", "greedy_methods", "greedy_run"]


@pytest.fixture(scope="module")
def interpreted():
    if not triton_available():
        pytest.skip("triton is not installed (the test extra installs it on Linux x86-64)")
    env = dict(os.environ, TRITON_INTERPRET="1", PRUNEKIT_KERNELS="")
    proc = subprocess.run([sys.executable, str(HERE / "kernel_checks.py"), *CHECKS], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernels_equal_their_references(interpreted, check):
    assert interpreted[check] == "ok", interpreted[check]


def _double_into(x, out):
    out.copy_(x * 2)  # two operations when counted one by one
    return out


def test_a_kernel_call_counts_as_one_launch_without_its_reference_operations():
    covered = Kernel("double", _double_into, triton=lambda: _double_into)
    x, out = torch.arange(4.0), torch.empty(4)
    _, count = count_ops(covered, x.device, x, out)
    assert (count.launches, count.syncs, count.by_name) == (1, 0, {"prunekit::double": 1})
    assert torch.equal(out, x * 2)


def test_a_call_no_triton_implementation_covers_is_counted_operation_by_operation():
    for kernel, kwargs in ((Kernel("double", _double_into), {}),
                           (Kernel("double", _double_into, triton=lambda: _double_into), {"triton": False})):
        _, count = count_ops(lambda: kernel(torch.device("cpu"), torch.arange(4.0), torch.empty(4), **kwargs))
        assert "prunekit::double" not in count.by_name and count.launches >= 2, count.by_name


def test_the_reference_runs_on_cpu_and_when_asked(monkeypatch):
    kernel = Kernel("double", _double_into, triton=lambda: pytest.fail("Triton used"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel.uses_triton(torch.device("cpu"))
    monkeypatch.setenv("PRUNEKIT_KERNELS", "reference")
    assert not kernel.uses_triton(torch.device("cuda"))
    out = kernel(torch.device("cpu"), torch.arange(3.0), torch.empty(3))
    assert torch.equal(out, torch.arange(3.0) * 2)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: what runs while it records is remembered (function, inputs,
    output), and a replay reruns it into the recorded output, as a real replay rewrites the recorded buffers."""

    capturing = None

    def replay(self):
        body, args, out = self.recorded
        out.copy_(body(*args))


def _fake_cuda(monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def graph(g):
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def test_graph_cache_runs_first_records_second_and_replays_with_new_inputs(monkeypatch):
    from prunekit.kernels import GraphCache

    _fake_cuda(monkeypatch)
    calls = []

    def body(x, y):
        return x * 2 + (0 if y is None else y)

    def fn(x, y):
        calls.append(x.clone())
        out = body(x, y)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.recorded = (body, (x, y), out)
        return out

    cache = GraphCache(size=2)
    a, b, c = torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([7.0])
    assert torch.equal(cache.run("k", fn, a, None), a * 2) and len(calls) == 1  # first call: as it is
    assert not cache._graphs
    out = cache.run("k", fn, b, None)  # second: a warm-up and the recording, on copies; then a replay
    assert torch.equal(out, b * 2) and len(calls) == 3 and "k" in cache._graphs
    held = cache._graphs["k"][1][0]
    assert held is not b and torch.equal(held, b)  # the recorded input is a copy the cache owns
    again = cache.run("k", fn, c, None)  # later: the new input copied in and replayed, nothing run from Python
    assert torch.equal(again, c * 2) and len(calls) == 3
    assert again is not cache._graphs["k"][2]  # the caller gets its own tensor, not the recorded buffer
    for key in ("x", "y"):  # two more keys recorded: the least recently used one ("k") is dropped
        cache.run(key, fn, a, None), cache.run(key, fn, a, None)
    assert list(cache._graphs) == ["x", "y"]


def test_graph_cache_is_off_on_cpu_when_asked_and_for_large_selections(monkeypatch):
    from prunekit.kernels import GraphCache

    cache = GraphCache(max_bytes=100)
    assert not cache.enabled(torch.device("cpu"), 10)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert cache.enabled(torch.device("cuda"), 10) and not cache.enabled(torch.device("cuda"), 101)
    monkeypatch.setenv("PRUNEKIT_CUDA_GRAPHS", "0")
    assert not cache.enabled(torch.device("cuda"), 10)
