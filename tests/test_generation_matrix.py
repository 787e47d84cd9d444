"""What works with what: every generation mode × every kind of method, each cell run here; docs/generation.md
shows this table (a test keeps the page equal to it). Exact references for the working modes are in
tests/test_generate_modes.py; here each cell checks that it prunes, or that it is refused by name."""

import copy
import pathlib
import threading

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs

#: kind of method -> (representative method, build options)
KINDS = {
    "before the LLM": ("divprune", dict(keep_ratio=0.5)),
    "inside the LLM": ("fastv", dict(keep_ratio=0.7)),
    "both (TOPS)": ("tops", dict(keep_ratio=0.5)),
    "merging": ("visionzip", dict(keep_ratio=0.5)),
}
WORKS, REFUSED = "works", "refused"


def greedy(model, inputs):
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert_pruned(model)


def sampling(model, inputs):
    model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
    assert_pruned(model)


def beams(model, inputs):
    model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert_pruned(model)
    kept = prunekit.pruning_report(model).stages[0].kept
    assert all(torch.equal(kept[i], kept[i - i % 2]) for i in range(len(kept)))


def continued(model, inputs):
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([out.sequences, torch.tensor([[5, 6]] * 2)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                            dtype=torch.long)], 1)
    again = model.generate(input_ids=ids, attention_mask=mask, **{C.MODEL_CACHE.key: C.OUTPUT_CACHE.get(out)},
                           max_new_tokens=3, do_sample=False)
    assert torch.equal(again[:, : ids.shape[1]], ids) and again.shape[1] == ids.shape[1] + 3
    assert_pruned(model)


def threads(model, inputs):
    alone = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    outs = []

    def run():
        with torch.no_grad():
            outs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))

    workers = [threading.Thread(target=run) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(outs) == 3 and all(torch.equal(o, alone) for o in outs)
    assert_pruned(model)


def deepcopy(model, inputs):
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(**inputs, max_new_tokens=3, do_sample=False),
                       model.generate(**inputs, max_new_tokens=3, do_sample=False))
    assert_pruned(twin)


def _refused(match, call):
    with pytest.raises(prunekit.PruningError, match=match):
        call()


def no_cache(model, inputs):
    _refused("use_cache=False", lambda: model.generate(**inputs, max_new_tokens=2, use_cache=False))


def static_cache(model, inputs):
    _refused("static", lambda: model.generate(**inputs, max_new_tokens=2, cache_implementation="static"))


def chunked_prefill(model, inputs):
    _refused("prefill_chunk_size", lambda: model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8))


def assisted(model, inputs):
    _refused("prompt_lookup_num_tokens", lambda: model.generate(**inputs, max_new_tokens=2,
                                                                 prompt_lookup_num_tokens=2))


def labels(model, inputs):
    _refused("labels=", lambda: model(**inputs, labels=inputs["input_ids"]))


def checkpointing(model, inputs):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    try:
        with torch.enable_grad():
            in_llm = any(s.layer is not None for s in prunekit.pruning_report(model).stages) if prunekit.pruning_report(
                model) else None
            if in_llm:
                _refused("gradient checkpointing", lambda: model(**inputs))
            else:
                model(**inputs).logits.sum().backward()
                assert_pruned(model)
    finally:
        model.eval()
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def pickling(model, inputs):
    import pickle

    _refused("cannot be pickled", lambda: pickle.dumps(model))


#: mode -> (what is done, what happens for every kind; "in-LLM refused": refused where a stage is in the LLM)
MODES = {
    "greedy, padded batch": (greedy, WORKS),
    "sampling": (sampling, WORKS),
    "beams + num_return_sequences": (beams, WORKS),
    "continue a conversation on the returned cache": (continued, WORKS),
    "one model, several threads": (threads, WORKS),
    "copy.deepcopy": (deepcopy, WORKS),
    "use_cache=False": (no_cache, REFUSED),
    "cache_implementation='static'": (static_cache, REFUSED),
    "prefill_chunk_size": (chunked_prefill, REFUSED),
    "assisted decoding": (assisted, REFUSED),
    "forward with labels=": (labels, REFUSED),
    "gradient checkpointing": (checkpointing, "works before the LLM; refused with in-LLM stages"),
    "pickle": (pickling, REFUSED),
}


@pytest.fixture(scope="module")
def deep():
    model = tiny_llava(num_layers=8)
    return model, tiny_llava_inputs(model)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_generation_mode_with_every_kind_of_method(deep, mode, kind):
    model, inputs = deep
    method, options = KINDS[kind]
    prunekit.build(method, model, **options)
    try:
        model(**inputs)  # a first prefill, so pruning_report() knows the stages
        MODES[mode][0](model, inputs)
    finally:
        prunekit.remove(model)


def table() -> str:
    head = "| mode | " + " | ".join(f"{k} (`{m}`)" for k, (m, _) in KINDS.items()) + " |"
    rows = [head, "|---|" + "---|" * len(KINDS)]
    for mode, (_, outcome) in MODES.items():
        if outcome == WORKS or outcome == REFUSED:
            cells = [outcome] * len(KINDS)
        else:
            cells = ["refused" if k in ("inside the LLM", "both (TOPS)") else "works" for k in KINDS]
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def test_the_docs_show_this_table():
    page = (pathlib.Path(__file__).parents[1] / "docs" / "generation.md").read_text()
    shown = page.split("<!-- matrix:start -->\n")[1].split("<!-- matrix:end -->")[0]
    assert shown == table(), "docs/generation.md is out of date: paste tests/test_generation_matrix.py:table()"
