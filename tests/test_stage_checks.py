"""A method's indices are checked: out of range, negative or repeated indices raise PruningError naming the stage
and the sample. In a prefill the check of a batch of plain indices stays on the device and is read once at the end
of the language model's forward, with every other stage's (each read makes the host wait for a GPU's queue, right
after a selection for the whole selection); until then the indices are clamped into range, so nothing gathers
outside its rows. Without a call's list of checks (a stage run on its own) the check is read at once."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import PruningError
from prunekit.interfaces import Stage, StageContext
from prunekit.runtime.stages import choose, settle_checks
from prunekit.testing import assert_pruned, count_ops, tiny_llava
from prunekit.tools.bench import model_inputs
from prunekit_plugins.methods.random import RandomPruning

KEEP = 8


def _bad(kind: str):
    """A rule that keeps ``KEEP`` valid indices for the first sample and a bad set for the second."""
    calls = []

    def rule(cls, features, relevance, k, config):
        good = torch.arange(k, device=features.device)
        calls.append(None)
        if len(calls) % 2:  # the first sample of each stage
            return good
        bad = good.clone()
        if kind == "too_large":
            bad[-1] = features.shape[0]
        elif kind == "negative":
            bad[0] = -1
        else:  # repeated
            bad[1] = bad[0]
        return bad

    return classmethod(rule)


@pytest.mark.parametrize("kind", ["too_large", "negative", "repeated"])
@pytest.mark.parametrize("where", ["after_projector", "decoder_layer"])
def test_a_batch_of_bad_indices_raises_at_the_end_of_the_prefill(monkeypatch, kind, where):
    model = tiny_llava(num_layers=4)
    inputs = model_inputs(model, batch=2)
    extra = {"insertion_point": "decoder_layer", "layer": 2} if where == "decoder_layer" else {}
    prunekit.build("random", model, keep_tokens=40 if extra else KEEP, **extra)
    with torch.no_grad():
        model(**inputs)  # valid indices: no error, and pruned
    assert_pruned(model)
    monkeypatch.setattr(RandomPruning, "rule", _bad(kind))
    with pytest.raises(PruningError, match="random: method returned invalid or repeated indices for sample 1"):
        with torch.no_grad():
            model(**inputs)
    monkeypatch.undo()  # the next call starts with no checks of the failed one
    with torch.no_grad():
        model(**inputs)
    assert_pruned(model)


def test_the_stages_checks_are_read_once_for_the_prefill():
    """TOPS's three stages (batched plain indices): one read of the device for their checks, at the end."""
    model = tiny_llava(num_layers=4)
    inputs = model_inputs(model, batch=2)
    prunekit.build("tops", model, keep_tokens=KEEP, budget_meaning="nominal")
    with torch.no_grad():
        model(**inputs)
        _, count = count_ops(lambda: model(**inputs))
    assert len(assert_pruned(model).stages) == 3
    # the checks' one read; the others: the prefill's counts (the instruction's with them,
    # tests/test_instruction_counts.py) and the batch's repeated rows (a read per stage for its checks would make 5)
    assert count.by_name.get("Tensor.tolist", 0) == 1 + 1 + 1, count.by_name


def _context(n: int, keep: int) -> StageContext:
    stage = Stage(point="after_projector", keep=lambda _: keep, choose=lambda ctx: [])
    return StageContext(stage, [torch.randn(n, 4), torch.randn(n, 4)], [keep, keep], lambda name, opts: [])


def test_without_a_list_of_checks_a_stage_reads_its_check_at_once():
    ctx = _context(6, 3)
    stage = Stage(point="after_projector", keep=lambda _: 3, choose=lambda c: [torch.tensor([0, 1, 2]),
                                                                               torch.tensor([4, 5, 6])])
    with pytest.raises(PruningError, match="after_projector: method returned invalid or repeated indices for sample 1"):
        choose(stage, ctx)
    checks: list = []
    kept, *_ = choose(stage, ctx, checks)  # deferred: in range until read
    assert [k.tolist() for k in kept] == [[0, 1, 2], [4, 5, 5]] and len(checks) == 1
    with pytest.raises(PruningError, match="for sample 1"):
        settle_checks(checks)
    assert checks == []
    settle_checks(checks)  # nothing left to read
