"""Qwen-VL: pruned tokens keep their M-RoPE positions, in the prefill and in decode steps."""

import pytest
import torch

import prunekit
from prunekit import contracts as C
from prunekit.registry import registry

GEN = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)


def _rows(features):
    """One deepstack layer's features as rows (newer releases give one tensor per image, older ones one tensor)."""
    return features if isinstance(features, torch.Tensor) else torch.cat(features)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_pruned_prefill_and_decode_keep_original_mrope_positions(name):
    cls = registry.get("adapters", name)
    model = cls.tiny()
    row = cls.tiny_rows(model)[1]  # two images
    prunekit.build("tops", model, keep_ratio=0.3, insertion_points=["after_projector"])
    out = model.generate(**row, **GEN)
    kept = prunekit.pruning_report(model).stages[0].kept[0]
    prunekit.remove(model)

    inner = model.model
    ids = row["input_ids"]
    pos, _ = inner.get_rope_index(ids, image_grid_thw=row["image_grid_thw"], attention_mask=row["attention_mask"],
                                  mm_token_type_ids=row["mm_token_type_ids"])
    embeds = inner.get_input_embeddings()(ids)
    encoded = inner.get_image_features(row["pixel_values"], row["image_grid_thw"])
    feats = torch.cat(encoded.pooler_output)
    visual = ids[0] == model.config.image_token_id
    embeds[0, visual] = feats
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    embeds, pos = embeds[:, keep], pos[:, :, keep]
    extra = {}
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL: the kept tokens' deepstack rows
        extra = {"visual_pos_masks": (ids[0][keep] == model.config.image_token_id)[None],
                 "deepstack_visual_embeds": [_rows(per_layer)[kept] for per_layer in encoded.deepstack_features]}
    cache = None
    seq = []
    step_embeds, step_pos = embeds, pos
    for step in range(3):  # greedy decode by hand: the next token sits one past the unpruned sequence's end
        o = inner.language_model(inputs_embeds=step_embeds, position_ids=step_pos, **{C.LM_CACHE.key: cache},
                                 use_cache=True, **(extra if step == 0 else {}))
        cache = C.OUTPUT_CACHE.get(o)
        logits = model.lm_head(o.last_hidden_state[:, -1])
        torch.testing.assert_close(logits, out.scores[step], rtol=1e-4, atol=1e-5)
        token = logits.argmax(-1)
        seq.append(int(token))
        step_embeds = inner.get_input_embeddings()(token)[:, None]
        step_pos = torch.full((3, 1, 1), int(pos.max()) + 1 + step)
    assert out.sequences[0, -3:].tolist() == seq
