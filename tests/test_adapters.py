"""Every registered adapter, on the tiny random model it builds from a config: batching, budgets per image, the
vision-side signals. A new adapter is tested here the moment it registers: it must build a tiny model (``tiny``)
and single-prompt inputs with different visual-token counts (``tiny_rows``). Keep-all exactness, disabling and
removal of every method on every adapter: tests/test_conformance.py.
"""

import types

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.config import MethodConfig
from prunekit.registry import registry
from prunekit.testing import assert_pruned, collate, registered, tiny_adapter_model

GEN = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
ADAPTERS = registry.names("adapters")


def tiny(name):
    return tiny_adapter_model(name)


def points_of(name):
    points = registry.get("adapters", name).insertion_points & {"after_projector", "decoder_layer"}
    if getattr(registry.get("adapters", name), "no_decoder_pruning", None):
        points = points - {"decoder_layer"}
    return sorted(points)


def ratio(points):
    """A budget every point set can reach on 4 decoder layers (in-LLM pruning alone cannot go low)."""
    return 0.3 if "after_projector" in points else 0.7


def assert_row_matches(model, batch, b, row, scores=True):
    """Row ``b`` of a batched ``generate`` equals ``row`` generated alone (tokens, and step scores)."""
    alone = model.generate(**row, **GEN)
    assert batch.sequences[b, -4:].tolist() == alone.sequences[0, -4:].tolist()
    if scores:
        for step_batch, step_alone in zip(batch.scores, alone.scores):
            torch.testing.assert_close(step_batch[b], step_alone[0], rtol=1e-4, atol=1e-4)


def batch_of(model, rows):
    return collate(rows, pad_token_id=model.config.get_text_config().pad_token_id or 0)


@pytest.mark.parametrize("name", ADAPTERS)
def test_rows_differ_in_visual_tokens(name):
    model, rows = tiny(name)
    adapter = prunekit.adapter_for(model)
    ids = adapter.visual_token_ids()
    counts = [int(torch.isin(r["input_ids"], torch.tensor(ids)).sum()) for r in rows]
    assert len(rows) >= 2 and len(set(counts)) == len(counts), counts


@pytest.mark.parametrize("name", ADAPTERS)
def test_padded_batch_equals_rows_alone(name):
    """Rows with different visual-token counts (and several images in the last) give what they give alone."""
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    prunekit.build("tops", model, keep_ratio=ratio(points_of(name)), insertion_points=points_of(name))
    batch = model.generate(**inputs, **GEN)
    kept = [s.kept for s in prunekit.pruning_report(model).stages]
    counts = [s.counts for s in prunekit.pruning_report(model).stages]
    assert all(len(set(c)) > 1 for c in counts[:2]), counts  # the rows really keep different numbers
    for b, row in enumerate(rows):
        assert_row_matches(model, batch, b, row)
        for stage_kept, stage in zip(kept, prunekit.pruning_report(model).stages):
            assert stage_kept[b].tolist() == stage.kept[0].tolist()
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ADAPTERS)
def test_a_batch_of_rows_of_one_size_runs_batched_and_equals_the_row_alone(name, monkeypatch):
    """Rows of the same sizes take the runtime's batched path (one set of operations for the batch: a stage's
    check, the kept rows, the decoder signals): each row keeps and answers what it does alone."""
    from prunekit.runtime import stages

    batched = []
    whole_batch = stages._choose_batch
    monkeypatch.setattr(stages, "_choose_batch", lambda *a: batched.append(whole_batch(*a)) or batched[-1])
    model, rows = tiny(name)
    # the same prompt with other pixels: the same sizes, other tokens kept (a mix-up between rows would show)
    noise = torch.Generator().manual_seed(0)
    other = {key: value + torch.randn(value.shape, generator=noise).to(value.dtype) if key.startswith("pixel_values")
             else value for key, value in rows[0].items()}
    prunekit.build("tops", model, keep_ratio=ratio(points_of(name)), insertion_points=points_of(name))
    batch = model.generate(**batch_of(model, [rows[0], other]), **GEN)
    report = prunekit.pruning_report(model)
    kept = [s.kept for s in report.stages]
    assert report.stages and all(c < n for c, n in zip(report.stages[-1].counts, report.visual_tokens))
    assert any(b is not None for b in batched)  # the batch was chosen at once
    if name != "gemma3":  # its tiny model's image features are all zero: every image keeps the same tokens
        assert any(k[0].tolist() != k[1].tolist() for k in kept)  # the rows differ
    for b, row in enumerate([rows[0], other]):
        assert_row_matches(model, batch, b, row)
        for stage_kept, stage in zip(kept, prunekit.pruning_report(model).stages):
            assert stage_kept[b].tolist() == stage.kept[0].tolist()


