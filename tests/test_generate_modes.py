"""Every way people call ``generate`` (and forward) on a patched model either works, equal to an exact reference,
or raises a PruningError that names the option and says what to do."""

import copy
import pickle
import threading

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.registry import registry
from prunekit.testing import assert_pruned, batch_of, prunable_points, tiny_adapter_model, tiny_llava

from generate_reference import generate_with_features, short_prompt

GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
PRE_LLM = dict(keep_ratio=0.5, insertion_points=["after_projector"])  # renumbered positions on LLaVA


def llava():
    return tiny_adapter_model("llava")


points_of = prunable_points


def beam_rows(rows):
    """Before 5.18 transformers repeats each *image* for the beams, not each prompt's images, so prompts with
    several images get the wrong ones (unpatched too); those releases are tested on one-image prompts."""
    return rows if C.MODEL_ENCODER_OUTPUTS.key else rows[:1]


def ratio(name):
    return 0.7 if points_of(name) == ["decoder_layer"] else 0.4


# -- modes that work ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [
    dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2),
], ids=["beams", "beams+returned", "sampling+returned"])
def test_beams_returned_sequences_and_sampling_equal_the_short_prompt(mode):
    """generate encodes each prompt's images once and repeats the rows: every repeated row prunes alike, and the
    result equals the unpatched model on the prompt without the dropped tokens."""
    model, rows = llava()
    row = beam_rows(rows)[-1]
    prunekit.build("tops", model, **PRE_LLM)
    torch.manual_seed(0)
    out = model.generate(**row, **{**GEN, **mode})
    report = prunekit.pruning_report(model)
    kept = report.stages[0].kept
    assert len(kept) > 1 and all(torch.equal(k, kept[0]) for k in kept)
    assert report.stages[0].counts[0] < report.visual_tokens[0]
    prunekit.remove(model)
    short, mask, per_image = short_prompt(model, row, kept[0])
    torch.manual_seed(0)
    ref = generate_with_features(model, short, mask, per_image, row["pixel_values"], **{**GEN, **mode})
    assert out.sequences[:, -4:].tolist() == ref.sequences[:, -4:].tolist()
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", registry.names("adapters"))
def test_beams_prune_every_repeated_row_as_its_prompt(name):
    """On every adapter, before and inside the LLM: with beams and returned sequences each repeated row keeps
    exactly what its prompt keeps in a greedy run."""
    model, rows = tiny_adapter_model(name)
    inputs = batch_of(model, beam_rows(rows))
    prunekit.build("tops", model, keep_ratio=ratio(name), insertion_points=points_of(name))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    greedy = prunekit.pruning_report(model)
    model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    beams = prunekit.pruning_report(model)
    assert greedy.stages and len(beams.stages) == len(greedy.stages)
    for g, b in zip(greedy.stages, beams.stages):
        assert len(b.kept) == 2 * len(g.kept)
        for i, k in enumerate(b.kept):
            assert torch.equal(k, g.kept[i // 2]), (name, g.label, i)
    prunekit.remove(model)


def _continue(model, out, follow, **gen):
    ids = torch.cat([out.sequences, follow.expand(out.sequences.shape[0], -1)], 1)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          **{C.MODEL_CACHE.key: C.OUTPUT_CACHE.get(out)}, **gen)


def test_a_continued_conversation_equals_the_short_prompt():
    """generate(whole conversation + follow-up, cache=the returned cache) continues from the pruned cache and
    returns the whole conversation, as the unpatched model does on the short prompt."""
    model, rows = llava()
    row = rows[1]
    follow = torch.tensor([[5, 6, 7]])
    prunekit.build("tops", model, **PRE_LLM)
    out = model.generate(**row, **GEN)
    kept = assert_pruned(model).stages[0].kept[0]
    out2 = _continue(model, out, follow, **GEN)
    prunekit.remove(model)
    short, mask, per_image = short_prompt(model, row, kept)
    ref = generate_with_features(model, short, mask, per_image, row["pixel_values"], **GEN)
    ref2 = _continue(model, ref, follow, **GEN)
    assert out2.sequences.shape[1] == out.sequences.shape[1] + 3 + 4  # the whole conversation comes back
    assert torch.equal(out2.sequences[:, : out.sequences.shape[1] + 3],
                       torch.cat([out.sequences, follow], 1))
    assert out2.sequences[:, -4:].tolist() == ref2.sequences[:, -4:].tolist()
    for a, b in zip(out2.scores, ref2.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_continued_conversation_with_in_llm_pruning_is_the_same_either_way(deep_model):
    """In-LLM stages (TOPS's default schedule): passing the whole conversation or only the new tokens (with the
    whole mask) continues alike, on a padded batch."""
    model = deep_model
    inputs = prunekit.testing.tiny_llava_inputs(model)
    follow = torch.tensor([[5, 6, 7]])
    prunekit.build("tops", model, keep_ratio=0.5)
    results = []
    for whole in (True, False):
        out = model.generate(**inputs, **GEN)
        assert any(s.layer is not None for s in assert_pruned(model).stages)
        ids = torch.cat([out.sequences, follow.expand(2, -1)], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                                dtype=torch.long)], 1)
        given = ids if whole else ids[:, out.sequences.shape[1]:]
        out2 = model.generate(input_ids=given, attention_mask=mask,
                              **{C.MODEL_CACHE.key: C.OUTPUT_CACHE.get(out)}, **GEN)
        results.append(out2.sequences[:, -4:])
    assert torch.equal(results[0], results[1])


