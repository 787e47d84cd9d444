"""Selection's fused kernels (prunekit.kernels): the Triton implementations equal their tensor references bit for
bit (in Triton's interpreter, tests/kernel_checks.py), and count_ops counts a kernel as one launch."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

from prunekit.kernels import Kernel, triton_available
from prunekit.testing import count_ops

HERE = pathlib.Path(__file__).parent
CHECKS = ["pick_kernel", "coverage_kernels", "greedy_methods", "greedy_run", "greedy_wide"]


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


def test_a_kernel_names_its_triton_launcher_and_imports_it_on_first_use(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed (the test extra installs it on Linux x86-64)")
    monkeypatch.delenv("PRUNEKIT_KERNELS", raising=False)
    kernel = Kernel("root", lambda x: pytest.fail("reference used"), triton="math:sqrt")
    assert kernel(torch.device("cuda"), 9.0) == 3.0  # a CUDA device takes the launcher (no tensor needed here)
    for bad in ("math", ":sqrt", "math:"):
        with pytest.raises(ValueError, match="triton must be 'module:function' or a callable"):
            Kernel("root", abs, triton=bad)


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


# ---------------------------------------------------------------------------------------------------------
# Compiled for a GPU, without one: the interpreter above checks values, not what the compiler accepts
# ---------------------------------------------------------------------------------------------------------
def _compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int) -> tuple[str, int]:
    """PTX and the bytes of registers spilled per thread (ptxas's spill stores) of ``fn`` compiled for sm_90."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "enable_fp_fusion": False})
    try:  # the ptxas Triton itself compiles with for sm_90
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as err:
        pytest.skip(f"this Triton build does not say which ptxas it uses ({type(err).__name__})")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ptx"
        path.write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", str(path), "-o", str(path) + ".o"],
                                capture_output=True, text=True, check=True).stderr
    return kernel.asm["ptx"], int(report.split(" bytes spill stores")[0].rsplit(None, 1)[-1])


@pytest.fixture(scope="module")
def compiles():
    if not triton_available():
        pytest.skip("triton is not installed (the test extra installs it on Linux x86-64)")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no CUDA backend")


@pytest.mark.parametrize("block, kinds, grid, product", [
    (64, (1, 3, 2, 0), True, False), (1024, (1, 3, 2, 0), True, False), (1024, (1, 3, 2, 0), False, False),
    (2048, (1, 3, 2, 0), True, False), (4096, (1, 3, 2, 0), True, False), (1024, (2, 0, 0, 0), False, False),
    (512, (3, 1, 1, 2), False, False), (1024, (3, 1, 0, 0), True, True),
])
def test_the_whole_selection_kernel_compiles_for_a_gpu_exactly_and_holds_its_state_in_registers(
        compiles, block, kinds, grid, product):
    """The float64 operations stay unfused (no fma.rn.f64: the reference rounds every product and sum), and up to
    2,048 tokens the state fits the registers (no spill) with the warps ``run`` launches."""
    from prunekit_plugins.selectors import _greedy_triton as g

    signature = {"gains_ptr": "*fp64", "weights_ptr": "*fp64", "penalty_ptr": "*fp64", "picks_ptr": "*i64",
                 "sim_ptr": "*fp32", "near_ptr": "*fp32", "grid_ptr": "*i64" if grid else "*fp32", "scale": "fp32",
                 "cbest_ptr": "*i64", "chosen_ptr": "*u8", "cgain_ptr": "*i64", "index_ptr": "*i64", "old_ptr": "*i64",
                 "new_ptr": "*i64", "start": "i32", "B": "i32", "N": "i32", "K": "i32"}
    constexprs = {"K0": kinds[0], "K1": kinds[1], "K2": kinds[2], "K3": kinds[3], "MINMAX": True, "PRODUCT": product,
                  "NEAR": 2 in kinds, "COV": 3 in kinds, "GRID": grid, "OUT": 1 << 62, "BLOCK": block,
                  "BU": g.run_launch(block)[1]}
    ptx, spilled = _compile_sm90(g._run_kernel, signature, constexprs, g.run_launch(block)[0])
    assert "fma.rn.f64" not in ptx and "div.rn.f64" in ptx
    if block <= 2048:
        assert spilled == 0, f"{spilled} bytes of registers spilled per thread"


