"""``lmms-eval --model prunekit`` end to end, offline on the CPU: the bundled model on a 12-question local task
(tests/lmms_eval_task), unpruned, TOPS (from a folder that carries its saved configuration) and FastV; each run's
accuracy equals ``prunekit eval`` on the same questions, and its records say what pruning did. Then every other
family lmms-eval has a wrapper for, on a tiny random-weight checkpoint (tests/lmms_families.py), through that
wrapper; multiple-choice (log-likelihood) requests; and a data-parallel run."""

from __future__ import annotations

import functools
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
    for name in ("prunekit_shapes.yaml", "prunekit_shapes_mc.yaml", "utils.py"):
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
    if name == "unpruned":  # recorded too, at the same fields: every visual token in every layer
        assert all(r is not None and r["method"] == "none" and not r["enabled"] and r["budget"] is None
                   for r in records)
        assert all(r["visual_tokens"] == r["layer_average"] == 144 and not r["stages"] for r in records)
        assert all(r["prefill_flops"] == r["prefill_flops_unpruned"] > 0 for r in records)
        summary = results["throughput"]
        assert summary["avg_prunekit_requests"] == 12 and summary["avg_prunekit_prefill_flops_percent"] == 100
        assert summary["avg_prunekit_layer_average"] == 144
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
    assert simple.is_simple and simple._prunekit_method is None
    # unpruned, the model only carries a patch that stays disabled, to record each prefill's tokens and FLOPs
    assert simple._prunekit_measuring and prunekit.is_patched(simple.model)


