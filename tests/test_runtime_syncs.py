"""Host reads of a pruned prefill: each one drains a GPU's stream (the GPU waits for the next launches), so the
runtime reads the device only where a value must reach the host. Counted on CPU with prunekit.testing.count_ops
over one prefill of the tiny LLaVA (4 decoder layers, 64 visual tokens), for every registered method, against
ceilings recorded in one table: a change that adds a host read to the model path fails here, without a GPU.

What remains is listed in docs/performance.md (the counts that decide shapes, read once per prefill or stage, and
transformers' own checks); the greedy selections themselves read nothing (tests/test_selection_ops.py).
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.testing import count_decode_step, count_ops, tiny_llava, tiny_llava_inputs

#: host reads of one pruned prefill at keep_tokens=8 (nominal budgets; pdrop: 24, its schedule's least)
CEILINGS = {
    "cdpruner": 8, "dart": 9, "divprune": 8, "fastervlm": 8, "fastv": 7, "pdrop": 7, "pool": 8,
    "prumerge_plus": 12, "random": 8, "scope": 8, "sparsevlm": 9, "tops": 8, "trim": 8, "visionzip": 9,
    "vispruner": 8,
}
BUDGET = {"pdrop": 24}


def test_every_method_has_a_ceiling():
    assert sorted(CEILINGS) == sorted(prunekit.list_methods()), "record the host reads of every method in CEILINGS"


@pytest.mark.parametrize("method", prunekit.list_methods())
def test_a_pruned_prefill_reads_the_device_at_most_its_ceiling(method):
    torch.manual_seed(0)
    model = tiny_llava(num_layers=4)
    inputs = tiny_llava_inputs(model)
    prunekit.build(method, model, keep_tokens=BUDGET.get(method, 8), budget_meaning="nominal")
    with torch.no_grad():
        model(**inputs)  # first call: anything done once per model
        _, count = count_ops(lambda: model(**inputs))
    report = prunekit.pruning_report(model)
    assert report is not None and report.stages and any(c < 64 for s in report.stages for c in s.counts)
    assert count.syncs <= CEILINGS[method], (count.syncs, count.sync_names)


#: kernel-launching operations each extra sample adds to a pruned prefill of the tiny LLaVA (batch 4 minus batch 1,
#: over 3; every sample the same prompt). On a GPU each costs host time whatever its size: loops over the samples
#: are what made TOPS's batch-8 prefill host-bound (docs/performance.md), so the runtime works on the whole batch
#: where the samples' sizes agree. Measured, rounded up (a launch saved at batch 1 only, e.g. a view of one sample
#: where a batch is stacked, raises the difference: cdpruner, dart, fastv and pdrop rose so while both counts fell).
PER_SAMPLE = {
    "cdpruner": 13, "dart": 134, "divprune": 10, "fastervlm": 18, "fastv": 11, "pdrop": 28, "pool": 30,
    "prumerge_plus": 118, "random": 11, "scope": 17, "sparsevlm": 220, "tops": 35, "trim": 59, "visionzip": 85,
    "vispruner": 123,
}


def test_every_method_has_a_per_sample_ceiling():
    assert sorted(PER_SAMPLE) == sorted(prunekit.list_methods()), "record every method's launches in PER_SAMPLE"


@pytest.mark.parametrize("method", prunekit.list_methods())
def test_each_extra_sample_adds_at_most_its_ceiling_of_launches(method):
    from prunekit.tools.bench import model_inputs

    launches = {}
    for batch in (1, 4):
        torch.manual_seed(0)
        model = tiny_llava(num_layers=4)
        inputs = model_inputs(model, batch=batch)
        prunekit.build(method, model, keep_tokens=BUDGET.get(method, 8), budget_meaning="nominal")
        with torch.no_grad():
            model(**inputs)
            _, count = count_ops(lambda: model(**inputs))
        report = prunekit.pruning_report(model)
        assert report is not None and all(c < 64 for c in report.stages[0].counts)
        launches[batch] = count.launches
    assert (launches[4] - launches[1]) / 3 <= PER_SAMPLE[method], launches


@pytest.mark.parametrize("method", ["divprune", "visionzip", "tops"])
def test_after_a_pre_llm_stage_without_padding_the_language_model_reads_no_mask_back(method):
    """A batch without padding keeps none after a pre-LLM stage: the language model then gets no attention mask (as
    for any batch without padding), so transformers' causal-mask code has no all-ones mask to read back. Its other
    reads (the placeholder check) stay: one fewer than the unpatched model's."""
    from prunekit.tools.bench import model_inputs

    def scalar_reads(model, inputs):
        with torch.no_grad():
            model(**inputs)
            _, count = count_ops(lambda: model(**inputs))
        return count.by_name.get("aten::_local_scalar_dense", 0)

    torch.manual_seed(0)
    model = tiny_llava(num_layers=4)
    inputs = model_inputs(model, batch=2)
    unpatched = scalar_reads(model, inputs)
    prunekit.build(method, model, keep_tokens=8, budget_meaning="nominal")
    assert scalar_reads(model, inputs) == unpatched - 1
    assert prunekit.pruning_report(model).stages


@pytest.mark.parametrize("method", prunekit.list_methods())
def test_a_decode_step_after_a_pruned_prefill_reads_the_device_as_the_unpruned_model_does(method):
    # a decode step of generate at batch 1 is bound by the host: a read there stalls every token
    torch.manual_seed(0)
    model = tiny_llava(num_layers=4)
    inputs = tiny_llava_inputs(model)  # left-padded: the decode mask is mapped onto the pruned cache
    inputs = {k: v[:1] for k, v in inputs.items()}
    unpruned = count_decode_step(model, inputs).syncs
    prunekit.build(method, model, keep_tokens=BUDGET.get(method, 8), budget_meaning="nominal")
    pruned = count_decode_step(model, inputs).syncs
    report = prunekit.pruning_report(model)
    assert report is not None and report.stages and any(c < 64 for s in report.stages for c in s.counts)
    assert pruned <= unpruned, (method, pruned, unpruned)
