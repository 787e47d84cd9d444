"""Budgets per crop (``budget_per="crop"``) on AnyRes models: LLaVA-NeXT and LLaVA-OneVision images.

The official code of FasterVLM, SCOPE, VisionZip, VisPruner and CDPruner on LLaVA-NeXT reduces every 336-px crop
(the base view and each tile) on its own. Here: the runtime's per-crop selection equals the method's own stage run on
each crop's tokens alone, token for token; the row breaks, which belong to no crop, stay outside every budget (as the
official code's unpadding branch keeps them), so keeping every token changes nothing; ``budget_per="auto"`` picks
crops for those methods where the model has them; and a model without crops refuses ``budget_per="crop"``.
"""

from __future__ import annotations

import types
from typing import Literal

import pytest
import torch

import prunekit
from prunekit.plugin import Method, Stage, hookimpl
from prunekit import contracts as C
from prunekit.api import is_patched
from prunekit.config import MethodConfig
from prunekit.interfaces import Choice, StageContext
from prunekit.registry import registry
from prunekit.runtime.stages import PER_TOKEN_SIGNALS
from prunekit.testing import assert_pruned, batch_of, registered, tiny_adapter_model

#: the methods whose official code budgets per crop
CROP_METHODS = ["fastervlm", "scope", "visionzip", "vispruner", "cdpruner"]

SEEN: dict = {}


class _ProbeConfig(MethodConfig):
    point: Literal["vision_features", "after_projector"] = "vision_features"
    signals: tuple[str, ...] = ()


class Probe(Method):
    """Keeps every token (one budget per prompt) and records the features and signals a stage sees."""

    name = "crop_probe"
    Config = _ProbeConfig

    def plan(self, spec):
        cfg = self.config

        def choose(ctx):
            SEEN["features"] = ctx.features
            SEEN["signals"] = {name: ctx.relevance(name) for name in cfg.signals}
            return [torch.arange(f.shape[0]) for f in ctx.features]

        return [Stage(point=cfg.point, keep=lambda n: n, choose=choose, signals=cfg.signals)]


PLUGIN = types.SimpleNamespace(prunekit_register_methods=hookimpl(lambda register: register(Probe)))


