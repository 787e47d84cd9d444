"""TOPS on a tiny LlavaForConditionalGeneration: exactness, references, batching, generate, errors."""

import pytest
import torch

import prunekit
from prunekit.ops import cosine
from prunekit.runtime.attention import attention_rows, attention_rows_batch
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs
from test_selection import naive_tops
from conftest import unpad_row

GEN = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize(
    "points", [["after_projector"], ["decoder_layer"], ["after_projector", "decoder_layer"]], ids=lambda p: "+".join(p)
)
def test_keep_all_is_bit_exact_and_remove_restores(model, inputs, points):
    ref = model(**inputs).logits
    prunekit.build("tops", model, keep_ratio=1.0, insertion_points=points)
    assert torch.equal(model(**inputs).logits, ref)
    assert prunekit.pruning_report(model).layer_average == [64.0, 64.0]
    prunekit.build("tops", model, keep_tokens=8 if "after_projector" in points else 40, insertion_points=points)
    assert not torch.equal(model(**inputs).logits[:, -1], ref[:, -1])  # pruning changes the answer's logits
    with prunekit.disabled(model):
        assert torch.equal(model(**inputs).logits, ref)
    prunekit.remove(model)
    assert torch.equal(model(**inputs).logits, ref)
    assert not prunekit.is_patched(model)