@pytest.mark.parametrize("name", ADAPTERS)
def test_pruned_forward_then_decode_equals_generate(name):
    """A plain forward (no position ids) and a decode step on its returned cache give generate's logits."""
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    prunekit.build("tops", model, keep_ratio=ratio(points_of(name)), insertion_points=points_of(name))
    gen = model.generate(**inputs, **GEN)
    out = model(**inputs)
    torch.testing.assert_close(out.logits[:, -1], gen.scores[0], rtol=1e-4, atol=1e-4)
    if registry.get("adapters", name).rope == "mrope":
        return  # transformers' Qwen-VL cannot decode on a returned cache without position ids, even unpatched
    token = gen.sequences[:, -4:-3]  # the first generated token, fed back by hand on the returned cache
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
    step = model(input_ids=token, attention_mask=mask, **{C.MODEL_CACHE.key: C.OUTPUT_CACHE.get(out)})
    torch.testing.assert_close(step.logits[:, -1], gen.scores[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llava", "llava_onevision", "video_llava"])
def test_budget_per_image_keeps_the_count_in_every_image_and_frame(name):
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    hooks_units = []
    prunekit.build("tops", model, schedule=[3], insertion_points=["after_projector"], budget_per="image")
    patch = model.__dict__["_prunekit_patch"]
    original = patch.hooks.units
    patch.hooks.units = lambda counts: hooks_units.append(original(counts)) or hooks_units[-1]
    batched = model.generate(**inputs, **GEN)
    report = prunekit.pruning_report(model)
    units = hooks_units[0]
    assert any(len(u) > 1 for u in units)  # several images, or a video's frames
    for b, sizes in enumerate(units):
        assert sum(sizes) == report.visual_tokens[b]
        starts = torch.tensor([0] + sizes).cumsum(0)
        kept = report.stages[0].kept[b]
        per_unit = [int(((kept >= lo) & (kept < hi)).sum()) for lo, hi in zip(starts[:-1], starts[1:])]
        assert per_unit == [min(3, s) for s in sizes]
    for b, row in enumerate(rows):  # still batch-invariant
        assert_row_matches(model, batched, b, row, scores=False)


def test_an_encoding_call_outside_the_forward_is_not_taken_for_the_prompts():
    model, rows = tiny("llava_next")
    prunekit.build("tops", model, keep_ratio=0.3, insertion_points=["after_projector"])
    ref = model(**rows[0]).logits
    other = rows[1]
    model.model.get_image_features(pixel_values=other["pixel_values"], image_sizes=other["image_sizes"])
    assert torch.equal(model(**rows[0]).logits, ref)


VISION_FEATURE_ADAPTERS = [n for n in ADAPTERS if "vision_features" in registry.get("adapters", n).insertion_points]


@pytest.mark.parametrize("name", VISION_FEATURE_ADAPTERS)
@pytest.mark.parametrize("method", ["fastervlm", "visionzip"])
def test_vision_features_point_keep_all_and_batch(name, method):
    """At vision_features: keep-all is bit-exact; merged values (VisionZip) batch like rows alone. Where the
    [CLS] feature cannot go through the projector (InternVL's pixel shuffle), VisionZip's default ('auto') runs
    without it and an explicit cls_token=True refuses, naming the signal and the model."""
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    ref = model(**inputs).logits
    options = {}
    if method == "visionzip" and prunekit.adapter_for(model).cls_feature_unavailable() is not None:
        with pytest.raises(prunekit.PruningError, match=f"'cls_feature'.*{type(model).__name__}"):
            prunekit.build(method, model, keep_ratio=0.3, cls_token=True)
        assert not prunekit.is_patched(model)
    prunekit.build(method, model, keep_ratio=1.0, **options)
    assert torch.equal(model(**inputs).logits, ref)
    prunekit.build(method, model, keep_ratio=0.3, **options)
    batch = model.generate(**inputs, **GEN)
    assert_pruned(model)
    assert any(m.any() for m in prunekit.pruning_report(model).stages[0].merged) == (method == "visionzip")
    for b, row in enumerate(rows):
        assert_row_matches(model, batch, b, row)


def test_smolvlm_is_served_by_the_idefics3_adapter():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    tiny_idefics = registry.get("adapters", "idefics3").tiny()
    config = SmolVLMConfig(vision_config=tiny_idefics.config.vision_config.to_dict(),
                           text_config=tiny_idefics.config.text_config.to_dict(), image_token_id=120, scale_factor=2)
    model = SmolVLMForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    rows = registry.get("adapters", "idefics3").tiny_rows(model)
    inputs = batch_of(model, rows)
    ref = model(**inputs).logits
    prunekit.build("tops", model, keep_ratio=0.3)
    batch = model.generate(**inputs, **GEN)
    for b, row in enumerate(rows):
        assert_row_matches(model, batch, b, row, scores=False)
    prunekit.remove(model)
    assert torch.equal(model(**inputs).logits, ref)


def test_unpadded_batch_whose_rows_keep_different_counts():
    """Rows of equal length (the model passes no mask) that keep different counts inside the LLM: the padding
    prunekit adds must be masked by a mask prunekit builds, in the prefill and in decode steps."""
    from prunekit.testing import tiny_llava_inputs

    model, _ = tiny("llava")
    one = tiny_llava_inputs(model, batch=1, left_pad=(0,), images_per_row=1, question=tuple(range(5, 72)))
    two = tiny_llava_inputs(model, batch=1, left_pad=(0,), images_per_row=2, seed=2)
    assert one["input_ids"].shape == two["input_ids"].shape
    rows = [one, two]
    inputs = {k: torch.cat([r[k] for r in rows]) for k in one}
    prunekit.build("tops", model, keep_ratio=0.7, insertion_points=["decoder_layer"])
    batch = model.generate(**{k: v for k, v in inputs.items() if k != "attention_mask"}, **GEN)
    assert len(set(prunekit.pruning_report(model).stages[0].counts)) == 2
    for b, row in enumerate(rows):
        assert_row_matches(model, batch, b, {"input_ids": row["input_ids"], "pixel_values": row["pixel_values"]})


def test_gemma3_pruned_generate_equals_the_shorter_prompt():
    """Pre-LLM pruning on Gemma3 = the unpatched model on the prompt without the dropped image tokens: its own
    masks (sliding window, bidirectional image blocks) are rebuilt for the shorter sequence, in every step."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, rows = tiny("gemma3")
    row = rows[1]  # two images
    prunekit.build("tops", model, keep_ratio=0.3, insertion_points=["after_projector"])
    out = model.generate(**row, **GEN)
    kept = prunekit.pruning_report(model).stages[0].kept[0]
    prunekit.remove(model)
    ids = row["input_ids"][0]
    visual = ids == model.config.image_token_index
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    feats = model.model.get_image_features(pixel_values=row["pixel_values"]).pooler_output.flatten(0, 1)[kept]
    short = ids[keep][None]
    encoded = BaseModelOutputWithPooling(pooler_output=feats[None])
    common = dict(input_ids=short, attention_mask=torch.ones_like(short),
                  token_type_ids=(short == model.config.image_token_index).long(), **GEN)
    if C.MODEL_ENCODER_OUTPUTS.key:  # releases whose generate takes images already encoded
        ref = model.generate(**common, **{C.MODEL_ENCODER_OUTPUTS.key: {"image": encoded}})
    else:  # older ones: the reference model's encoder returns the kept features
        model.model.get_image_features = lambda *a, **k: encoded
        try:
            ref = model.generate(**common, pixel_values=row["pixel_values"])
        finally:
            del model.model.get_image_features
    assert out.sequences[0, -4:].tolist() == ref.sequences[0, -4:].tolist()
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gemma3_refuses_in_llm_pruning_and_says_why():
    model, _ = tiny("gemma3")
    with pytest.raises(ValueError, match="sliding-window"):
        prunekit.build("fastv", model, keep_ratio=0.5)
    assert not prunekit.is_patched(model)


ATTENTION_ADAPTERS = [n for n in ADAPTERS if registry.get("adapters", n)(tiny(n)[0]).feature_attention_module()]


@pytest.mark.parametrize("name", ATTENTION_ADAPTERS)
def test_attention_received_relevance_runs_and_batches(name):
    """TOPS with the no-[CLS] relevance read from the encoder: keep-all exact, batch == rows."""
    model, rows = tiny(name)
    inputs = batch_of(model, rows)
    ref = model(**inputs).logits
    prunekit.build("tops", model, keep_ratio=1.0, insertion_points=["after_projector"],
                   projector_relevance="attention_received")
    assert torch.equal(model(**inputs).logits, ref)
    prunekit.build("tops", model, keep_ratio=0.3, insertion_points=["after_projector"],
                   projector_relevance="attention_received")
    batch = model.generate(**inputs, **GEN)
    for b, row in enumerate(rows):
        assert_row_matches(model, batch, b, row, scores=False)


def test_attention_received_matches_eager_attention():
    from test_llava import _eager_copy

    model, rows = tiny("llava")
    seen = []
    prunekit.build("tops", model, keep_ratio=0.3, insertion_points=["after_projector"],
                   projector_relevance="attention_received")
    patch = model.__dict__["_prunekit_patch"]
    original = patch.hooks.projector_signal
    patch.hooks.projector_signal = lambda *a: seen.append(original(*a)) or seen[-1]
    model(**rows[0])
    eager = _eager_copy(model).model.vision_tower(rows[0]["pixel_values"], output_attentions=True)
    attn = eager.attentions[model.config.vision_feature_layer]  # [1, H, L, L], [CLS] first
    torch.testing.assert_close(seen[0][0], attn[0, :, 1:, 1:].mean((0, 1)), rtol=1e-5, atol=1e-7)


# --- vision-side signals: the [CLS] feature, and the layer after the feature layer --------------------------------
class SignalProbe(prunekit.plugin.Method):
    """Keeps every token and records the vision signals in ``READ`` ((name, options) pairs)."""

    name = "signal_probe"
    Config = MethodConfig
    READ: list = []
    SEEN: list = []

    def plan(self, spec):
        def choose(ctx):
            SignalProbe.SEEN.append([ctx.relevance(name, **options) for name, options in SignalProbe.READ])
            return [torch.arange(f.shape[0]) for f in ctx.features]

        signals = tuple(dict.fromkeys(name for name, _ in SignalProbe.READ))
        return [prunekit.plugin.Stage(point="after_projector", keep=lambda n: n, choose=choose, signals=signals)]


PROBE = types.SimpleNamespace(prunekit_register_methods=prunekit.plugin.hookimpl(lambda register: register(SignalProbe)))


def probe(model, row, *read):
    """The signals ``read`` ((name, options) pairs) of the patched ``model`` on ``row``, per sample."""
    SignalProbe.READ, SignalProbe.SEEN = list(read), []
    with registered(PROBE, "signal_probe_plugin"):
        prunekit.build("signal_probe", model)
        try:
            model(**row)
        finally:
            prunekit.remove(model)
    return SignalProbe.SEEN[0]


def test_cls_feature_is_each_tokens_cls_row_at_the_feature_layer():
    """LLaVA: every token of an image carries that image's [CLS] row of hidden_states[vision_feature_layer]."""
    model, rows = tiny("llava")
    row = rows[1]  # two images
    (cls,) = probe(model, row, ("cls_feature", {}))
    states = model.model.vision_tower(row["pixel_values"], output_hidden_states=True).hidden_states
    expect = states[model.config.vision_feature_layer][:, 0]  # [images, width]
    per_image = cls[0].shape[0] // 2
    torch.testing.assert_close(cls[0], expect.repeat_interleave(per_image, 0), rtol=0, atol=0)


def test_cls_feature_on_llava_next_follows_crops_and_newlines():
    """LLaVA-NeXT: a token carries the [CLS] row of the crop it comes from; newline tokens (from no crop) zeros."""
    model, rows = tiny("llava_next")
    row = rows[0]  # one image: its base view first, then its crops with a newline ending each row
    (cls,) = probe(model, row, ("cls_feature", {}))
    crops = int((row["pixel_values"][0].flatten(1) != 0).any(-1).sum())  # the crops the image uses
    states = model.model.vision_tower(row["pixel_values"][0, :crops], output_hidden_states=True).hidden_states
    crop_cls = states[model.config.vision_feature_layer][:, 0]  # [crops, width]
    per_crop = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows_seen = cls[0]
    torch.testing.assert_close(rows_seen[:per_crop], crop_cls[0].expand(per_crop, -1), rtol=1e-5, atol=1e-6)
    zero = ~(rows_seen != 0).any(-1)
    newline = (model.model.get_image_features(pixel_values=row["pixel_values"], image_sizes=row["image_sizes"])
               .pooler_output[0] == model.model.image_newline).all(-1)
    assert zero.tolist() == newline.tolist() and newline.any()
    for r in rows_seen[~zero][per_crop:]:  # the crops' tokens: one of the crops' [CLS] rows
        assert torch.isclose(r[None], crop_cls[1:], rtol=1e-5, atol=1e-6).all(-1).any()


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl", "internvl"])
def test_cls_feature_is_refused_naming_the_signal_and_the_model(name):
    """SigLIP and Qwen-VL encoders have no [CLS]; InternVL's projector reads pixel-shuffled groups of patches."""
    model, rows = tiny(name)
    SignalProbe.READ = [("cls_feature", {})]
    with registered(PROBE, "signal_probe_plugin"):
        with pytest.raises(prunekit.PruningError, match=f"cls_feature.*{type(model).__name__}"):
            prunekit.build("signal_probe", model)
    assert not prunekit.is_patched(model)


def test_next_layer_signals_equal_the_next_layers_eager_attention():
    """layer="next": the [CLS] attention, keys and received attention of the layer after the feature layer (the
    tiny tower's last), equal to what that layer computes in an eager forward."""
    from test_llava import _eager_copy

    model, rows = tiny("llava")
    row = rows[0]
    assert model.config.vision_feature_layer == -2
    cls, keys, one, received, feature = probe(
        model, row, ("cls_attention", {"layer": "next"}), ("keys", {"layer": "next"}),
        ("cls_attention", {"layer": "next", "heads": "one"}), ("attention_received", {"layer": "next"}),
        ("cls_attention", {}))
    tower = _eager_copy(model).model.vision_tower
    out = tower(row["pixel_values"], output_attentions=True, output_hidden_states=True)
    attn = out.attentions[-1][0]  # the last layer's, [H, L, L]
    torch.testing.assert_close(cls[0], attn[:, 0, 1:].mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(received[0], attn[:, 1:, 1:].mean((0, 1)), rtol=1e-5, atol=1e-7)
    last = tower.encoder.layers[-1]
    x = last.layer_norm1(out.hidden_states[-2][0])  # the next layer's input is the feature layer's output
    k = last.self_attn.k_proj(x)
    heads = last.self_attn.num_heads
    torch.testing.assert_close(keys[0], k[1:].view(-1, heads, k.shape[-1] // heads).mean(1), rtol=1e-5, atol=1e-6)
    q = last.self_attn.q_proj(x[:1])
    torch.testing.assert_close(one[0], ((q @ k.T) * k.shape[-1] ** -0.5).softmax(-1)[0, 1:], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(feature[0], cls[0])  # the default still reads the feature layer


def test_last_layer_is_the_next_or_the_feature_layer():
    """layer="last" reads the encoder's last layer: the one after the feature layer, or the feature layer itself
    when the projector reads the last layer; farther back it is refused."""
    from prunekit.testing import tiny_llava, tiny_llava_inputs

    model = tiny_llava(seed=5)  # its own: the test changes the feature layer
    row = tiny_llava_inputs(model, batch=1, left_pad=(0,))
    last, after, feature = probe(model, row, ("cls_attention", {"layer": "last"}), ("cls_attention", {"layer": "next"}),
                                 ("cls_attention", {}))
    assert torch.equal(last[0], after[0]) and not torch.equal(last[0], feature[0])
    model.config.vision_feature_layer = -1
    last, feature = probe(model, row, ("cls_attention", {"layer": "last"}), ("cls_attention", {}))
    assert torch.equal(last[0], feature[0])
    model.config.vision_feature_layer = -3
    with pytest.raises(prunekit.PruningError, match=f"layer='last'.*{type(model).__name__}"):
        probe(model, row, ("cls_attention", {"layer": "last"}))


def test_next_layer_is_refused_when_the_feature_layer_is_the_last():
    model, rows = tiny("internvl")  # its projector reads the last vision layer
    SignalProbe.READ, SignalProbe.SEEN = [("cls_attention", {"layer": "next"})], []
    with registered(PROBE, "signal_probe_plugin"):
        prunekit.build("signal_probe", model)
        try:
            with pytest.raises(prunekit.PruningError, match=f"layer='next'.*{type(model).__name__}"):
                model(**rows[0])
        finally:
            prunekit.remove(model)


def test_vision_signal_options_are_checked():
    model, rows = tiny("llava")
    for options, message in (({"layer": "first"}, "layer must be one of"), ({"tokens": "visual"}, "no option")):
        with pytest.raises(prunekit.PruningError, match=message):
            probe(model, rows[0], ("cls_attention", options))
