"""The trained model that ships inside the package: it loads offline, answers as recorded, and drives eval and demo."""

from __future__ import annotations

import json

import pytest

import prunekit
from prunekit.tools import bundled
from prunekit.tools import evaluation as ev
from prunekit.tools.data import ShapesVQA


@pytest.fixture(scope="module")
def shipped():
    return bundled.load()


def record() -> dict:
    return json.loads((bundled.MODEL_DIR / "training.json").read_text())


def test_it_is_a_small_genuine_llava_with_a_cls_vit(shipped):
    from transformers import CLIPVisionModel, LlamaModel, LlavaForConditionalGeneration

    model, processor = shipped
    assert type(model) is LlavaForConditionalGeneration
    assert isinstance(model.model.vision_tower, CLIPVisionModel) and isinstance(model.model.language_model, LlamaModel)
    assert model.config.vision_feature_select_strategy == "default"  # [CLS] exists and is dropped before the LLM
    assert (bundled.MODEL_DIR / "model.safetensors").stat().st_size < 12 * 2**20
    assert record()["parameters"] == sum(p.numel() for p in model.parameters())
    assert prunekit.adapter_for(model).describe().num_layers == model.config.text_config.num_hidden_layers


def test_recorded_training_meets_the_floor():
    r = record()
    assert r["test_accuracy"]["all"] >= 0.75
    assert {"seed", "data", "train_seconds", "arguments"} <= set(r)


def test_it_answers_as_recorded(shipped):
    """A fresh slice of the test split, through processor and generate, agrees with the recorded accuracy."""
    model, processor = shipped
    samples = list(ShapesVQA("test", 120, seed=0))
    base = ev.evaluate(model, processor, samples, [], progress=False)[0]
    assert base.ci_low - 0.05 <= record()["test_accuracy"]["all"] <= base.ci_high + 0.05


def test_pruning_hurts_measurably_and_tops_keeps_more_than_random(shipped):
    model, processor = shipped
    samples = list(ShapesVQA("test", 120, seed=0))
    results = ev.evaluate(model, processor, samples, ev.method_variants(["tops", "random"]), budgets=[0.056],
                          positions=["original"], progress=False)
    base, tops, rand = results
    assert rand.accuracy < base.accuracy - 0.1
    assert tops.agreement > rand.agreement


def test_demo_answers_with_and_without_pruning_and_saves_the_picture(tmp_path, capsys):
    from prunekit.tools.cli import main

    picture = tmp_path / "kept.png"
    assert main(["demo", "--repeats", "1", "--picture", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "answer unpruned (144 visual tokens)" in out and "answer with tops keep_tokens=16" in out
    assert "prefill" in out and picture.stat().st_size > 1000


def test_eval_quick_on_the_bundled_model(tmp_path, capsys):
    from prunekit.tools.cli import main

    assert main(["eval", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert rows[0]["label"] == "unpruned" and len(rows) == 1 + 3 * 2 * 2 * 2  # methods x budgets x positions x meanings
    assert all(r["status"] == "ok" for r in rows)
