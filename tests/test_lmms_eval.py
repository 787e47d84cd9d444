"""``lmms-eval --model prunekit`` end to end, offline on the CPU: the bundled model on a 12-question local task
(tests/lmms_eval_task), unpruned, TOPS (from a folder that carries its saved configuration) and FastV; each run's
accuracy equals ``prunekit eval`` on the same questions, and its records say what pruning did."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.tools import bundled

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (pip install 'prunekit[lmms]'; "
                                                     "scripts/dev.sh test installs it, test-oldest does not)")
TASK = Path(__file__).parent / "lmms_eval_task"
BUDGET = 0.111  # of the bundled model's 144 visual tokens
COMMON = "dtype=float32,attn_implementation=sdpa"


def test_entry_point_is_registered_and_import_prunekit_leaves_it_alone():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "prunekit"]
    assert ep.value == "prunekit.integrations.lmms_eval:manifest"
    code = ("import sys, prunekit; import prunekit.integrations.lmms_eval as m; "
            "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'; print(m.WRAPPERS['llava'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "llava_hf" in out.stdout
    code = "import sys, prunekit; assert 'prunekit.integrations.lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _write_task(folder: Path) -> Path:
    """The task (YAML and functions from tests/lmms_eval_task) and its data: 12 shapes questions and their images."""
    from prunekit.tools.data import ShapesVQA

    folder.mkdir()
    for name in ("prunekit_shapes.yaml", "utils.py"):
        (folder / name).write_text((TASK / name).read_text())
    (folder / "images").mkdir()
    rows = []
    for i, s in enumerate(ShapesVQA("test", 12, seed=0)):
        s.image.save(folder / "images" / f"{i:02d}.png")
        rows.append(json.dumps({"image": f"images/{i:02d}.png", "question": s.question, "answer": s.answer,
                                "type": s.type}))
    (folder / "questions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _lmms_eval(task: Path, out: Path, model_args: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "prunekit", "--model_args", model_args,
           "--tasks", "prunekit_shapes", "--include_path", str(task), "--batch_size", "1", "--device", "cpu",
           "--output_path", str(out), "--log_samples", *extra]
    out.mkdir(parents=True)
    log = open(out / "log.txt", "w")
    return subprocess.Popen(cmd, cwd=task, env=env, stdout=log, stderr=subprocess.STDOUT)


def _results(out: Path) -> tuple[dict, list[dict]]:
    (results,) = glob.glob(str(out / "*" / "*_results.json"))
    (samples,) = glob.glob(str(out / "*" / "*_samples_prunekit_shapes.jsonl"))
    return json.loads(Path(results).read_text()), [json.loads(line) for line in Path(samples).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four lmms-eval runs at once (unpruned, TOPS from a saved folder, FastV, an unreachable budget) and
    ``prunekit eval`` on the same questions."""
    import prunekit
    from prunekit.tools.cli import main as prunekit_cli

    tmp = tmp_path_factory.mktemp("lmms")
    task = _write_task(tmp / "task")
    model, processor = bundled.load()
    prunekit.save_config(model, "tops", keep_ratio=BUDGET, positions="renumber")
    model.save_pretrained(tmp / "tops-folder")
    processor.save_pretrained(tmp / "tops-folder")
    procs = {
        "unpruned": _lmms_eval(task, tmp / "unpruned", f"pretrained={bundled.MODEL_DIR},{COMMON}"),
        "tops": _lmms_eval(task, tmp / "tops", f"pretrained={tmp / 'tops-folder'},{COMMON}"),
        "fastv": _lmms_eval(task, tmp / "fastv", f"pretrained={bundled.MODEL_DIR},{COMMON},method=fastv,"
                                                 f"keep_ratio={BUDGET},positions=renumber,budget_meaning=nominal"),
        "too_many": _lmms_eval(task, tmp / "too_many", f"pretrained={bundled.MODEL_DIR},{COMMON},method=tops,"
                                                       f"keep_tokens=500", "--limit", "1"),
    }
    rc = prunekit_cli(["eval", "--model", str(bundled.MODEL_DIR), "--data", str(task / "questions.jsonl"),
                       "--size", "0", "--methods", "tops", "fastv", "--budgets", str(BUDGET), "--positions",
                       "renumber", "--budget-meaning", "nominal", "--batch-size", "1", "--threads", "1",
                       "--no-progress", "--out", str(tmp / "prunekit-eval")])
    assert rc == 0
    codes = {name: p.wait(timeout=900) for name, p in procs.items()}
    logs = {name: (tmp / name / "log.txt").read_text() for name in procs}
    expected = {r["label"]: r for r in json.loads((tmp / "prunekit-eval" / "results.json").read_text())["results"]}
    return tmp, codes, logs, expected


