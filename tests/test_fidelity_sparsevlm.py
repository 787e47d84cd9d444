"""SparseVLM against a transcription of what its official code computes.

The ``official_*`` functions below follow the official control flow step by step, in plain torch, batch of one, and
never call prunekit. Line numbers are those of Gumpest/SparseVLMs at commit 26a5f48 (version 1.0, its default):

* ``llava/model/language_model/modelling_sparse_llama.py`` L199-204: the raters, once, on the decoder's input
  embeddings (``hidden_states`` before layer 0): ``softmax(V·Tᵀ, over text).mean(over visual) > its mean``;
  L221-239: at a layer of ``pruning_loc = [2, 6, 15]`` the layer runs on every token and returns its attention;
  L259-261, ``score.py`` L27-41: the raters' rows of that attention, mean over heads then over raters, top
  ``min(count, visual - 1)``; L275-307: recycling: ``int(0.3·deleted) + 1`` deleted tokens by relevance,
  ``int(m / 10) + 1`` clusters, the merged tokens appended after the kept visual tokens, positions renumbered;
* ``llava/model/language_model/utils.py`` L179-239, ``cluster_and_merge``: DPC-kNN with distances divided by √C,
  k = the cluster count (the row itself included), density ties broken by noise below 1e-6, centres by
  ``δ·density``, each token to its nearest centre, merged value ``Σ x / (size + 1e-6)``;
* ``score.py`` L11-14: the per-stage counts for ``RETAIN_TOKN`` 64/96/128/192.

prunekit's stage is at ℓ+1 (the first layer that sees the pruned sequence) and reads layer ℓ's attention; a merged
token takes the place of its cluster's centre in prunekit's bookkeeping, which is how the reference below tracks it.
"""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.interfaces import ModelSpec, StageContext
from prunekit.registry import registry
from prunekit.runtime.attention import RATER_RULES
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs
from prunekit_plugins.methods.common import above_mean_similarity
from prunekit_plugins.methods.sparsevlm import split_count, sparsevlm_choice

#: score.py L11-14 (version 1.0): RETAIN_TOKN -> tokens kept at the layers 2, 6, 15
OFFICIAL_COUNTS = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


# ------------------------------------------------------------------------------------------------------------------
# the transcription
# ------------------------------------------------------------------------------------------------------------------
def official_raters(embeds: torch.Tensor, v_start: int, text_start: int) -> torch.Tensor:
    """L199-204: indices (into the text after the image) of the raters, from the decoder's input embeddings."""
    v_t = embeds[v_start:text_start]
    t_t = embeds[text_start:]
    m_v_t = (v_t @ t_t.T).softmax(1).mean(0)
    return torch.where(m_v_t > m_v_t.mean())[0]