def _scatter_embeds(model, inputs):
    inner = model.model
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    feats = torch.cat(list(inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(mask, feats), feats


def _eager_copy(model):
    """The same tiny LLaVA with eager attention, so attention weights can be returned."""
    text = model.config.text_config
    eager = tiny_llava(attn_implementation="eager", num_layers=text.num_hidden_layers,
                       num_key_value_heads=text.num_key_value_heads)
    eager.load_state_dict(model.state_dict())
    return eager


def _eager_cls_attention(model, pixel_values):
    """[CLS] attention of the projector's feature layer, from an eager copy of the vision tower."""
    out = _eager_copy(model).model.vision_tower(pixel_values, output_attentions=True)
    return out.attentions[model.config.vision_feature_layer][:, :, 0, 1:].mean(1)


def test_pruned_generate_equals_hand_built_sequence(model, inputs):
    """Stage I: select with the naive spec on eager [CLS] attention, build the short sequence, generate."""
    T = 12
    prunekit.build("tops", model, keep_tokens=T, insertion_points=["after_projector"])
    out = model.generate(**inputs, **GEN)
    report = prunekit.pruning_report(model)
    prunekit.remove(model)

    embeds, feats = _scatter_embeds(model, inputs)
    cls = _eager_cls_attention(model, inputs["pixel_values"])
    n = cls.shape[1]
    rows, masks = [], []
    for b in range(2):
        kept = naive_tops(cosine(feats[b * n : (b + 1) * n].double()), cls[b], T)
        assert report.stages[0].kept[b].tolist() == kept
        vis = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        keep = torch.ones(embeds.shape[1], dtype=torch.bool)
        keep[vis] = False
        keep[vis[kept]] = True
        rows.append(embeds[b, keep])
        masks.append(inputs["attention_mask"][b, keep])
    ref = model.generate(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), **GEN)
    assert torch.equal(out.sequences[:, -5:], ref.sequences[:, -5:])
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_in_llm_pruning_equals_manual_layer_loop(model, inputs, positions):
    """Both stages: the patched forward equals running the decoder layers by hand on the shortened rows."""
    prunekit.build("tops", model, keep_tokens=10, positions=positions)
    logits = model(**inputs).logits
    report = prunekit.pruning_report(model)
    prunekit.remove(model)

    lm = model.model.language_model
    embeds, _ = _scatter_embeds(model, inputs)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    vis_mask = ids == model.config.image_token_id
    # per sample: positions of its visual tokens in the current sequence, in original-visual-index order
    hidden, cur_pos, cur_valid, cur_vis = embeds, pos, valid, [vis_mask[b].nonzero().squeeze(1) for b in range(2)]
    stage_i = report.stages[0]
    orig_visual = [torch.arange(64)] * 2

    def shorten(kept_orig):
        nonlocal hidden, cur_pos, cur_valid, cur_vis, orig_visual
        rows = []
        for b in range(2):
            keep = torch.ones(hidden.shape[1], dtype=torch.bool)
            keep[cur_vis[b]] = False
            keep_vis = torch.isin(orig_visual[b], kept_orig[b])
            keep[cur_vis[b][keep_vis]] = True
            rows.append(keep.nonzero().squeeze(1))
        rows = torch.stack(rows)
        if positions == "renumber":
            dropped = torch.ones_like(cur_valid)
            dropped.scatter_(1, rows, False)
            new_pos = (cur_pos - dropped.long().cumsum(1)).gather(1, rows)
        else:
            new_pos = cur_pos.gather(1, rows)
        hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[2]))
        cur_valid = cur_valid.gather(1, rows)
        cur_pos = new_pos
        cur_vis = [torch.searchsorted(rows[b], cur_vis[b][torch.isin(orig_visual[b], kept_orig[b])]) for b in range(2)]
        orig_visual = [kept_orig[b] for b in range(2)]

    shorten(stage_i.kept)
    by_layer = {s.layer: s.kept for s in report.stages[1:]}
    for j, layer in enumerate(lm.layers):
        if j in by_layer:
            shorten(by_layer[j])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask4d = (causal[None] & cur_valid[:, None, :])[:, None]
        hidden = layer(hidden, attention_mask=mask4d, position_ids=cur_pos,
                       position_embeddings=lm.rotary_emb(hidden, position_ids=cur_pos))
    ref = model.lm_head(lm.norm(hidden))
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits[cur_valid], ref[cur_valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize(
    "points", [["after_projector"], ["decoder_layer"], ["after_projector", "decoder_layer"]], ids=lambda p: "+".join(p)
)
def test_padded_batch_equals_rows_alone(model, inputs, points, positions):
    budget = 12 if "after_projector" in points else 40
    prunekit.build("tops", model, keep_tokens=budget, insertion_points=points, positions=positions)
    batch = model.generate(**inputs, **GEN)
    kept_batch = [s.kept for s in prunekit.pruning_report(model).stages]
    for b in range(2):
        alone = model.generate(**unpad_row(inputs, b), **GEN)
        assert batch.sequences[b, -5:].tolist() == alone.sequences[0, -5:].tolist()
        for step_batch, step_alone in zip(batch.scores, alone.scores):
            torch.testing.assert_close(step_batch[b], step_alone[0], rtol=1e-4, atol=1e-4)
        for stage_kept, stage in zip(kept_batch, prunekit.pruning_report(model).stages):
            assert stage_kept[b].tolist() == stage.kept[0].tolist()


def test_generate_keep_all_matches_unpatched(model, inputs):
    ref = model.generate(**inputs, **GEN)
    prunekit.build("tops", model, keep_ratio=1.0)
    out = model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert torch.equal(a, b)


def test_report_counts_and_layer_average(model, inputs):
    prunekit.build("tops", model, keep_tokens=16)
    model(**inputs)
    report = prunekit.pruning_report(model)
    assert report.visual_tokens == [64, 64]
    # No preset fits this tiny model: the paper's 2T -> T -> T/4 shape (its Tables 9-10), scaled so that the layer
    # average over 4 layers (p1=2, p2=3) comes as close to T as whole counts allow.
    assert [s.counts for s in report.stages] == [[24, 24], [12, 12], [3, 3]]
    assert report.layer_counts == [[24, 24, 12, 3]] * 2
    assert report.layer_average == [15.75, 15.75]
    for stage_prev, stage in zip(report.stages, report.stages[1:]):
        for b in range(2):
            assert set(stage.kept[b].tolist()) <= set(stage_prev.kept[b].tolist())
            assert stage.kept[b].tolist() == sorted(stage.kept[b].tolist())
    assert "layer-averaged" in str(report)


@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_recomputed_attention_matches_eager(model, inputs, heads):
    """With grouped keys (the tiny model's) and with one key head per query head (LLaVA-1.5's, where q's rows and
    the keys are rotated in one call)."""
    if heads == "mha":
        model = tiny_llava(num_key_value_heads=4)
    eager = _eager_copy(model)
    out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    lm = eager.model.language_model
    valid = inputs["attention_mask"].bool()
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    L = valid.shape[1]
    mask4d = (torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    for j in (1, 2):
        h = out.hidden_states[j]
        emb = lm.rotary_emb(h, position_ids=pos)
        for b in range(2):
            rows = torch.tensor([L - 3, L - 1])
            got = attention_rows(lm.layers[j], h, emb, mask4d, b, rows)
            torch.testing.assert_close(got, out.attentions[j][b][:, rows].float(), rtol=1e-5, atol=1e-6)
        # the batch at once, each sample its own rows: the same as sample by sample, with the mask and causally
        rows = torch.tensor([[L - 3, L - 1], [L - 4, L - 2]])
        for m in (None, mask4d):
            batched = attention_rows_batch(lm.layers[j], h, emb, m, rows)
            for b in range(2):
                one = attention_rows(lm.layers[j], h, emb, m, b, rows[b])
                torch.testing.assert_close(batched[b], one, rtol=1e-6, atol=1e-7)
        for b in range(2):
            torch.testing.assert_close(batched[b], out.attentions[j][b][:, rows[b]].float(), rtol=1e-5, atol=1e-6)


def test_one_rotary_call_for_q_and_k_gives_each_rotation_bit_for_bit(model, inputs):
    """The attention rows rotate q's rows and every key in one call of the model's rotary function (it rotates a
    pair, so one call each would compute every rotation twice): the function is element-wise per position, so the
    concatenated call gives what two calls give, bit for bit."""
    from prunekit import contracts as C

    lm = model.model.language_model
    attn = C.SELF_ATTENTION.get(lm.layers[1])
    rotate = C.ATTENTION_ROTARY.get(attn)
    B, H, L, hd = 2, 4, inputs["input_ids"].shape[1], C.HEAD_DIM.get(attn)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, 3, hd, generator=g), torch.randn(B, H, L, hd, generator=g)
    pos = torch.arange(L)[None].expand(B, L)
    cos, sin = lm.rotary_emb(torch.randn(B, L, lm.config.hidden_size), position_ids=pos)
    rows = torch.tensor([[L - 3, L - 2, L - 1], [1, 4, L - 1]])
    take = lambda t: t.take_along_dim(rows[..., None], dim=-2)  # noqa: E731
    both = rotate(torch.cat([q, k], 2), torch.cat([take(cos), cos], -2), torch.cat([take(sin), sin], -2))
    assert torch.equal(both[:, :, :3], rotate(q, take(cos), take(sin)))
    assert torch.equal(both[:, :, 3:], rotate(k, cos, sin))


@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_the_keys_a_layer_cached_are_the_recomputed_ones_bit_for_bit(model, inputs, heads):
    """The attention rows take layer K-1's keys from the cache its forward filled (after the rotary embedding)
    rather than projecting and rotating every token again: the same operations on the same input, so the same
    values, and the same rows as recomputing them."""
    import functools

    from transformers import DynamicCache

    from prunekit import contracts as C
    from prunekit.runtime.attention import cached_keys

    if heads == "mha":
        model = tiny_llava(num_key_value_heads=4)
    lm = model.model.language_model
    seen = {}
    def keep(j, module, args, kwargs):
        seen[j] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"],
                   kwargs["attention_mask"])

    handles = [lm.layers[j].register_forward_pre_hook(functools.partial(keep, j), with_kwargs=True) for j in (1, 2)]
    with torch.no_grad():
        cache = C.OUTPUT_CACHE.get(model(**inputs, use_cache=True))  # the DynamicCache the model made and filled
    for h in handles:
        h.remove()
    rows = torch.tensor([[9, 11], [10, 12]])
    for j, (hidden, emb, mask) in seen.items():
        keys = cached_keys(cache, lm.layers[j], hidden)
        assert keys is not None and keys.shape[2] == hidden.shape[1]
        with torch.no_grad():
            assert torch.equal(attention_rows_batch(lm.layers[j], hidden, emb, mask, rows, keys=keys),
                               attention_rows_batch(lm.layers[j], hidden, emb, mask, rows))
            for b in range(2):
                assert torch.equal(attention_rows(lm.layers[j], hidden, emb, mask, b, rows[b], keys=keys),
                                   attention_rows(lm.layers[j], hidden, emb, mask, b, rows[b]))
        L = hidden.shape[1]
        for tail in (1, 3):  # each row's last rows, sliced: the values gathered rows give
            last = torch.arange(L - tail, L).expand(2, tail)
            with torch.no_grad():
                for m in (mask, None):  # the model's mask, or none (causal: a batch without padding)
                    gathered = attention_rows_batch(lm.layers[j], hidden, emb, m, last)
                    for cached in (keys, None):  # with the cached keys, and with keys computed (layer="next")
                        assert torch.equal(attention_rows_batch(lm.layers[j], hidden, emb, m, last, keys=cached,
                                                                last=True), gathered)
    hidden, _, _ = seen[1]
    assert cached_keys(None, lm.layers[1], hidden) is None
    assert cached_keys(cache, lm.layers[1], hidden[:, :-1]) is None  # a layer holding other tokens: recomputed
    assert cached_keys(DynamicCache(config=model.config.get_text_config()), lm.layers[1], hidden) is None