def test_an_older_cache_still_decodes_after_another_prompt():
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    follow = torch.tensor([[5, 6, 7]])
    a = model.generate(**rows[0], **GEN)
    alone = _continue(model, a, follow, **GEN).sequences
    a = model.generate(**rows[0], **GEN)
    model.generate(**rows[1], **GEN)  # another prompt in between
    assert_pruned(model)
    assert torch.equal(_continue(model, a, follow, **GEN).sequences, alone)
    prunekit.remove(model)


# -- modes that are refused, naming the option ----------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("use_cache", False), ("cache_implementation", "static"), ("prefill_chunk_size", 8),
    ("prompt_lookup_num_tokens", 3),
])
def test_generate_options_a_pruned_prompt_cannot_serve_are_refused(option, value):
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    with pytest.raises(prunekit.PruningError, match=rf"generate\({option}={value!r}\)"):
        model.generate(**rows[0], max_new_tokens=2, do_sample=False, **{option: value})
    with prunekit.disabled(model):  # unpruned, everything is the model's own business
        if option != "prompt_lookup_num_tokens":
            model.generate(**rows[0], max_new_tokens=2, do_sample=False, **{option: value})
    prunekit.remove(model)


def test_a_static_cache_passed_by_hand_is_refused():
    from transformers import StaticCache

    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=256)
    with pytest.raises(prunekit.PruningError, match="StaticCache"):
        model(**rows[0], **{C.MODEL_CACHE.key: cache})
    prunekit.remove(model)


def test_a_forward_with_labels_is_refused_and_works_when_disabled():
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    with pytest.raises(prunekit.PruningError, match="labels="):
        model(**rows[0], labels=rows[0]["input_ids"])
    with prunekit.disabled(model):
        assert torch.isfinite(model(**rows[0], labels=rows[0]["input_ids"]).loss)
    prunekit.remove(model)


def test_gradient_checkpointing_with_in_llm_pruning_is_refused():
    model = tiny_llava(num_layers=4)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # renamed in 5.24
    model.train()
    rows = prunekit.testing.tiny_llava_inputs(model)
    prunekit.build("fastv", model, keep_ratio=0.7)
    with torch.enable_grad(), pytest.raises(prunekit.PruningError, match="gradient checkpointing"):
        model(**rows)
    prunekit.build("tops", model, **PRE_LLM)  # before the LLM only: training works
    with torch.enable_grad():
        model(**rows).logits.sum().backward()
    assert_pruned(model)
    prunekit.remove(model)


def test_inputs_embeds_without_placeholders_are_refused():
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    embeds = model.get_input_embeddings()(torch.tensor([[3, 4, 5, 6]]))
    with pytest.raises(prunekit.PruningError, match="inputs_embeds"):
        model(inputs_embeds=embeds)
    with prunekit.disabled(model):
        model(inputs_embeds=embeds)
    prunekit.remove(model)


# -- state: inspect, threads, copies ---------------------------------------------------------------------------

def test_inspect_reports_a_disabled_call():
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    model.generate(**rows[0], max_new_tokens=2, do_sample=False)
    assert_pruned(model)
    with prunekit.disabled(model):
        model.generate(**rows[1], max_new_tokens=2, do_sample=False)
    report = prunekit.pruning_report(model)
    assert not report.enabled and not report.stages and "disabled" in str(report)
    assert report.visual_tokens == [int((rows[1]["input_ids"] == model.config.image_token_id).sum())]
    prunekit.remove(model)


def test_one_patched_model_serves_several_threads():
    """Per-call state is per thread: concurrent generate calls give what each gives alone."""
    model, rows = llava()
    prunekit.build("tops", model, keep_ratio=0.5)
    alone = [model.generate(**r, max_new_tokens=3, do_sample=False) for r in rows]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(model.generate(**rows[i % 2], max_new_tokens=3, do_sample=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with torch.no_grad():
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert_pruned(model)
    for i, outs in results.items():
        for out in outs:
            assert torch.equal(out, alone[i % 2])
    prunekit.remove(model)


def test_a_deepcopy_is_independently_patched():
    model = tiny_llava(num_layers=4)
    inputs = prunekit.testing.tiny_llava_inputs(model)
    unpatched = model(**inputs).logits
    prunekit.build("tops", model, keep_ratio=0.5)
    pruned = model(**inputs).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(**inputs).logits, pruned)
    prunekit.remove(model)  # the copy keeps its patch
    assert torch.equal(model(**inputs).logits, unpatched)
    assert torch.equal(twin(**inputs).logits, pruned)
    assert_pruned(twin)
    with torch.no_grad():  # the copy encodes with its own tower
        for p in model.model.vision_tower.parameters():
            p.add_(1.0)
    assert torch.equal(twin(**inputs).logits, pruned)
    prunekit.remove(twin)
    assert torch.equal(twin(**inputs).logits, unpatched)


def test_pickling_a_patched_model_says_what_to_do():
    model = tiny_llava(num_layers=4)
    prunekit.build("tops", model, keep_ratio=0.5)
    with pytest.raises(prunekit.PruningError, match="cannot be pickled.*prunekit.remove"):
        pickle.dumps(model)
