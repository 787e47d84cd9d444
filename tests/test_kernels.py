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
CHECKS = ["pick_kernel", "coverage_kernels", "greedy_methods"]


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
