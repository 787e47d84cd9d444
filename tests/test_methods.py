"""Every registered method on every registered adapter's tiny model: parametrised over the registry."""

import pytest
import torch

import prunekit
from prunekit import registry
from conftest import unpad_row

GEN = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("name", registry.names("methods"))
def test_method_keep_all_is_exact(model, inputs, name):
    ref = model(**inputs).logits
    prunekit.build(name, model, keep_ratio=1.0)
    assert torch.equal(model(**inputs).logits, ref)
    prunekit.remove(model)
    assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("name", registry.names("methods"))
@pytest.mark.parametrize("keep_tokens", [4, 16])
def test_method_generates_with_exact_counts(model, inputs, name, keep_tokens):
    prunekit.build(name, model, keep_tokens=keep_tokens)
    out = model.generate(**inputs, **GEN)
    report = prunekit.inspect(model)
    assert abs(report.layer_average[0] - keep_tokens) <= 1.0
    for stage in report.stages:
        assert len(set(stage.counts)) == 1
        for kept in stage.kept:
            assert kept.unique().numel() == kept.numel()
    again = model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, again.sequences)  # deterministic
    for b in range(2):
        alone = model.generate(**unpad_row(inputs, b), **GEN)
        assert out.sequences[b, -3:].tolist() == alone.sequences[0, -3:].tolist()


@pytest.mark.parametrize("name", registry.names("adapters"))
def test_every_adapter_names_its_insertion_points(name):
    adapter = registry.get("adapters", name)
    assert adapter.insertion_points <= set(registry.names("insertion_points"))
    assert adapter.model_classes
