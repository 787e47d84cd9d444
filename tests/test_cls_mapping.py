"""[CLS] attention reaches the right tokens through AnyRes packing (LLaVA-NeXT) and pixel shuffle (InternVL),
checked against the eager vision tower's own attention weights."""

import types

import torch

import prunekit
from prunekit.plugin import Method, Stage, hookimpl
from prunekit.config import MethodConfig
from prunekit.registry import registry
from prunekit.testing import registered

SEEN: list = []


class Probe(Method):
    """Keeps every token and records the [CLS] attention it was offered."""

    name = "cls_probe"
    Config = MethodConfig

    def plan(self, spec):
        def choose(ctx):
            SEEN.append(ctx.relevance("cls_attention"))
            return [torch.arange(f.shape[0]) for f in ctx.features]

        return [Stage(point="after_projector", keep=lambda n: n, choose=choose, signals=("cls_attention",))]


PLUGIN = types.SimpleNamespace(prunekit_register_methods=hookimpl(lambda register: register(Probe)))


def _probe(name):
    cls = registry.get("adapters", name)
    model = cls.tiny()
    row = cls.tiny_rows(model)[-1]  # several images
    SEEN.clear()
    with registered(PLUGIN, "cls_probe_plugin"):
        prunekit.build("cls_probe", model)
        model(**row)
        adapter = prunekit.adapter_for(model)
        prunekit.remove(model)
    model.set_attn_implementation("eager")
    return model, row, adapter, SEEN[0][0]


def _eager_cls(tower, pixels, layer):
    out = tower(pixel_values=pixels, output_attentions=True)
    return out.attentions[layer][:, :, 0, 1:].mean(1)  # [crops, patches]


def test_llava_next_base_view_matches_and_newlines_get_zero():
    model, row, adapter, rel = _probe("llava_next")
    cfg = model.config
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, 16) for s in row["image_sizes"].tolist()]
    pixels = torch.cat(  # the crops each image uses (a batch pads them)
        [row["pixel_values"][i, :c] for i, c in enumerate(crops)])
    eager = _eager_cls(model.model.vision_tower, pixels, cfg.vision_feature_layer)
    P = eager.shape[1]
    newline = (model.model.image_newline[None] == model.model.get_image_features(
        pixel_values=row["pixel_values"], image_sizes=row["image_sizes"]).pooler_output[0]).all(-1)
    start = 0
    for i, c in enumerate(crops):  # each image's tokens begin with its base view, in patch order
        torch.testing.assert_close(rel[start:start + P], eager[sum(crops[:i])], rtol=1e-5, atol=1e-6)
        if i == 0:
            assert torch.all(rel[: newline.shape[0]][newline] == 0) and newline.any()
            start += newline.shape[0]
    own = torch.cat([eager[sum(crops[:i]) + 1: sum(crops[: i + 1])].flatten() for i in range(len(crops))])
    crop_values = rel[P: newline.shape[0]][~newline[P:]]  # the first image's crop tokens
    assert all(bool(torch.isclose(v, own, rtol=1e-5, atol=1e-7).any()) for v in crop_values)


def test_internvl_tokens_average_a_2x2_patch_block():
    model, row, adapter, rel = _probe("internvl")
    cfg = model.config
    layer = cfg.vision_feature_layer
    out = model.model.vision_tower(pixel_values=row["pixel_values"], output_attentions=True)
    eager = out.attentions[layer][:, :, 0, 1:].mean(1).flatten()  # [tiles * patches]
    side = adapter._side()
    sources = torch.cat(adapter.token_sources(None, [rel.shape[0]], eager.shape[0]))
    r, c = (sources % (side * side)) // side, sources % side
    assert torch.all(r.max(1).values - r.min(1).values == 1) and torch.all(c.max(1).values - c.min(1).values == 1)
    assert torch.all(r.min(1).values % 2 == 0) and torch.all(c.min(1).values % 2 == 0)
    torch.testing.assert_close(rel, eager[sources].mean(1), rtol=1e-5, atol=1e-6)
