"""prunekit.integrations.pre_llm: which methods a server that caches encoder outputs per image can run (read from
each method's plan), and that running a method's stages on one image's features keeps the tokens prunekit.build
keeps on the bundled model. Needs no server (tests/test_vllm.py serves the same with vLLM)."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tools import bundled
from prunekit.tools.data import ShapesVQA
from prunekit.integrations.pre_llm import ImagePruner, UnservableMethodError

#: what a server offers when it computes prunekit's [CLS] signals on a CLIP tower (as the vLLM integration does)
CLS = frozenset({"cls_attention", "keys", "cls_feature"})
K = 16


@pytest.fixture(scope="module")
def shipped():
    return bundled.load()


@pytest.fixture(scope="module")
def spec(shipped):
    return prunekit.adapter_for(shipped[0]).describe()


def pruner(method, spec, signals=CLS, **options):
    return ImagePruner(method, spec, server="a test server", signals=signals, options={"keep_tokens": K, **options})


@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm", "dart"])
def test_methods_that_prune_inside_the_llm_are_refused_naming_the_method_and_why(method, spec):
    with pytest.raises(UnservableMethodError, match=rf"method '{method}' .*prunes inside the language model"):
        pruner(method, spec)


def test_tops_with_its_in_llm_stage_is_refused_and_stage_one_alone_is_served(spec):
    with pytest.raises(UnservableMethodError, match=r"'tops' \(stage II.*inside the language model"):
        pruner("tops", spec)
    assert pruner("tops", spec, insertion_points=["after_projector"]).kept_count(144) == K


@pytest.mark.parametrize("method, signal", [("cdpruner", "text_embeddings"), ("trim", "text_similarity")])
def test_methods_that_read_the_question_are_refused(method, signal, spec):
    with pytest.raises(UnservableMethodError, match=rf"'{method}'.*reads the question \({signal}\).*query-agnostic"):
        pruner(method, spec)


def test_a_signal_the_server_does_not_compute_is_refused_naming_what_it_offers(spec):
    with pytest.raises(UnservableMethodError, match=r"'fastervlm'.*cls_attention.*offers: none"):
        pruner("fastervlm", spec, signals=frozenset())
    assert pruner("fastervlm", spec).kept_count(144) == K


def test_every_registered_method_is_either_served_or_refused_with_its_name(spec):
    served, refused = [], []
    for method in prunekit.list_methods():
        try:
            p = pruner(method, spec)
        except UnservableMethodError as e:
            assert repr(method) in str(e)
            refused.append(method)
        else:
            assert p.kept_count(144) == K and all(s.layer is None for s in p.stages)
            served.append(method)
    assert {"divprune", "pool", "random", "fastervlm", "vispruner", "visionzip"} <= set(served)
    assert {"fastv", "pdrop", "sparsevlm", "dart", "cdpruner", "trim", "tops"} <= set(refused)


def test_positions_and_budget_units_the_server_cannot_give_are_refused(spec):
    with pytest.raises(UnservableMethodError, match=r"positions='original' means 'original'.*'renumber' positions"):
        pruner("divprune", spec, positions="original")
    assert pruner("divprune", spec, positions="renumber").kept_count(144) == K
    with pytest.raises(UnservableMethodError, match=r"budget_per='crop'"):
        pruner("divprune", spec, budget_per="crop")
    assert pruner("divprune", spec, budget_per="image").budget_per == "image"
    assert pruner("divprune", spec).budget_per == "prompt"


def test_a_saved_block_is_read_and_validated_as_build_reads_it(spec):
    block = prunekit.saved.config_block("divprune", keep_tokens=K)
    assert ImagePruner.from_config({"prunekit": block}, spec, server="s", signals=CLS).kept_count(144) == K
    assert ImagePruner.from_config({}, spec, server="s") is None
    with pytest.raises(ValueError, match="keep_tokens"):
        ImagePruner.from_config({"prunekit": {**block, "options": {"keep_tokens": 0}}}, spec, server="s")
    original = prunekit.saved.config_block("divprune", keep_tokens=K, positions="original")
    with pytest.raises(UnservableMethodError, match="positions='original'"):
        ImagePruner.from_config({"prunekit": original}, spec, server="s", signals=CLS)


@pytest.mark.parametrize("method", ["divprune", "pool", "random"])
def test_stages_on_one_image_keep_the_tokens_build_keeps(method, shipped, spec):
    """The selection runs on the projected features the model computed, one image at a time, and keeps exactly the
    indices prunekit.build's report lists for the same prompt (and, for pool, the same merged values)."""
    model, processor = shipped
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.update(out=out))
    try:
        p = pruner(method, spec)
        prunekit.build(method, model, keep_tokens=K)
        for s in ShapesVQA("test", 4, seed=0):
            x = processor(images=s.image, text=bundled.prompt(s.question), return_tensors="pt")
            with torch.no_grad():
                model(**x)
            (stage,) = prunekit.pruning_report(model).stages
            kept = p.prune(captured["out"][0], grid=(bundled.GRID, bundled.GRID))
            assert kept.indices.numel() == K < bundled.GRID**2  # it pruned
            assert torch.equal(kept.indices, stage.kept[0])
            assert torch.equal(kept.merged, stage.merged[0])
            assert kept.rows.shape == (K, model.config.text_config.hidden_size)
    finally:
        hook.remove()
        prunekit.remove(model)


def test_a_plan_that_starts_at_the_vision_features_needs_the_projector(spec, shipped):
    p = pruner("divprune", spec, insertion_point="vision_features")
    feats = torch.randn(144, shipped[0].config.vision_config.hidden_size)
    with pytest.raises(ValueError, match="project="):
        p.prune(feats)
    kept = p.prune(feats, project=shipped[0].model.multi_modal_projector)
    assert kept.indices.numel() == K and kept.rows.shape[1] == shipped[0].config.text_config.hidden_size
    assert torch.equal(kept.indices, prunekit.select("divprune", feats[None], k=K)[0])
