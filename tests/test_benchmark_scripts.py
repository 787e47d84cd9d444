"""The GPU diagnosis script runs end to end on CPU (its ``--smoke`` mode): a check that a lent GPU's minutes are not
spent on a script error. Its numbers mean nothing here. The launch counts the docs quote at LLaVA-1.5-7B's depths
come from a script that runs on CPU: it runs, prunes, and splits the selections' launches from the rest."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_gpu_diagnosis_runs_on_cpu(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_diagnose.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads((tmp_path / "diagnose.json").read_text())
    (row,) = result["selection"]
    assert len(row["calls_ms"]) == 8 and row["replay_ms"] is None  # no CUDA graph on CPU
    assert [r["method"] for r in result["prefill"]] == ["unpruned", "visionzip", "tops"]
    for row in result["prefill"][1:]:  # the pruned prefills pruned
        assert all(a < n for a, n in zip(row["layer_average"], row["visual_tokens"])), row
    for method in ("unpruned", "visionzip", "tops"):
        text = (tmp_path / f"cprofile_{method}.txt").read_text()
        assert "# prunekit's, by cumulative time" in text
    assert "prunekit/runtime/stages.py" in (tmp_path / "cprofile_tops.txt").read_text()


def test_the_launch_count_at_7b_depth_prunes_and_splits_the_selections():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_syncs.py"), "--depth", "--methods",
                          "none", "tops"], check=True, capture_output=True, text=True, timeout=600, cwd=ROOT).stdout
    none, tops = out.splitlines()[-2:]
    assert none.startswith("none") and "0 in 0 greedy selections" in none and "576 visual tokens" in none
    assert tops.startswith("tops") and " in 3 greedy selections" in tops  # stage I, II and III
    total, inside = int(tops.split()[2].rstrip(":")), int(tops.split()[3])
    assert 0 < inside < total
    assert "64.0 of 576 visual tokens (layer average)" in tops  # pruned, to the budget asked


def test_the_host_time_at_7b_depth_prunes_and_times_the_hooks():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_syncs.py"), "--host-time", "--methods",
                          "visionzip", "tops", "--repeats", "2"], check=True, capture_output=True, text=True,
                         timeout=600, cwd=ROOT).stdout
    visionzip, tops = [line for line in out.splitlines() if line.startswith(("visionzip", "tops"))]
    assert "1.000x VisionZip's" in visionzip
    assert "by hook: DecoderPruner._layer_post" in out  # TOPS's in-LLM stages, timed by hook
    assert tops.startswith("tops") and "x VisionZip's" in tops
    hooks = float(tops.split("in prunekit's hooks")[1].split()[0])
    assert 0 < hooks < float(tops.split()[1])  # the hooks' time is part of the prefill's
    assert "16.0 of 64 visual tokens (layer average)" in visionzip and "of 64 visual tokens" in tops  # pruned


def test_the_host_time_on_cuda_runs_its_steps(monkeypatch, capsys):
    """The CUDA path of ``--host-time`` (a lent GPU's minutes are not spent on a script error): the 7B built by
    ``build_model`` and the synchronisation stood in for by the tiny model on CPU; its numbers mean nothing."""
    import runpy

    import torch

    from prunekit.testing import tiny_llava
    from prunekit.tools import bench

    script = runpy.run_path(str(ROOT / "benchmarks" / "prefill_syncs.py"), run_name="benchmark")
    built = []

    def tiny(kind, **kwargs):
        built.append((kind, kwargs))
        return tiny_llava(num_layers=4), None

    monkeypatch.setattr(bench, "build_model", tiny)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    times = script["host_time"](["visionzip", "tops"], 8, 2, device="cuda")
    assert set(times) == {"visionzip", "tops"} and built[0] == (
        "7b", {"decoder_layers": 32, "vision_layers": 24, "dtype": torch.bfloat16, "device": "cuda"})
    out = capsys.readouterr().out
    assert "in prunekit's hooks" in out and "of 64 visual tokens (layer average)" in out  # pruned


def test_the_decode_step_count_at_7b_depth_reads_as_the_unpruned_model():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_syncs.py"), "--decode", "--methods",
                          "none", "tops"], check=True, capture_output=True, text=True, timeout=600, cwd=ROOT).stdout
    none, tops = [line for line in out.splitlines() if "decode step" in line]
    assert none.startswith("none") and tops.startswith("tops")
    reads = lambda line: line.split("host reads")[1].split(";")[0]  # noqa: E731
    assert reads(none) == reads(tops)  # transformers' own check only
    assert "64.0 of 576 visual tokens (layer average)" in tops  # the prefill before the step pruned