def crop_labels(name: str, model, row: dict) -> tuple[torch.Tensor, int]:
    """Per visual token of one (unpadded) row: its unit — each crop of each image, then each video frame (a video's
    closing newline joins its last frame) — or -1 for a row break; and the first frame's unit. Read from the model's
    own ``pack_image_features`` run on crop labels, independently of the adapter."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    keys: list[torch.Tensor] = []
    if row.get("pixel_values") is not None:
        sizes = row["image_sizes"]
        count = C.NEXT_NUM_PATCHES.get() if name == "llava_next" else C.ONEVISION_NUM_PATCHES.get()
        start = 0
        for size in sizes:
            crops = count(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            labels = torch.arange(start, start + crops, dtype=torch.float64).repeat_interleave(side * side)
            extra = {"vision_feature_select_strategy": cfg.vision_feature_select_strategy} if name == "llava_next" \
                else {"vision_aspect_ratio": cfg.vision_aspect_ratio}
            newline = torch.tensor([-1.0], dtype=torch.float64)
            packed, _ = model.model.pack_image_features([labels.view(crops, side * side, 1)], size[None],
                                                        image_newline=newline, **extra)
            keys.append(packed[0][:, 0].long())
            start += crops
        first_frame = start
    else:
        first_frame = 0
    if row.get("pixel_values_videos") is not None:
        video_id = cfg.video_token_index
        tokens = int((row["input_ids"] == video_id).sum())
        frames = row["pixel_values_videos"].shape[1]
        per_frame = (tokens - 1) // frames
        frame = torch.arange(frames).repeat_interleave(per_frame)
        keys.append(first_frame + torch.cat([frame, frame[-1:]]))
    return torch.cat(keys), first_frame


def probe(model, row_or_batch: dict, point: str, signals: tuple[str, ...]) -> dict:
    """The features and signals a stage at ``point`` sees for these inputs (every token kept)."""
    SEEN.clear()
    with registered(PLUGIN, "crop_probe_plugin"):
        prunekit.build("crop_probe", model, point=point, signals=signals)
        with torch.no_grad():
            model(**row_or_batch)
        prunekit.remove(model)
    return dict(SEEN)


def alone(stage: Stage, seen: dict, b: int, idx: torch.Tensor, keep: int) -> Choice:
    """The stage run on one crop's tokens of sample ``b`` alone: its features and the prompt's signals cut to them."""
    def signal(name, options):
        assert not options, f"{name}: the probe records default options only"
        rows = seen["signals"][name][b]
        return [rows[idx] if name in PER_TOKEN_SIGNALS else rows]

    ctx = StageContext(stage, [seen["features"][b][idx]], [keep], signal)
    out = stage.choose(ctx)[0]
    return out if isinstance(out, Choice) else Choice(out)


def expected_per_crop(method: str, model, rows: list[dict], seen: dict, config: dict, name: str):
    """Per row: the kept indices and merged flags of ``method`` run on every unit alone, with the row breaks
    (kept as they are); and the row breaks."""
    spec = prunekit.adapter_for(model).describe()
    stage = registry.get("methods", method)(registry.get("methods", method).Config(**config)).plan(spec)[0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    out = []
    for b, row in enumerate(rows):
        labels, first_frame = crop_labels(name, model, row)
        kept, merged = [], []
        for unit in labels[labels >= 0].unique():
            idx = (labels == unit).nonzero().squeeze(1)
            size = idx.numel() if unit >= first_frame else side * side  # a crop's budget: from its patches
            choice = alone(stage, seen, b, idx, min(idx.numel(), stage.keep(size)))
            kept.append(idx[choice.indices.long()])
            merged.append(torch.zeros(choice.indices.numel(), dtype=torch.bool) if choice.merged is None
                          else choice.merged.bool())
        breaks = (labels < 0).nonzero().squeeze(1)
        kept, merged = torch.cat(kept + [breaks]), torch.cat(merged + [torch.zeros(breaks.numel(), dtype=torch.bool)])
        order = kept.argsort()
        out.append((kept[order], merged[order], breaks))
    return out


@pytest.mark.parametrize("keep", [3, 6])
@pytest.mark.parametrize("method", CROP_METHODS)
def test_llava_next_budgets_every_crop_alone(method, keep):
    """A padded batch of the tiny LLaVA-NeXT (one image; two images of 5 and 3 crops): by default every crop keeps
    ``keep`` of its tokens (all of them where unpadding left fewer), chosen as the method chooses on that crop alone;
    every row break is kept as it is, outside the crops' budgets."""
    model, rows = tiny_adapter_model("llava_next")
    inputs = batch_of(model, rows)
    stage = registry.get("methods", method)(registry.get("methods", method).Config(keep_tokens=keep)).plan(
        prunekit.adapter_for(model).describe())[0]
    seen = probe(model, inputs, stage.point, tuple(stage.signals))
    prunekit.build(method, model, keep_tokens=keep)
    assert model.__dict__["_prunekit_patch"].budget_per == "crop"  # budget_per="auto": the official unit
    with torch.no_grad():
        model(**inputs)
    report = assert_pruned(model)
    prunekit.remove(model)
    for b, (kept, merged, breaks) in enumerate(expected_per_crop(method, model, rows, seen, {"keep_tokens": keep},
                                                                  "llava_next")):
        assert report.stages[0].kept[b].tolist() == kept.tolist()
        assert report.stages[0].merged[b].tolist() == merged.tolist()
        assert breaks.numel() and set(breaks.tolist()) <= set(kept.tolist())
    assert report.stages[0].counts[1] > report.stages[0].counts[0]  # more crops, more tokens: a budget per crop