@needs_lmms
@pytest.mark.parametrize("name", ["unpruned", "tops", "fastv"])
def test_accuracy_equals_prunekit_eval_and_records_say_what_pruning_did(runs, name):
    tmp, codes, logs, expected = runs
    assert codes[name] == 0, logs[name][-3000:]
    results, samples = _results(tmp / name)
    accuracy = results["results"]["prunekit_shapes"]["exact_match,none"]
    assert len(samples) == 12
    assert accuracy == pytest.approx(expected[name]["accuracy"], abs=1e-9), (name, accuracy, expected[name])
    records = [s["token_counts"][0].get("prunekit") if s.get("token_counts") and s["token_counts"][0] else None
               for s in samples]
    if name == "unpruned":
        assert records == [None] * 12
        assert not any(k.startswith("avg_prunekit") for k in results.get("throughput", {}))
        return
    # pruning happened, per sample: every answer's prefill kept fewer visual tokens, at fewer FLOPs
    assert all(r is not None and r["method"] == name and r["enabled"] for r in records)
    assert all(r["visual_tokens"] == 144 and r["layer_average"] < 144 and r["stages"] for r in records)
    assert all(r["prefill_flops"] < r["prefill_flops_unpruned"] for r in records)
    assert all(r["budget"] == pytest.approx(BUDGET * 144) and r["budget_meaning"] == "nominal" for r in records)
    # the same counts prunekit eval reports, and their means in the results file's summary
    mean = sum(r["layer_average"] for r in records) / 12
    assert mean == pytest.approx(expected[name]["tokens"])
    summary = results["throughput"]
    assert summary["avg_prunekit_layer_average"] == pytest.approx(mean)
    assert summary["avg_prunekit_prefill_flops"] == pytest.approx(sum(r["prefill_flops"] for r in records) / 12)
    assert summary["avg_prunekit_requests"] == 12
    if name == "fastv":  # prunes inside the LLM: layers before K see all 144, so the average is above the budget
        assert mean > BUDGET * 144


@needs_lmms
def test_a_pruning_error_fails_the_run_instead_of_answering(runs):
    tmp, codes, logs, _ = runs
    assert codes["too_many"] != 0, logs["too_many"][-3000:]
    assert "keep_tokens=500 is more than the 144 visual tokens present" in logs["too_many"]
    assert "EvaluationAborted" in logs["too_many"]
    assert not glob.glob(str(tmp / "too_many" / "*" / "*_results.json"))


@needs_lmms
@pytest.mark.parametrize("args, message", [
    (dict(method="tops", keep_tokenz=64), "unknown model_args keep_tokenz"),
    (dict(keep_tokens=64), "keep_tokens: pruning options need method="),
    (dict(method="tops", positions="sideways"), "positions"),
    (dict(method="no_such_method"), "no_such_method"),
])
def test_invalid_options_fail_before_the_model_loads(args, message):
    from prunekit.integrations.lmms_eval import load

    with pytest.raises((ValueError, KeyError), match=message):
        load(pretrained=str(bundled.MODEL_DIR), device="cpu", **args)


@needs_lmms
def test_wrapper_is_lmms_evals_own_with_options_parsed(tmp_path):
    import prunekit
    from lmms_eval.models.chat.llava_hf import LlavaHf
    from prunekit.integrations import lmms_eval as integration

    lm = integration._entry_classes()["PrunekitChat"].create_from_arg_string(
        f"pretrained={bundled.MODEL_DIR},dtype=float32,method=tops,schedule=[32,16,4]", {"device": "cpu"})
    assert isinstance(lm, LlavaHf) and not lm.is_simple
    assert prunekit.is_patched(lm.model) and lm._prunekit_options == {"schedule": [32, 16, 4]}
    simple = integration._entry_classes()["Prunekit"].create_from_arg_string(
        f"pretrained={bundled.MODEL_DIR},method=none", {"device": "cpu"})
    assert simple.is_simple and not prunekit.is_patched(simple.model)
