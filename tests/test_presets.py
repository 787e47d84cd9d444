"""TOPS presets: picked from a model's config as loaded by the user's own from_pretrained (local files)."""

import pytest
import torch

import prunekit
from prunekit.registry import registry
from prunekit_plugins.methods.tops import PRESETS

ADAPTER_OF_FAMILY = {"llava": "llava", "llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl",
                     "internvl": "internvl", "llava_onevision": "llava_onevision"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices run faster on one thread (and much faster on a busy machine); counts do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_found_from_a_saved_config(preset, tmp_path):
    import transformers

    spec = PRESETS[preset]
    adapter = registry.get("adapters", ADAPTER_OF_FAMILY[spec["family"]])
    model = adapter.tiny(num_layers=spec["num_layers"])
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path, attn_implementation="sdpa")
    named = {} if spec.get("auto", True) else {"preset": preset}
    prunekit.build("tops", loaded, keep_tokens=8 if spec["layers"] else 2, **named)
    stages = loaded.__dict__["_prunekit_patch"].layer_stages
    patch = loaded.__dict__["_prunekit_patch"]
    if spec["layers"] is None:
        assert stages == [] and patch.budget_per == spec["budget_per"]
    else:
        assert [s.layer for s in stages] == list(spec["layers"])
    rows = adapter.tiny_rows(loaded)
    loaded.generate(**rows[-1], max_new_tokens=2, do_sample=False)  # the preset runs
    assert prunekit.pruning_report(loaded).stages


def test_unknown_preset_names_the_presets():
    model = registry.get("adapters", "llava").tiny()
    with pytest.raises(ValueError, match="llava-next-13b"):
        prunekit.build("tops", model, preset="llava-next-31b")


#: The paper's schedules (Appendix C, Tables 9 and 10), typed from the spec: nominal T -> visual tokens kept before
#: the LLM, from p1 and from p2 (LLaVA-Video: per frame, before the LLM only).
LLAVA = {128: [256, 128, 32], 64: [128, 64, 16], 32: [64, 32, 8]}
NEXT = {640: [1280, 640, 160], 320: [640, 320, 80], 160: [320, 160, 40]}
QWEN = {512: [512, 281, 77], 256: [256, 139, 39], 128: [128, 71, 19]}
#: preset -> (schedules, layers p1 and p2, decoder depth, visual tokens of the tiny model's prompt)
PAPER = {
    "llava-1.5-7b": (LLAVA, (12, 24), 32, 576), "llava-1.5-13b": (LLAVA, (15, 30), 40, 576),
    "llava-next-7b": (NEXT, (12, 24), 32, 2928), "llava-next-13b": (NEXT, (15, 30), 40, 2928),
    "qwen2.5-vl-7b": (QWEN, (12, 16), 28, 1296), "internvl3-8b": (QWEN, (12, 16), 28, 1280),
    "llava-video-7b": ({64: [64], 32: [32], 16: [16]}, (), 28, 3 * 169 + 1),
}
#: The paper's stage-II (α, λ) for each (backbone, T) it states them for.
WEIGHTS = [
    ("llava-1.5-7b", 128, (0.5, 0.5)), ("llava-1.5-7b", 64, (0.5, 1.0)), ("llava-1.5-7b", 32, (0.5, 1.0)),
    *[("llava-1.5-13b", t, (0.5, 0.4)) for t in LLAVA],
    ("llava-next-7b", 640, (0.5, 0.5)), ("llava-next-7b", 320, (0.5, 0.4)), ("llava-next-7b", 160, (0.5, 0.5)),
    *[("llava-next-13b", t, (0.5, 0.5)) for t in NEXT],
    *[("qwen2.5-vl-7b", t, (0.5, 0.4)) for t in QWEN],
    ("internvl3-8b", 256, (0.2, 0.2)), ("internvl3-8b", 128, (0.3, 0.2)),
]


def _layer_average(n, counts, layers, num_layers):
    """Visual tokens summed over the decoder layers, divided by their number, written out layer by layer."""
    seen = []
    for layer in range(num_layers):
        count = counts[0] if counts else n
        for first, c in zip(layers, counts[1:]):
            if layer >= first:
                count = c
        seen.append(count)
    return sum(seen) / num_layers