@pytest.mark.parametrize("method", CROP_METHODS)
def test_row_breaks_stay_outside_the_crop_budgets(method):
    """Under 'crop' every row break reaches the language model unchanged, outside the crops' budgets (the official
    code's unpadding branch keeps them all: FasterVLM L209-212, VisPruner L239-242, CDPruner L242-245), and keeping
    every token changes nothing; under 'prompt' they are candidates like any token, as before."""
    model, rows = tiny_adapter_model("llava_next")
    row = rows[1]
    newline = model.model.image_newline.detach()
    seen = {}

    def grab(module, args, kwargs):  # what the first decoder layer receives: after prunekit's pruning
        seen["embeds"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = model(**row).logits
            breaks = int((seen["embeds"][0] == newline).all(-1).sum())
            assert breaks > 0
            prunekit.build(method, model, keep_ratio=0.3)
            model(**row)
            assert int((seen["embeds"][0] == newline).all(-1).sum()) == breaks
            report = assert_pruned(model)
            labels, _ = crop_labels("llava_next", model, row)
            assert report.stages[0].counts == [breaks + int(torch.bincount(labels[labels >= 0]).clamp(max=5).sum())]
            prunekit.build(method, model, keep_ratio=1.0)
            assert torch.equal(model(**row).logits, ref)
            prunekit.build(method, model, keep_ratio=0.3, budget_per="prompt")
            model(**row)
            report = assert_pruned(model)
            assert model.__dict__["_prunekit_patch"].budget_per == "prompt"
            assert report.stages[0].counts == [round(0.3 * report.visual_tokens[0])]
    finally:
        handle.remove()
        prunekit.remove(model)


def test_llava_onevision_images_by_crop_videos_by_frame():
    """LLaVA-OneVision (SigLIP, no [CLS]): CDPruner budgets every crop of an image and, under 'crop', every video
    frame (a video has no crops), each chosen alone; row breaks stay; a padded batch."""
    model, rows = tiny_adapter_model("llava_onevision")
    inputs = batch_of(model, rows)
    config = {"keep_tokens": 3}
    stage = registry.get("methods", "cdpruner")(registry.get("methods", "cdpruner").Config(**config)).plan(
        prunekit.adapter_for(model).describe())[0]
    seen = probe(model, inputs, stage.point, tuple(stage.signals))
    prunekit.build("cdpruner", model, **config)
    assert model.__dict__["_prunekit_patch"].budget_per == "crop"
    with torch.no_grad():
        model(**inputs)
    report = assert_pruned(model)
    prunekit.remove(model)
    for b, (kept, merged, breaks) in enumerate(expected_per_crop("cdpruner", model, rows, seen, config,
                                                                  "llava_onevision")):
        assert report.stages[0].kept[b].tolist() == kept.tolist()
        assert set(breaks.tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_budget_per_crop_on_a_model_without_crops_is_refused(name):
    model, _ = tiny_adapter_model(name)
    model_class = type(model).__name__
    with pytest.raises(ValueError, match=rf"budget_per='crop' cannot apply to {model_class}: its images are not "
                                         "split into crops"):
        prunekit.build("tops", model, keep_tokens=8, budget_per="crop", insertion_points=["after_projector"])
    assert not is_patched(model)


def test_auto_is_the_prompt_where_the_model_has_no_crops():
    """On LLaVA-1.5 the crop methods keep one budget per prompt, as before; methods without an official unit keep
    'prompt' everywhere."""
    model, rows = tiny_adapter_model("llava")
    prunekit.build("fastervlm", model, keep_tokens=8)
    assert model.__dict__["_prunekit_patch"].budget_per == "prompt"
    assert model.__dict__["_prunekit_patch"].config.budget_per == "auto"  # the config stays as given
    with torch.no_grad():
        model(**rows[1])  # two images
    assert assert_pruned(model).stages[0].counts == [8]
    prunekit.remove(model)
    next_model, _ = tiny_adapter_model("llava_next")
    prunekit.build("tops", next_model, keep_tokens=8, insertion_points=["after_projector"])
    assert next_model.__dict__["_prunekit_patch"].budget_per == "prompt"
    prunekit.remove(next_model)
    assert registry.get("methods", "tops").official_budget_per == "prompt"
    assert all(registry.get("methods", m).official_budget_per == "crop" for m in CROP_METHODS)


def test_crop_budgets_in_generate_with_an_in_llm_stage():
    """TOPS with budget_per='crop' (stage I before the LLM, stages II-III inside it): every stage budgets per crop,
    generate runs on the pruned cache, and the report's per-stage counts add up the crops' counts."""
    model, rows = tiny_adapter_model("llava_next", num_layers=8)
    row = rows[1]
    prunekit.build("tops", model, schedule=[6, 4, 2], budget_per="crop", raters="last_token")
    with torch.no_grad():
        model.generate(**row, max_new_tokens=3, do_sample=False)
    report = assert_pruned(model)
    prunekit.remove(model)
    labels, _ = crop_labels("llava_next", model, row)
    crops = labels[labels >= 0].unique().numel()
    present = torch.bincount(labels[labels >= 0])
    breaks = int((labels < 0).sum())
    for stage, k in zip(report.stages, [6, 4, 2]):
        assert stage.counts == [breaks + int(present.clamp(max=k).sum())]
        kept = labels[stage.kept[0]]
        assert int((kept < 0).sum()) == breaks  # the row breaks stay through every stage
        assert torch.bincount(kept[kept >= 0], minlength=crops).tolist() == present.clamp(max=k).tolist()
