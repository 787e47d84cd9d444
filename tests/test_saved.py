"""A pruning configuration saved with a model (config.json's ``prunekit`` block) and applied by ``build(model)``."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.tools import bundled
from prunekit.tools.data import ShapesVQA
from prunekit.saved import FORMAT, read_block, saved_config
from prunekit.testing import assert_pruned


def test_save_pretrained_carries_the_block_and_build_model_applies_it(tmp_path):
    model, processor = bundled.load()
    block = prunekit.save_config(model, "tops", keep_tokens=16, positions="renumber")
    assert block == {"format": FORMAT, "method": "tops", "options": {"keep_tokens": 16, "positions": "renumber"}}
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["prunekit"] == block
    assert read_block(tmp_path) == block

    loaded, processor = bundled.load(tmp_path)
    prunekit.build(loaded)
    sample = ShapesVQA("test", 1)[0]
    inputs = processor(images=sample.image, text=bundled.prompt(sample.question), return_tensors="pt")
    with torch.no_grad():
        loaded.generate(**inputs, max_new_tokens=1, do_sample=False)
    report = assert_pruned(loaded)
    assert report.method == "tops" and report.budget == [16.0]


def test_save_config_of_a_patched_model_and_overrides():
    model, _ = bundled.load()
    prunekit.build("fastv", model, keep_tokens=24, budget_meaning="layer_average")
    block = prunekit.save_config(model)
    assert block["method"] == "fastv" and block["options"] == {"keep_tokens": 24, "budget_meaning": "layer_average"}
    config = saved_config(model, keep_tokens=8)
    assert config.keep_tokens == 8 and config.budget_meaning == "layer_average"


def test_errors_name_what_is_wrong():
    model, _ = bundled.load()
    with pytest.raises(ValueError, match="no 'prunekit' block"):
        prunekit.build(model)
    with pytest.raises(ValueError, match="not patched"):
        prunekit.save_config(model)
    with pytest.raises(ValueError, match="keep_tokenz"):
        prunekit.save_config(model, "tops", keep_tokenz=3)
    model.config.prunekit = {"format": 99, "method": "tops", "options": {}}
    with pytest.raises(ValueError, match="format 99"):
        prunekit.build(model)