def official_cluster_and_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor | None = None):
    """utils.py L179-239 for a batch of one, ``x`` [N, C]: (merged tokens [cluster_num, C], centres' rows in x).
    ``noise`` stands for its ``torch.rand(...)`` (None: zero)."""
    N, C_ = x.shape
    dist_matrix = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (C_ ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise * 1e-6
    mask = (density[None, :] > density[:, None]).type(x.dtype)
    dist_max = dist_matrix.max()
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[index_down].argmin(dim=0)  # index_points, then argmin over the centres
    idx_cluster[index_down] = torch.arange(cluster_num)
    token_weight = x.new_ones(N, 1)
    all_weight = token_weight.new_zeros(cluster_num, 1).index_add_(0, idx_cluster, token_weight) + 1e-6
    norm_weight = token_weight / all_weight[idx_cluster]
    x_merged = x.new_zeros(cluster_num, C_).index_add_(0, idx_cluster, x * norm_weight)
    return x_merged, index_down


def official_stage(relation: torch.Tensor, tokens: torch.Tensor, count: int):
    """L259-307 on the visual part: ``relation`` [v] (the raters' mean attention), ``tokens`` [v, C] (the layer's
    output rows of the visual tokens). Returns (kept rows ascending, the merged tokens, the centres' rows)."""
    v_token_num = relation.numel()
    mask = torch.zeros(v_token_num, dtype=torch.bool)
    mask[torch.topk(relation, min(count, v_token_num - 1)).indices] = True
    deleted = torch.where(~mask)[0]
    merge_token_num_stage1 = int(deleted.shape[0] * 0.3) + 1
    stage2_idx = relation[deleted].topk(merge_token_num_stage1)[1]
    pool = deleted[stage2_idx]
    cluster_num = int(pool.shape[0] / 10) + 1
    merged, down = official_cluster_and_merge(tokens[pool], cluster_num)
    return torch.where(mask)[0], merged, pool[down]


def official_total(present: int, count: int) -> int:
    """The visual tokens after a stage: min(count, present - 1) kept plus int(int(0.3·d) + 1) / 10) + 1 merged."""
    kept = min(count, present - 1)
    return kept + int((int((present - kept) * 0.3) + 1) / 10) + 1


# ------------------------------------------------------------------------------------------------------------------
# the pure selection and recycling rule, on random tensors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, count, width, dtype", [
    (576, 66, 64, torch.float32), (576, 303, 32, torch.float64), (82, 30, 64, torch.float32),
    (312, 110, 48, torch.float64), (32, 17, 16, torch.float32), (200, 5, 8, torch.float64),
])
def test_selection_and_recycling_match_the_official_code(n, count, width, dtype):
    g = torch.Generator().manual_seed(n + count)
    tokens = torch.randn(n, width, generator=g, dtype=dtype)
    relation = torch.rand(n, generator=g, dtype=dtype)
    kept, merged, centres = official_stage(relation, tokens, count)
    total = kept.numel() + merged.shape[0]
    assert total == official_total(n, count)
    assert split_count(n, total) == (kept.numel(), merged.shape[0])

    choice = sparsevlm_choice(tokens, relation, total)
    assert choice.ordered
    top = kept.numel()
    assert choice.indices[:top].tolist() == kept.tolist()  # the kept tokens, in sequence order
    if merged.shape[0] > 1:  # one cluster: every density is 1 and the centre is arbitrary (its value is not)
        assert choice.indices[top:].tolist() == centres.tolist()  # then the recycled ones, by centre score
    torch.testing.assert_close(choice.values[:top], tokens[kept], rtol=0, atol=0)
    torch.testing.assert_close(choice.values[top:], merged, rtol=1e-6, atol=1e-6)
    assert not choice.merged[:top].any()


