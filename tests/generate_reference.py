"""Exact references for pruned generation, built by hand: the unpatched model on the prompt without the dropped
visual tokens (what pruning before the LLM with renumbered positions must equal)."""

import torch

from prunekit import contracts as C


def short_prompt(model, row, kept):
    """``row`` (one prompt of a LLaVA-style model) without its dropped image placeholders, and the kept image
    features split per image: ``(input_ids, attention_mask, features_per_image)``."""
    ids = row["input_ids"][0]
    token = model.config.image_token_id
    visual = ids == token
    encoded = C.ENCODED_TOKENS.get(model.model.get_image_features(row["pixel_values"]))
    sizes = [f.shape[0] for f in encoded]
    feats = torch.cat(list(encoded))
    image_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[kept]
    per_image = tuple(feats[kept][image_of == i] for i in range(len(sizes)))
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    short = ids[keep][None]
    return short, torch.ones_like(short), per_image


def generate_with_features(model, input_ids, attention_mask, per_image, pixel_values, **gen):
    """Unpatched ``generate`` whose images encode to ``per_image`` (whichever way this release feeds them)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    encoded = BaseModelOutputWithPooling(pooler_output=per_image)
    if C.MODEL_ENCODER_OUTPUTS.key:  # releases whose generate takes images already encoded
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              **{C.MODEL_ENCODER_OUTPUTS.key: {"image": encoded}}, **gen)
    def encode(*args, **kwargs):  # generate may repeat the images per beam or returned sequence
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        return BaseModelOutputWithPooling(pooler_output=per_image * (pixels.shape[0] // len(per_image)))

    model.model.get_image_features = encode
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **gen)
    finally:
        del model.model.get_image_features