# -- every other family, through its own lmms-eval wrapper -----------------------------------------------------------
#: family -> (method and options, the lmms-eval wrapper expected); Gemma3 refuses in-LLM pruning, so it runs a method
#: that prunes before the LLM only
FAMILY_RUNS = {
    "llava_next": ("method=tops,keep_ratio=0.25", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "llava_onevision": ("method=tops,keep_ratio=0.25", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "qwen2_vl": ("method=tops,keep_ratio=0.25", "lmms_eval.models.simple.qwen2_vl.Qwen2_VL"),
    "qwen2_5_vl": ("method=tops,keep_ratio=0.25", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL"),
    "qwen3_vl": ("method=tops,keep_ratio=0.25", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL"),
    "internvl": ("method=tops,keep_ratio=0.25", "lmms_eval.models.chat.internvl_hf.InternVLHf"),
    "gemma3": ("method=divprune,keep_ratio=0.25", "lmms_eval.models.simple.gemma3.Gemma3"),
}
FAMILY_LIMIT = 3
#: llava_hf's log-likelihood prompt is the bundled model's: the image, the question, the answer (no commas: the
#: template is a --model_args value)
MC_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _launch(task: Path, out: Path, model_args: str, *extra: str, tasks: str = "prunekit_shapes",
            launcher: tuple[str, ...] = ("-m", "lmms_eval"), env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, *launcher, "--model", "prunekit", "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(task), "--batch_size", "1", "--device", "cpu", "--output_path", str(out),
           "--log_samples", *extra]
    out.mkdir(parents=True)
    return subprocess.Popen(cmd, cwd=task, env=env, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT)


def _run_all(jobs: dict, workers: int = 3) -> dict:
    """Run the ``name -> () -> Popen`` jobs, ``workers`` at a time; their exit codes."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(lambda start: start().wait(timeout=900), start) for name, start in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Each family's tiny checkpoint evaluated by lmms-eval (3 questions), pruned, through lmms-eval's own wrapper
    (tests/lmms_families.py runs lmms-eval with stand-ins for what needs torchvision)."""
    import lmms_families

    tmp = tmp_path_factory.mktemp("lmms-families")
    task = _write_task(tmp / "task")
    launcher = (str(Path(lmms_families.__file__)),)
    jobs = {}
    for family, (options, _) in FAMILY_RUNS.items():
        lmms_families.save(family, tmp / family)
        args = ",".join(a for a in (f"pretrained={tmp / family}", lmms_families.FAMILIES[family].model_args, options) if a)
        jobs[family] = functools.partial(_launch, task, tmp / "out" / family, args, "--limit", str(FAMILY_LIMIT),
                                         launcher=launcher)
    # multiple choice (log-likelihood requests) needs a simple wrapper: lmms-eval's chat wrappers take generation only
    mc = ("--force_simple", "--limit", "4")
    jobs["mc_llava"] = functools.partial(
        _launch, task, tmp / "out" / "mc_llava", f"pretrained={bundled.MODEL_DIR},{COMMON},method=tops,"
        f"keep_ratio={BUDGET},positions=renumber,chat_template={MC_TEMPLATE}", *mc, tasks="prunekit_shapes_mc")
    qwen = lmms_families.FAMILIES["qwen2_5_vl"].model_args
    jobs["mc_qwen2_5_vl"] = functools.partial(
        _launch, task, tmp / "out" / "mc_qwen2_5_vl", f"pretrained={tmp / 'qwen2_5_vl'},{qwen},method=tops,keep_ratio=0.25",
        *mc, tasks="prunekit_shapes_mc", launcher=launcher)
    # data parallel on two CPU processes (gloo): accelerate takes CPUs for data parallel with ACCELERATE_USE_CPU
    jobs["data_parallel"] = functools.partial(
        _launch, task, tmp / "out" / "data_parallel", f"pretrained={bundled.MODEL_DIR},{COMMON},method=tops,"
        f"keep_ratio={BUDGET},positions=renumber", launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                            "-m", "lmms_eval"), env={"ACCELERATE_USE_CPU": "1"})
    codes = _run_all(jobs)
    return tmp, codes


@needs_lmms
@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_every_family_runs_end_to_end_in_its_own_wrapper_and_prunes(family_runs, family):
    tmp, codes = family_runs
    out = tmp / "out" / family
    log = (out / "log.txt").read_text()
    assert codes[family] == 0, log[-3000:]
    assert "in generating" not in log and "EvaluationAborted" not in log, log[-3000:]
    assert f"in {FAMILY_RUNS[family][1]}:" in log  # the summary names the wrapper that ran
    results, samples = _results(out)
    assert len(samples) == FAMILY_LIMIT
    method = FAMILY_RUNS[family][0].split(",")[0].split("=")[1]
    for s in samples:
        answer = s["filtered_resps"]
        assert isinstance(answer, str) and answer.strip(), s  # an answer was generated, not "" from an error
        r = s["token_counts"][0]["prunekit"]
        assert r["method"] == method and r["enabled"] and r["stages"], r
        assert 0 < r["layer_average"] < r["visual_tokens"], r
        assert r["prefill_flops"] < r["prefill_flops_unpruned"], r
    summary = results["throughput"]
    assert summary["avg_prunekit_requests"] == FAMILY_LIMIT
    assert summary["avg_prunekit_prefill_flops_percent"] < 100


# -- multiple choice: log-likelihood requests -------------------------------------------------------------------------
@needs_lmms
def test_loglikelihood_requests_are_pruned_and_recorded_or_the_run_fails_saying_why(family_runs):
    tmp, codes = family_runs
    out = tmp / "out" / "mc_llava"
    log = (out / "log.txt").read_text()
    if codes["mc_llava"] == 0:  # lmms-eval's llava_hf scored every choice on the pruned prefill
        summary = json.loads(Path(glob.glob(str(out / "*" / "*_results.json"))[0]).read_text())["throughput"]
        assert summary["avg_prunekit_requests"] > 0 and summary["avg_prunekit_layer_average"] < 144
    else:  # lmms-eval 0.7.3's llava_hf.loglikelihood calls the processor with "<image>" but no image, which
        # transformers 5 refuses: the run fails with that message (exit 1), it does not score empty answers
        assert "EvaluationAborted" in log and "LlavaHf.loglikelihood failed" in log, log[-3000:]
        assert not glob.glob(str(out / "*" / "*_results.json"))
    # a wrapper without log-likelihood (lmms-eval's Qwen wrappers) fails the run with the reason
    log = (tmp / "out" / "mc_qwen2_5_vl" / "log.txt").read_text()
    assert codes["mc_qwen2_5_vl"] != 0
    assert "Qwen2_5_VL (lmms-eval's wrapper for this model) has no loglikelihood" in log, log[-3000:]


@needs_lmms
def test_a_labelled_forward_scores_the_continuation_on_the_pruned_prefill():
    """What a wrapper's ``loglikelihood`` gets from ``model(**inputs, labels=labels)`` on a pruned model: unpruned,
    exactly the model's own loss and logits; pruned, the loss of the continuation from the pruned prefill's logits,
    which come back at full length with the kept rows at the end."""
    import torch

    import prunekit
    from prunekit.tools.data import ShapesVQA
    from prunekit.integrations.lmms_eval import _LabelledForward
    from prunekit.testing import assert_pruned

    model, processor = bundled.load()
    sample = next(iter(ShapesVQA("test", 1, seed=0)))
    inputs = processor(images=sample.image, text=f"{bundled.prompt(sample.question)} {sample.answer}",
                       return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -1] = inputs["input_ids"][:, -1]
    prunekit.build("tops", model, keep_ratio=BUDGET, positions="renumber")
    forward = _LabelledForward(model)
    with torch.no_grad():
        with prunekit.disabled(model):
            full = model(**inputs, labels=labels)
            ours = forward(**inputs, labels=labels)
        assert torch.allclose(ours.loss, full.loss, atol=1e-5) and torch.equal(ours.logits, full.logits)
        with pytest.raises(Exception, match="labels="):  # prunekit refuses labels on a pruned forward
            model(**inputs, labels=labels)
        pruned = forward(**inputs, labels=labels)
        assert_pruned(model)
        plain = model(**inputs).logits
    assert pruned.logits.shape == full.logits.shape and plain.shape[1] < full.logits.shape[1]
    assert torch.equal(pruned.logits[:, -plain.shape[1]:], plain)
    expected = torch.nn.functional.cross_entropy(plain[0, -2:-1], inputs["input_ids"][0, -1:])
    assert torch.allclose(pruned.loss, expected) and torch.isfinite(pruned.loss)


# -- data parallel ------------------------------------------------------------------------------------------------------
@needs_lmms
def test_data_parallel_splits_the_questions_and_gathers_every_record(family_runs, runs):
    """``torchrun --nproc_per_node 2 -m lmms_eval`` on CPUs: each process answers its share, the results file holds
    all 12 answers once, the accuracy is the single-process TOPS run's, and the summary gathers both ranks' records."""
    tmp, codes = family_runs
    out = tmp / "out" / "data_parallel"
    log = (out / "log.txt").read_text()
    assert codes["data_parallel"] == 0, log[-3000:]
    assert "EvaluationAborted" not in log
    results, samples = _results(out)
    assert sorted(s["doc_id"] for s in samples) == list(range(12))
    assert all(s["token_counts"][0]["prunekit"]["layer_average"] < 144 for s in samples)
    assert results["throughput"]["avg_prunekit_requests"] == 12
    single, _ = _results(runs[0] / "tops")
    key = "exact_match,none"
    assert results["results"]["prunekit_shapes"][key] == single["results"]["prunekit_shapes"][key]
    assert results["throughput"]["avg_prunekit_layer_average"] == pytest.approx(
        single["throughput"]["avg_prunekit_layer_average"])