def test_a_pruned_prefill_reads_layer_k_minus_1s_keys_from_the_cache(model, inputs, monkeypatch):
    from prunekit.runtime import signals

    found = []
    taken = signals.cached_keys
    monkeypatch.setattr(signals, "cached_keys", lambda *a: found.append(taken(*a)) or found[-1])
    prunekit.build("fastv", model, keep_tokens=8)
    with torch.no_grad():
        model(**inputs)
    assert_pruned(model)
    assert found and all(k is not None for k in found)


def test_text_only_input_prunes_nothing(model):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    prunekit.build("tops", model, keep_tokens=8)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert prunekit.pruning_report(model).visual_tokens == [0]
    assert prunekit.pruning_report(model).stages == []


def _layout(footprint):
    """A patch_footprint with hooks counted and objects unnamed: two builds of the same patch have equal layouts."""
    def shape(key, value):
        if "hooks" in key and isinstance(value, tuple):  # a hook table's handle ids
            return len(value)
        if isinstance(value, dict):
            return sorted(value)
        return "object" if isinstance(value, tuple) and value[:1] == ("id",) else value

    return {owner: {key: shape(key, value) for key, value in entry.items()}
            for owner, entry in footprint.items() if owner.startswith("module")}


def test_build_replaces_an_existing_patch(model, inputs):
    """Building over a patch leaves exactly what building on the unpatched model would: no hook, wrapper or
    attribute of the first patch survives, the second one prunes, and remove() then restores everything."""
    from prunekit.testing import footprint_difference, patch_footprint

    model(**inputs)  # transformers installs its own output-capturing hooks at the first call
    unpatched = patch_footprint(model)
    prunekit.build("tops", model, keep_tokens=8, insertion_points=["after_projector"])
    alone = _layout(patch_footprint(model))
    prunekit.remove(model)
    prunekit.build("tops", model, keep_tokens=16)
    first = _layout(patch_footprint(model))
    prunekit.build("tops", model, keep_tokens=8, insertion_points=["after_projector"])
    assert _layout(patch_footprint(model)) == alone != first
    model(**inputs)
    assert [s.counts for s in prunekit.pruning_report(model).stages] == [[8, 8]]
    prunekit.remove(model)
    assert footprint_difference(unpatched, patch_footprint(model)) == []