def test_the_step_kernels_compile_for_a_gpu_exactly(compiles):
    from prunekit_plugins.scorers import _coverage_triton as c
    from prunekit_plugins.selectors import _greedy_triton as g

    ptx, _ = _compile_sm90(
        g._pick_kernel, {"gains_ptr": "*fp64", "weights_ptr": "*fp64", "penalty_ptr": "*fp64", "picks_ptr": "*i64",
                         "score_ptr": "*fp64", "step": "i32", "B": "i32", "N": "i32", "K": "i32"},
        {"T": 3, "MINMAX": True, "PRODUCT": False, "BLOCK": 1024}, 4)
    assert "fma.rn.f64" not in ptx and "div.rn.f64" in ptx
    _compile_sm90(c._prepare_kernel, {"src_ptr": "*fp32", "scale": "fp32", "picked_ptr": "*i64", "picked_stride": "i32",
                                      "best_ptr": "*i64", "chosen_ptr": "*u8", "index_ptr": "*i64", "old_ptr": "*i64",
                                      "new_ptr": "*i64", "count_ptr": "*i64", "N": "i32"},
                  {"GRID": False, "OUT": 1 << 62, "BLOCK": 1024}, 4)
    _compile_sm90(c._delta_kernel, {"src_ptr": "*i64", "scale": "fp32", "index_ptr": "*i64", "old_ptr": "*i64",
                                    "new_ptr": "*i64", "count_ptr": "*i64", "gain_ptr": "*i64", "out_ptr": "*fp64",
                                    "N": "i32"},
                  {"GRID": True, "WRITE_OUT": True, "BU": 16, "BI": 128}, 4)


@pytest.mark.parametrize("launch", [0, 1])
@pytest.mark.parametrize("grid", [True, False])
def test_the_wide_step_kernels_compile_for_a_gpu_exactly_without_spilling(compiles, grid, launch):
    """With each of WIDE_LAUNCH's settings (two)."""
    from prunekit_plugins.selectors import _greedy_triton as g

    assert len(g.WIDE_LAUNCH) == 2, "test every entry of WIDE_LAUNCH"
    cols, rows, warps = g.WIDE_LAUNCH[launch][1]

    src = "*i64" if grid else "*fp32"
    kinds = {"K0": 1, "K1": 3, "K2": 2, "K3": 0, "MINMAX": True}
    ptx, spilled = _compile_sm90(
        g._wide_gains_kernel,
        {"gains_ptr": "*fp64", "penalty_ptr": "*fp64", "near_ptr": "*fp32", "grid_ptr": src,
         "scale": "fp32", "cgain_ptr": "*i64", "index_ptr": "*i64", "old_ptr": "*i64", "new_ptr": "*i64",
         "count_ptr": "*i32", "part_ptr": "*fp64", "B": "i32", "N": "i32", "P": "i32"},
        {**kinds, "COV": True, "DELTA": True, "GRID": grid, "BU": rows, "BI": cols}, warps)
    assert "fma.rn.f64" not in ptx
    assert spilled == 0, f"{spilled} bytes of registers spilled per thread"
    ptx, spilled = _compile_sm90(
        g._wide_score_kernel,
        {"gains_ptr": "*fp64", "weights_ptr": "*fp64", "penalty_ptr": "*fp64", "near_ptr": "*fp32", "scale": "fp32",
         "cgain_ptr": "*i64", "count_ptr": "*i32", "part_ptr": "*fp64", "top_ptr": "*fp64", "at_ptr": "*i32",
         "B": "i32", "N": "i32", "P": "i32"},
        {**kinds, "PRODUCT": False, "PB": 128, "BI": cols}, 4)
    assert "fma.rn.f64" not in ptx and "div.rn.f64" in ptx
    assert spilled == 0, f"{spilled} bytes of registers spilled per thread"
    ptx, spilled = _compile_sm90(
        g._wide_pick_kernel,
        {"penalty_ptr": "*fp64", "picks_ptr": "*i64", "step": "i32", "sim_ptr": "*fp32", "near_ptr": "*fp32",
         "grid_ptr": src, "scale": "fp32", "cbest_ptr": "*i64", "chosen_ptr": "*u8", "index_ptr": "*i64",
         "old_ptr": "*i64", "new_ptr": "*i64", "count_ptr": "*i32", "top_ptr": "*fp64", "at_ptr": "*i32",
         "update": "i32", "B": "i32", "N": "i32", "K": "i32", "P": "i32"},
        {"NEAR": True, "COV": True, "GRID": grid, "OUT": 1 << 62, "PB": 128, "BI": cols}, 4)
    assert "atom" in ptx
    assert spilled == 0, f"{spilled} bytes of registers spilled per thread"


