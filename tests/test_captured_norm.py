"""A stage inside the language model reads the normalised input of layer K-1 (its raters' attention rows, SparseVLM's
rater rule): the runtime keeps what the layer's own input norm made of it in the forward, instead of computing it
again. The kept tensor is the model's own output for that input, so it equals a recomputation bit for bit, and
removing the patch removes its hook."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.runtime import signals
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs


@pytest.mark.parametrize("method", ["tops", "fastv", "sparsevlm"])
def test_the_stage_reads_the_layers_own_input_norm(monkeypatch, method):
    taken = signals.normed_input
    first = {}  # (layer, states) -> whether the first look for it found the forward's own output

    def checked(call, layer, states):
        found = [normed for seen_layer, seen_states, normed in list(call.normed)  # (recomputing runs the hook)
                 if seen_layer is layer and seen_states is states]
        for normed in found:
            assert torch.equal(normed, C.INPUT_NORM.get(layer)(states))
        first.setdefault((id(layer), id(states)), bool(found))
        return taken(call, layer, states)

    monkeypatch.setattr(signals, "normed_input", checked)
    model = tiny_llava(num_layers=4)
    inputs = tiny_llava_inputs(model)
    prunekit.build(method, model, keep_tokens=8, budget_meaning="nominal")
    with torch.no_grad():
        model(**inputs)
    report = assert_pruned(model)
    assert len(first) >= sum(1 for s in report.stages if s.layer is not None) and all(first.values()), first


def test_removing_the_patch_removes_the_norms_hooks():
    model = tiny_llava(num_layers=4)
    norms = [C.INPUT_NORM.get(layer) for layer in model.model.language_model.layers]
    before = [dict(n._forward_hooks) for n in norms]
    prunekit.build("tops", model, keep_tokens=8, budget_meaning="nominal")
    assert any(len(n._forward_hooks) > len(b) for n, b in zip(norms, before))
    prunekit.remove(model)
    assert [dict(n._forward_hooks) for n in norms] == before