def test_build_accepts_a_config_object(model, inputs):
    cfg = prunekit.get_method("tops").Config(keep_tokens=8, insertion_points=["after_projector"])
    prunekit.build(cfg, model, keep_tokens=6)
    model(**inputs)
    assert prunekit.pruning_report(model).stages[0].counts == [6, 6]


def test_budget_larger_than_the_image_is_an_error(model, inputs):
    prunekit.build("tops", model, keep_tokens=65, insertion_points=["after_projector"])
    with pytest.raises(ValueError, match="more than the 64 visual tokens"):
        model(**inputs)


def test_unsupported_model_lists_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=32))
    with pytest.raises(prunekit.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        prunekit.build("tops", lm)


def test_layers_outside_the_decoder_are_rejected(model):
    with pytest.raises(ValueError, match="layers"):
        prunekit.build("tops", model, layers=(2, 9))
    assert not prunekit.is_patched(model)


def test_sdpa_is_kept(model, inputs):
    prunekit.build("tops", model, keep_tokens=8)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_preset_is_picked_from_the_config():
    from prunekit.interfaces import ModelSpec
    from prunekit_plugins.methods.tops import Tops, TopsConfig

    spec = ModelSpec(family="llava", num_layers=32, hidden_size=4096, visual_tokens_per_image=576)
    stages = Tops(TopsConfig(keep_tokens=64)).plan(spec)
    assert [s.layer for s in stages] == [None, 12, 24]
    assert [s.keep(576) for s in stages] == [128, 64, 16]  # the paper's Table 9 at T = 64
    spec13 = ModelSpec(family="llava", num_layers=40, hidden_size=5120, visual_tokens_per_image=576)
    assert [s.layer for s in Tops(TopsConfig(keep_tokens=64)).plan(spec13)] == [None, 15, 30]


def test_from_pretrained_on_local_files(tmp_path, inputs):
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava(seed=3)
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ref = loaded(**inputs).logits
    prunekit.build("tops", loaded, keep_tokens=8)
    assert loaded(**inputs).logits.shape[1] < ref.shape[1]
    prunekit.remove(loaded)
    assert torch.equal(loaded(**inputs).logits, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite(dtype, inputs):
    model = tiny_llava(dtype=dtype)
    half = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
    prunekit.build("tops", model, keep_tokens=8)
    out = model.generate(**half, **GEN)
    assert all(torch.isfinite(s).all() for s in out.scores)


def test_several_images_per_prompt(model):
    inputs = tiny_llava_inputs(model, images_per_row=2)
    prunekit.build("tops", model, keep_tokens=20)
    batch = model.generate(**inputs, **GEN)
    report = prunekit.pruning_report(model)
    assert report.visual_tokens == [128, 128]
    assert abs(report.layer_average[0] - 20) <= 0.5
    for b in range(2):
        alone = model.generate(**unpad_row(inputs, b, images_per_row=2), **GEN)
        assert batch.sequences[b, -5:].tolist() == alone.sequences[0, -5:].tolist()
        assert prunekit.pruning_report(model).stages[0].kept[0].tolist() == report.stages[0].kept[b].tolist()


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_cached_decode_equals_full_recompute(model, inputs, positions):
    """Every decode step on the pruned cache equals a cache-free forward of prompt + generated tokens.

    Without the relevance principle the selection reads only visual hidden states, which (causal attention) do
    not depend on later tokens, so the recompute prunes the same tokens and must give the same logits.
    """
    prunekit.build("tops", model, keep_tokens=12, positions=positions, principles=["coverage", "diversity"])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    L = inputs["input_ids"].shape[1]
    for t in range(1, 4):
        seq = out.sequences[:, : L + t]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, t, dtype=torch.long)], 1)
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
        full = model(input_ids=seq, attention_mask=mask, position_ids=pos, pixel_values=inputs["pixel_values"],
                     use_cache=False).logits[:, -1]
        torch.testing.assert_close(full, out.logits[t], rtol=1e-4, atol=1e-5)


def test_attention_received_relevance_with_a_budget_per_image():
    """attention_received has a row per visual token, so budget_per='image' splits it per image like the others."""
    from prunekit.testing import tiny_adapter_model, collate

    model, rows = tiny_adapter_model("llava")
    row = rows[1]  # two images
    prunekit.build("tops", model, schedule=[5], insertion_points=["after_projector"], budget_per="image",
                   projector_relevance="attention_received")
    model(**row)
    kept = prunekit.pruning_report(model).stages[0].kept[0]
    per_image = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert [int((kept // per_image**2 == i).sum()) for i in range(2)] == [5, 5]
    prunekit.remove(model)