def _memory_ops(ptx: str) -> list[str]:
    """The PTX's global loads, global stores and barriers in order: "ld", "st", "bar"."""
    import re

    found = (re.search(r"\b(ld\.global|st\.global|bar\.sync)", line) for line in ptx.splitlines())
    return [m.group(1).split(".")[0] for m in found if m]


def test_a_value_several_threads_hold_is_read_by_all_of_them_before_it_is_rewritten(compiles):
    """Below the program's thread count (N <= 64 with 4 warps: TOPS's last in-LLM stage keeps 16 of 64) each token
    belongs to several threads; a kernel that reads a token's value and writes it back must put a barrier between
    the reads and the write, or one thread may read what another already rewrote. The interpreter cannot show
    this (it has no threads); the compiled code can: the write right after a barrier."""
    from prunekit_plugins.scorers import _coverage_triton as c
    from prunekit_plugins.selectors import _greedy_triton as g

    ptx, _ = _compile_sm90(g._pick_kernel, {"gains_ptr": "*fp64", "weights_ptr": "*fp64", "penalty_ptr": "*fp64",
                                            "picks_ptr": "*i64", "score_ptr": "*fp64", "step": "i32", "B": "i32",
                                            "N": "i32", "K": "i32"},
                           {"T": 2, "MINMAX": False, "PRODUCT": False, "BLOCK": 64}, 4)
    ops = _memory_ops(ptx)
    stores = [i for i, op in enumerate(ops) if op == "st"]
    assert ops[stores[1] - 1] == "bar", ops  # the second term's score: read, then rewritten
    for kernel, signature, constexprs, warps in (
        (c._delta_kernel, {"src_ptr": "*i64", "scale": "fp32", "index_ptr": "*i64", "old_ptr": "*i64",
                           "new_ptr": "*i64", "count_ptr": "*i64", "gain_ptr": "*i64", "out_ptr": "*fp64", "N": "i32"},
         {"GRID": True, "WRITE_OUT": False, "BU": 16, "BI": 64}, 4),
        (g._wide_gains_kernel, {"gains_ptr": "*fp64", "penalty_ptr": "*fp64", "near_ptr": "*fp32",
                                "grid_ptr": "*i64", "scale": "fp32", "cgain_ptr": "*i64", "index_ptr": "*i64",
                                "old_ptr": "*i64", "new_ptr": "*i64", "count_ptr": "*i32", "part_ptr": "*fp64",
                                "B": "i32", "N": "i32", "P": "i32"},
         {"K0": 3, "K1": 0, "K2": 0, "K3": 0, "MINMAX": False, "COV": True, "DELTA": True, "GRID": True,
          "BU": g.WIDE_LAUNCH[0][1][1], "BI": g.WIDE_LAUNCH[0][1][0]}, g.WIDE_LAUNCH[0][1][2]),
    ):
        ops = _memory_ops(_compile_sm90(kernel, signature, constexprs, warps)[0])
        assert ops[ops.index("st") - 1] == "bar", (kernel, ops)  # the gains: read, then rewritten


def test_a_recorded_selection_is_keyed_by_the_fused_path_setting(monkeypatch):
    """A graph recorded with the step loop must not replay when the fused kernels are asked for (or back)."""
    import prunekit
    from prunekit.plugin import SelectionInput
    from prunekit_plugins.selectors import greedy

    monkeypatch.setattr(greedy.Kernel, "uses_triton", lambda self, device: True)
    monkeypatch.setattr(greedy.GRAPHS, "enabled", lambda device, nbytes: True)
    selector = prunekit.plugin.registry.get("methods", "tops").SelectionConfig().selector()
    inputs = SelectionInput(torch.randn(1, 20, 8), torch.rand(1, 20))
    keys = set()
    for setting in ("1", "0", "wide", "run"):
        monkeypatch.setenv("PRUNEKIT_FUSED_SELECTION", setting)
        keys.add(selector._graph_key(inputs, 5))
    assert None not in keys and len(keys) == 4
