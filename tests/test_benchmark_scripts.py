"""The GPU diagnosis script runs end to end on CPU (its ``--smoke`` mode): a check that a lent GPU's minutes are not
spent on a script error. Its numbers mean nothing here."""

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
