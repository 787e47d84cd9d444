"""prunekit eval: the statistics, the ablation set, and every registered method through the whole pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunekit
from prunekit.tools import bundled
from prunekit.tools import evaluation as ev
from prunekit.tools.data import ShapesVQA


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A random-weight model with the bundled architecture (smaller), saved and reloaded like a user's model."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = bundled.build_config(vision_layers=1, vision_width=32, text_layers=8, text_width=64, text_heads=2)
    path = tmp_path_factory.mktemp("tiny-shapes")
    LlavaForConditionalGeneration._from_config(config).save_pretrained(path)
    bundled.build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_saved):
    return bundled.load(tiny_saved)


@pytest.fixture(scope="module")
def samples():
    return list(ShapesVQA("test", 8, seed=0))


def test_wilson_interval_known_values():
    lo, hi = ev.wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-4) and hi == pytest.approx(0.9448, abs=1e-4)
    assert ev.wilson(0, 10)[0] == 0.0 and ev.wilson(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in ev.wilson(0, 0))


def test_paired_difference_is_tighter_than_independent_intervals():
    base = [1] * 90 + [0] * 10
    hits = [1] * 88 + [0] * 12  # two answers flipped, the rest unchanged
    mean, lo, hi = ev.paired_difference(hits, base)
    assert mean == pytest.approx(-0.02) and lo < -0.02 < hi
    assert hi - lo < (ev.wilson(90, 100)[1] - ev.wilson(90, 100)[0]) / 2
    assert ev.paired_difference(base, base) == (0.0, 0.0, 0.0)


def test_tops_ablations_are_the_seven_principle_subsets():
    variants = ev.tops_ablations()
    subsets = {frozenset(v.overrides["principles"]) for v in variants}
    assert len(variants) == len(subsets) == 7
    assert frozenset(ev.PRINCIPLES) in subsets
    assert all(v.method == "tops" for v in variants)


def test_bad_arguments_name_the_field(tiny, samples):
    model, processor = tiny
    with pytest.raises(ValueError, match="methods must be registered"):
        ev.method_variants(["nope"])
    with pytest.raises(ValueError, match="positions must be among"):
        ev.evaluate(model, processor, samples, [], positions=["sideways"], progress=False)
    with pytest.raises(ValueError, match="budgets are fractions"):
        ev.evaluate(model, processor, samples, [], budgets=[48], progress=False)


@pytest.mark.parametrize("method", prunekit.list_methods())
def test_every_method_runs_through_eval(method, tiny, samples):
    """keep_ratio=1.0 prunes nothing: every answer and distribution equals the unpruned model's exactly. At a third
    of the tokens the method either runs and uses about that many, or says why it cannot."""
    model, processor = tiny
    results = ev.evaluate(model, processor, samples, ev.method_variants([method]), budgets=[1.0, 0.333],
                          positions=["renumber"], budget_meanings=["layer_average"], batch_size=4, progress=False)
    base, full, third = results
    assert base.label == "unpruned" and base.tokens == 144 and base.n == len(samples)
    assert full.status == "ok", full.status
    assert full.agreement == 1.0 and full.kl == 0.0 and full.accuracy == base.accuracy and full.tokens == 144
    assert full.delta == full.delta_low == full.delta_high == 0.0
    assert not prunekit.is_patched(model)
    if third.status != "ok":
        assert "out of reach" in third.status or "cannot" in third.status, third.status
        return
    assert 0 <= third.agreement <= 1 and third.kl >= 0 and 0 <= third.ci_low <= third.accuracy <= third.ci_high <= 1
    assert third.tokens == pytest.approx(0.333 * 144, abs=3)
    assert set(third.per_type) == {s.type for s in samples}
    assert full.flops_relative == pytest.approx(100.0) and third.gflops < full.gflops and third.flops_relative < 100


def test_both_budget_meanings_side_by_side(tiny, samples, tmp_path):
    """FastV's nominal T is the count kept from layer K on (more tokens on average than T); a method that prunes once
    before the LLM keeps the same under both meanings and is run once."""
    model, processor = tiny
    results = ev.evaluate(model, processor, samples, ev.method_variants(["fastv", "random"]), budgets=[0.333],
                          positions=["renumber"], budget_meanings=list(ev.BUDGET_MEANINGS), batch_size=8,
                          progress=False)
    by = {(r.label, r.budget_meaning): r for r in results[1:]}
    nominal, averaged = by["fastv", "nominal"], by["fastv", "layer_average"]
    assert nominal.status == averaged.status == "ok"
    assert averaged.tokens == pytest.approx(0.333 * 144, abs=3) and averaged.tokens < nominal.tokens
    assert averaged.gflops < nominal.gflops
    same, other = by["random", "nominal"], by["random", "layer_average"]
    assert same.hits == other.hits and same.tokens == other.tokens == pytest.approx(0.333 * 144, abs=1)
    text = ev.table(results) + ev.summary(results)
    assert "fastv (nominal)" in text and "fastv (layer_average)" in text and "GFLOPs" in text
    ev.write(results, tmp_path, {})
    assert "budget_meaning" in (tmp_path / "results.csv").read_text()


def test_both_position_modes_and_outputs(tiny, samples, tmp_path):
    model, processor = tiny
    results = ev.evaluate(model, processor, samples, ev.tops_ablations()[:2], budgets=[0.111],
                          batch_size=8, progress=False)
    assert [(r.label, r.positions) for r in results[1:]] == [
        (v.label, p) for v in ev.tops_ablations()[:2] for p in ev.POSITION_MODES]
    files = ev.write(results, tmp_path, {"note": "test"})
    assert {f.name for f in files} == {"results.json", "results.csv", "results.md", "accuracy.png"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"] == {"note": "test"} and len(data["results"]) == len(results)
    assert (tmp_path / "results.csv").read_text().count("\n") == len(results) + 1
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    summary = ev.summary(results).splitlines()
    assert summary[0].startswith("| method (renumber / original); unpruned") and "11.1% of the visual tokens" in summary[0]
    assert all("(16 tok)" in line for line in summary[2:])
    assert [line.split(" | ")[0] for line in summary[2:]] == ["| tops[R]", "| tops[C]"]
    assert ev.summary(results) in (tmp_path / "results.md").read_text()


def test_cli_eval_on_a_saved_model_and_a_jsonl_file(tiny_saved, samples, tmp_path, capsys):
    from prunekit.tools.cli import main

    lines = []
    for i, s in enumerate(samples[:4]):
        s.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": s.question, "answer": s.answer, "type": s.type}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_saved), "--data", str(tmp_path / "data.jsonl"), "--methods", "tops",
               "random", "--budgets", "0.222", "--positions", "original", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["label"], r["budget_meaning"]) for r in rows[1:]] == [
        (m, b) for m in ("tops", "random") for b in ("nominal", "layer_average")] and rows[0]["n"] == 4
    assert "| tops | 22.2% | nominal | original |" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path), "--quick"]) == 2  # no config.json there: a clear error