def _rebuilt(model, **changes):
    """``model``'s architecture with some of its config changed (the paper's visual-token geometry)."""
    cfg = model.config
    for key, value in changes.items():
        target = cfg.vision_config if key in ("image_size", "patch_size") else cfg
        setattr(target, key, value)
    torch.manual_seed(0)
    return type(model)._from_config(cfg, attn_implementation="sdpa").eval()


def _paper_sized(preset):
    """A tiny model of the preset's family and depth fed the paper's number of visual tokens, and its inputs.

    LLaVA-1.5: a 336-pixel image in 14-pixel patches, 576 tokens. LLaVA-NeXT: a 672×672 image in AnyRes, 2,880
    tokens plus the 48 row-end newline tokens the HF model adds (2,928). Qwen2.5-VL: a 72×72-patch image, 1,296
    tokens after the 2×2 merger. InternVL3: 5 tiles of 256 tokens, 1,280. LLaVA-Video: 3 frames of 13×13 = 169
    tokens (the paper's 64 frames only multiply the counts) and the video's closing newline.
    """
    from prunekit.testing import prompt_ids

    family, depth = PRESETS[preset]["family"], PRESETS[preset]["num_layers"]
    adapter = registry.get("adapters", ADAPTER_OF_FAMILY[family])
    g = torch.Generator().manual_seed(1)
    if family == "llava":
        from prunekit.testing import tiny_llava, tiny_llava_inputs

        model = tiny_llava(num_layers=depth, image_size=336, patch_size=14)
        return model, tiny_llava_inputs(model, batch=1, left_pad=(0,))
    model = adapter.tiny(num_layers=depth)
    cfg = model.config
    if family == "llava_next":
        from prunekit import contracts as C

        pinpoints = [[336, 672], [672, 336], [672, 672]]
        model = _rebuilt(model, image_size=336, patch_size=14, image_grid_pinpoints=pinpoints)
        sizes = torch.tensor([[672, 672]])
        crops = C.NEXT_NUM_PATCHES.get()((672, 672), model.config.image_grid_pinpoints, 336)
        pixels = torch.randn(1, crops, 3, 336, 336, generator=g)
        n = C.ENCODED_TOKENS.get(model.model.get_image_features(pixels, sizes))[0].shape[0]
        ids = prompt_ids(model, [n], cfg.image_token_id)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                       "image_sizes": sizes}
    if family == "qwen2_5_vl":
        v = cfg.vision_config
        thw = torch.tensor([(1, 72, 72)])
        pixels = torch.randn(72 * 72, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=g)
        ids = torch.tensor([[3, 4, cfg.vision_start_token_id] + [cfg.image_token_id] * 1296
                            + [cfg.vision_end_token_id, 5, 6, 7]])
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                       "image_grid_thw": thw, "mm_token_type_ids": (ids == cfg.image_token_id).int()}
    if family == "internvl":
        model = _rebuilt(model, image_size=[64, 64], image_seq_length=256)  # 32×32 patches, pixel-shuffled to 16×16
        ids = prompt_ids(model, [5 * 256], cfg.image_token_id)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "pixel_values": torch.randn(5, 3, 64, 64, generator=g)}
    assert family == "llava_onevision"
    from prunekit import contracts as C

    model = _rebuilt(model, image_size=52, patch_size=2)  # 26×26 patches, pooled to 13×13 per frame
    video = torch.randn(1, 3, 3, 52, 52, generator=g)
    n = adapter(model).prompt_tokens(C.ENCODE_VIDEOS.path, {}, model.model.get_video_features(video))[0]
    ids = torch.tensor([[3, 4] + [cfg.video_token_index] * n + [5, 6, 7]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": video}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_presets_keep_the_papers_counts(preset):
    """Every (backbone, T) of the paper's Tables 9 and 10: the counts each stage keeps, read back with
    prunekit.pruning_report after a forward of a tiny model of that depth fed the paper's number of visual tokens; and
    the layer average next to the nominal T (LLaVA-1.5-7B, T = 128: 152)."""
    table, layers, depth, tokens = PAPER[preset]
    model, inputs = _paper_sized(preset)
    named = {} if PRESETS[preset].get("auto", True) else {"preset": preset}  # the others are found from the model
    averages = {}
    for T, counts in table.items():
        prunekit.build("tops", model, keep_tokens=T, **named)
        model(**inputs)
        report = prunekit.pruning_report(model)
        n = report.visual_tokens[0]
        assert n == tokens and [s.layer for s in report.stages] == [None, *layers]
        if preset == "llava-video-7b":  # per frame: 3 frames of 169 tokens, the last also holds the newline
            kept = report.stages[0].kept[0]
            assert torch.bincount((kept // 169).clamp(max=2), minlength=3).tolist() == [counts[0]] * 3
            assert report.stages[0].counts == [3 * counts[0]]
            continue
        assert [s.counts[0] for s in report.stages] == counts, (preset, T)
        averages[T] = report.layer_average[0]
        assert averages[T] == _layer_average(n, counts, layers, depth)
    if preset == "llava-1.5-7b":  # T = 128: (12·256 + 12·128 + 8·32) / 32
        assert averages == {128: 152.0, 64: 76.0, 32: 38.0}
    prunekit.remove(model)


@pytest.mark.parametrize("preset, T, weights", WEIGHTS)
def test_preset_weights_follow_the_budget(preset, T, weights):
    from prunekit.interfaces import ModelSpec
    from prunekit_plugins.methods.tops import Tops, TopsConfig

    spec = PRESETS[preset]
    method = Tops(TopsConfig(keep_tokens=T))
    assert method._decoder_weights(spec, float(T)) == weights
    plan = method.plan(ModelSpec(family=spec["family"], num_layers=spec["num_layers"], hidden_size=64))
    assert [s.layer for s in plan] == [None, *spec["layers"]]


def test_budgets_the_paper_does_not_list():
    """Other T: the counts of the nearest listed T scaled by T / T_listed, rounded half up (ties: the smaller T);
    T >= the tokens present keeps everything; 'layer_average' reads T as the layer average."""
    from prunekit.interfaces import ModelSpec
    from prunekit_plugins.methods.tops import Tops, TopsConfig

    def counts(family, depth, n, **fields):
        return [s.keep(n) for s in Tops(TopsConfig(**fields)).plan(ModelSpec(family, depth, 64))]

    assert counts("llava", 32, 576, keep_tokens=100) == [200, 100, 25]
    assert counts("llava", 32, 576, keep_tokens=30) == [60, 30, 8]  # 7.5 rounds up
    assert counts("llava", 32, 576, keep_tokens=300) == [576, 300, 75]  # 2T capped by the 576 present
    assert counts("llava", 32, 576, keep_ratio=1.0) == [576, 576, 576]
    assert counts("qwen2_5_vl", 28, 1296, keep_tokens=200) == [200, 109, 30]  # nearest listed: 256
    assert counts("qwen2_5_vl", 28, 1296, keep_tokens=192) == [192, 107, 29]  # a tie: 128's ratios
    avg = counts("llava", 32, 576, keep_tokens=128, budget_meaning="layer_average")
    assert avg == [216, 108, 27] and abs(_layer_average(576, avg, (12, 24), 32) - 128) <= 0.5
    # no preset (8 layers): T is the layer average, 2T → T → T/4 scaled to it
    assert abs(_layer_average(576, counts("llava", 8, 576, keep_tokens=64), (3, 6), 8) - 64) <= 0.5
    # InternVL3 at T = 512: the paper states no (α, λ); the nearest listed T (256) gives (0.2, 0.2)
    assert Tops(TopsConfig(keep_tokens=512))._decoder_weights(PRESETS["internvl3-8b"], 512.0) == (0.2, 0.2)
    with pytest.raises(ValueError, match="no counts"):
        Tops(TopsConfig(keep_tokens=64, preset="llava-video-7b", insertion_points=["decoder_layer"])).plan(
            ModelSpec("llava_onevision", 28, 64))