def test_density_noise_of_the_official_code_changes_nothing_without_ties():
    """The official density gets uniform noise below 1e-6; on tokens without density ties it changes no centre."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(154, 64, generator=g)
    plain = official_cluster_and_merge(x, 16)
    noisy = official_cluster_and_merge(x, 16, noise=torch.rand(154, generator=g))
    assert torch.equal(plain[1], noisy[1]) and torch.equal(plain[0], noisy[0])


def test_raters_rule_matches_the_official_code():
    g = torch.Generator().manual_seed(3)
    for t in (2, 5, 40):
        embeds = torch.randn(10 + 64 + t, 32, generator=g)
        ref = official_raters(embeds, 10, 74)
        assert above_mean_similarity(embeds[10:74], embeds[74:]).nonzero().squeeze(1).tolist() == ref.tolist()


def test_the_runtime_offers_generic_rater_rules_only():
    """One home per signal: SparseVLM's rule lives with the methods; the runtime knows no method's rule."""
    assert set(RATER_RULES) == {"last_token", "all_text"}


# ------------------------------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 96, 128, 192])
def test_nominal_budget_is_the_official_schedule_plus_the_recycled_tokens(budget):
    spec = ModelSpec("llava", num_layers=32, hidden_size=4096, visual_tokens_per_image=576)
    cls = registry.get("methods", "sparsevlm")
    stages = cls(cls.Config(keep_tokens=budget)).plan(spec)
    assert [s.layer for s in stages] == [3, 7, 16]  # the official code prunes after layers 2, 6, 15
    expected, present = [], 576
    for count in OFFICIAL_COUNTS[budget]:
        present = official_total(present, count)
        expected.append(present)
    counts = [s.keep(576) for s in stages]
    assert counts == expected
    assert {64: [82, 32, 18], 96: [249, 55, 27], 128: [312, 117, 39], 192: [309, 204, 113]}[budget] == counts
    # each stage's count splits back into the official count kept by relevance and its recycled tokens
    assert [split_count(p, c)[0] for p, c in zip([576, *counts], counts)] == OFFICIAL_COUNTS[budget]
    # recycle_on_top=False: the recycled tokens count toward the official counts (prunekit's earlier choice)
    inside = cls(cls.Config(keep_tokens=budget, recycle_on_top=False)).plan(spec)
    assert [s.keep(576) for s in inside] == OFFICIAL_COUNTS[budget]


def _stage_choice(stage, n: int, k: int, seed: int = 0):
    """Run a planned stage's chooser on random signals for one sample of ``n`` tokens keeping ``k``; also return
    the relevance it ranks by and the features."""
    g = torch.Generator().manual_seed(seed)
    feats, text = torch.randn(n, 16, generator=g), torch.randn(4, 16, generator=g)
    columns = torch.rand(n, 4, generator=g)

    def signal(name, options):
        if name == "layer_input":
            return [feats if options["tokens"] == "visual" else text]
        assert name == "text_attention" and options.get("per_rater")
        return [columns]

    relevance = columns[:, above_mean_similarity(feats, text)].mean(1)
    return stage.choose(StageContext(stage, [feats], [k], signal))[0], relevance, feats


def test_other_budgets_scale_the_nearest_official_schedule():
    spec = ModelSpec("llava", num_layers=32, hidden_size=4096, visual_tokens_per_image=576)
    cls = registry.get("methods", "sparsevlm")
    stages = cls(cls.Config(keep_tokens=100)).plan(spec)  # nearest: 96 -> 238, 48, 26 scaled by 100 / 96
    present, expected = 576, []
    for count in (248, 50, 27):
        present = official_total(present, count)
        expected.append(present)
    counts = [s.keep(576) for s in stages]
    assert counts == expected == [258, 57, 29]
    assert split_count(57, 29) == (28, 1)  # 29 of 57 is also 28 kept + 1 recycled: the stage keeps 27 + 2
    for stage, n, k, top in zip(stages, [576, *counts], counts, (248, 50, 27)):
        choice, relevance, feats = _stage_choice(stage, n, k)
        assert choice.indices.tolist() == sparsevlm_choice(feats, relevance, k, top=top).indices.tolist()
        assert choice.indices[:top].tolist() == sorted(relevance.topk(top).indices.tolist())


# ------------------------------------------------------------------------------------------------------------------
# end to end on a tiny LLaVA
# ------------------------------------------------------------------------------------------------------------------
def _attention(layer, lm, h: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s attention on its input ``h`` [1, L, D], positions 0..L-1 (as the official code renumbers),
    causal, computed by hand: [heads, L, L]."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    L, hd = h.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, L, -1, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, position_ids=torch.arange(L)[None])
    rot = lambda t: t * cos[:, None] + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin[:, None]  # noqa: E731
    q, k = rot(q)[0].double(), rot(k)[0].double()
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def official_forward(model, inputs, pruning_loc: list[int], counts: list[int]):
    """LlamaDynamicvitModel.forward in inference, batch of one: per stage the visual tokens kept (by original index;
    a merged token by its centre's) and how many were recycled, the hidden states entering the next layer, and the
    last logits."""
    lm = C.LANGUAGE_MODEL.get(model.model)
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[0]  # the decoder's input embeddings
        visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        v_start, v_num = int(visual[0]), visual.numel()
        text_start = v_start + v_num
        raters = official_raters(h[0], v_start, text_start)
        ident = list(range(v_num))
        kept_by_stage, recycled, inputs_after = [], [], []
        for i, layer in enumerate(lm.layers):
            L = h.shape[1]
            pos = torch.arange(L)[None]
            out = layer(h, position_ids=pos, position_embeddings=lm.rotary_emb(h, position_ids=pos))
            out = out[0] if isinstance(out, tuple) else out
            if i in pruning_loc:
                probs = _attention(layer, lm, h).mean(0)  # score.py L27: mean over heads
                relation = probs[text_start + raters][:, v_start:text_start].mean(0)  # L30-32
                kept, merged, centres = official_stage(relation.float(), out[0, v_start:text_start],
                                                       counts[pruning_loc.index(i)])
                if merged.shape[0] == 1:  # every density is 1 and torch.topk picks among equal scores: prunekit
                    # labels the one recycled token (the mean of all) with the most relevant deleted token
                    deleted = torch.tensor([j for j in range(relation.numel()) if j not in kept.tolist()])
                    centres = deleted[relation.float()[deleted].argmax()][None]
                ident = [ident[j] for j in kept.tolist()] + [ident[j] for j in centres.tolist()]
                kept_by_stage.append(ident)
                recycled.append(merged.shape[0])
                h = torch.cat([out[0, :v_start], out[0, v_start + kept], merged, out[0, text_start:]])[None]
                v_num = len(ident)
                text_start = v_start + v_num
                inputs_after.append(h)
            else:
                h = out
        logits = model.lm_head(lm.norm(h))[0, -1]
    return kept_by_stage, recycled, inputs_after, logits


@pytest.mark.parametrize("image_size, keep_tokens, paper", [
    (32, 32, [33, 15, 9]),    # 64 tokens; T = 32: the 64 schedule scaled by 32/64 (66/2 = 33 rounds up)
    (64, 64, [66, 30, 17]),   # 256 tokens; T = 64: the official counts themselves, 6 recycled at stage 1
])
def test_end_to_end_matches_the_official_forward(image_size, keep_tokens, paper):
    model = tiny_llava(num_layers=8, image_size=image_size)
    inputs = tiny_llava_inputs(model, batch=1, left_pad=(0,), question=(5, 6, 7, 8, 9, 10))
    layers = [2, 4, 6]  # the official code would prune after layers 1, 3, 5
    ref_kept, ref_recycled, ref_inputs, ref_logits = official_forward(model, inputs, [x - 1 for x in layers], paper)

    lm = C.LANGUAGE_MODEL.get(model.model)
    seen = {}

    def capture(j):
        def hook(module, args, kwargs):
            seen[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    prunekit.build("sparsevlm", model, keep_tokens=keep_tokens, layers=layers)
    handles = [lm.layers[j].register_forward_pre_hook(capture(j), with_kwargs=True) for j in layers]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        report = assert_pruned(model)
    finally:
        for handle in handles:
            handle.remove()
        prunekit.remove(model)
    assert [s.layer for s in report.stages] == layers
    assert [s.kept[0].tolist() for s in report.stages] == ref_kept  # token for token, in sequence order
    assert ref_recycled[0] > 1
    for stage, kept, recycled in zip(report.stages, ref_kept, ref_recycled):  # merged tokens come last
        assert not stage.merged[0][: len(kept) - recycled].any() and 0 < stage.merged_counts[0] <= recycled
    for j, ref in zip(layers, ref_inputs):  # value for value: kept and recycled tokens, in the official order
        torch.testing.assert_close(seen[j], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_options_restore_prunekits_earlier_choices():
    """rater_states='stage' (raters picked on each stage's normalised input), recycle_on_top=False (recycled tokens
    inside the official counts) and budget_meaning='layer_average' (the shape scaled to the layer average) prune and
    recycle."""
    model = tiny_llava(num_layers=8)
    inputs = tiny_llava_inputs(model)
    with torch.no_grad():
        for options in ({"rater_states": "stage"}, {"recycle_on_top": False}, {"budget_meaning": "layer_average"}):
            prunekit.build("sparsevlm", model, keep_tokens=24, **options)
            try:
                model(**inputs)
                report = assert_pruned(model)
                assert any(any(s.merged_counts) for s in report.stages)
            finally:
                prunekit.remove(model)
