"""Tiny checkpoints of every family ``lmms-eval --model prunekit`` maps, for running lmms-eval end to end offline.

``save(family, folder)`` writes a random-weight model (the family adapter's ``tiny()``), a word-level tokenizer that
holds the family's special tokens at the ids its config uses, a chat template and the family's PIL image processor,
so that ``from_pretrained(folder)`` works for lmms-eval's wrapper exactly as for a published checkpoint.

Run as a script, this module is ``python -m lmms_eval`` with two stand-ins for what needs torchvision (PyPI's
torchvision is a CUDA build that does not import beside a CPU torch), installed only where torchvision cannot be
imported:

- the processors of families that also take videos (Qwen*-VL, LLaVA-OneVision, InternVL, Video-LLaVA) hold a
  torchvision video processor; the tiny folders name an images-only subclass of the family's processor (same
  ``__call__``, no video processor), registered with ``AutoProcessor`` here;
- ``qwen_vl_utils`` (which lmms-eval's Qwen wrappers use to read their messages' images) imports torchvision; a
  stand-in returns the messages' images as RGB PIL images (videos are refused) and leaves the resizing to the
  processor.

Images only: no video task runs here.
"""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: vocabulary size of every tiny model (``MultimodalAdapter.tiny_text_config``)
VOCAB = 128


@dataclass
class Family:
    adapter: str
    #: special tokens at fixed ids (the ids the tiny config uses), beside <pad>=0, <s>=1, </s>=2
    specials: dict[str, int]
    #: what the chat template writes for an image part of a message (a string content is written as it is)
    image_text: str
    #: the processor: "llava_next", "onevision", "qwen2_vl", "qwen3_vl", "gemma3", "internvl", "video_llava"
    processor: str
    #: tokenizer attributes naming special tokens (``extra_special_tokens``)
    named: dict[str, str] = field(default_factory=dict)
    #: ``--model_args`` the family needs here (small images for the tiny vision towers)
    model_args: str = ""


QWEN_SPECIALS = {"<|image_pad|>": 120, "<|video_pad|>": 121, "<|vision_start|>": 122, "<|vision_end|>": 123}
QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
              "vision_eos_token": "<|vision_end|>"}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PIXELS = "min_pixels=1024,max_pixels=4096"  # 32x32 to 64x64 pixels: 16 to 64 visual tokens at patch 4, merge 2

FAMILIES: dict[str, Family] = {
    "llava_next": Family("llava_next", {"<image>": 127}, "<image>\n", "llava_next", {"image_token": "<image>"}),
    "llava_onevision": Family("llava_onevision", {"<image>": 120, "<video>": 121}, "<image>\n", "onevision",
                              {"image_token": "<image>", "video_token": "<video>"}),
    "qwen2_vl": Family("qwen2_vl", QWEN_SPECIALS, QWEN_IMAGE, "qwen2_vl", QWEN_NAMED, QWEN_PIXELS),
    "qwen2_5_vl": Family("qwen2_5_vl", QWEN_SPECIALS, QWEN_IMAGE, "qwen2_vl", QWEN_NAMED, QWEN_PIXELS),
    "qwen3_vl": Family("qwen3_vl", QWEN_SPECIALS, QWEN_IMAGE, "qwen3_vl", QWEN_NAMED, QWEN_PIXELS),
    "gemma3": Family("gemma3", {"<image_soft_token>": 120, "<start_of_image>": 121, "<end_of_image>": 122},
                     "<start_of_image>", "gemma3",
                     {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                      "eoi_token": "<end_of_image>"}),
    "internvl": Family("internvl", {"<IMG_CONTEXT>": 120, "<img>": 121, "</img>": 122, "<video>": 123}, "<IMG_CONTEXT>\n",
                       "internvl", {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                    "end_image_token": "</img>", "video_token": "<video>"}),
    "video_llava": Family("video_llava", {"<image>": 120, "<video>": 121}, "<image>\n", "video_llava",
                          {"image_token": "<image>", "video_token": "<video>"}),
}

SPECIALS = ("<unk>", "<|im_start|>", "<|im_end|>")
#: the chat templates' words and the local task's (tests/lmms_eval_task: shapes questions and their answers)
WORDS = ("system", "user", "assistant", "model", ":", "what", "color", "colors", "shape", "is", "the", "object",
         "objects", "in", "top", "bottom", "left", "right", "how", "many", "are", "there", "a", "?", "yes", "no",
         "red", "green", "blue", "yellow", "purple", "cyan", "circle", "square", "triangle", "diamond", "circles",
         "squares", "triangles", "diamonds", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine", "ten")


def chat_template(image_text: str) -> str:
    """A minimal chat template: each turn is ``<|im_start|>role\\n ... <|im_end|>``; a list content writes its image
    parts as ``image_text`` and its text parts as they are."""
    return ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}" + image_text +
            "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(family: Family):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = {"<pad>": 0, "<s>": 1, "</s>": 2, **family.specials}
    words = list(dict.fromkeys((*SPECIALS, *WORDS)))
    free = [i for i in range(VOCAB) if i not in fixed.values()]
    if len(words) > len(free):
        raise ValueError(f"{len(words)} words do not fit the {len(free)} free ids of a {VOCAB}-token vocabulary")
    vocab = dict(fixed)
    vocab.update(zip(words, free))
    vocab.update({f"<unused{i}>": i for i in free[len(words):]})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*fixed, *SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", extra_special_tokens=family.named,
                                   chat_template=chat_template(family.image_text))


def images_only(processor_class: type) -> type:
    """``processor_class`` without its video processor (which needs torchvision): the same ``__call__`` on images,
    and the same other arguments (transformers reads their names from ``__init__``'s code to save and load them)."""
    import inspect

    names = [n for n, p in inspect.signature(processor_class.__init__).parameters.items()
             if n not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD]
    source = (f"def __init__(self, {', '.join(f'{n}=UNSET' for n in names)}, **kwargs):\n"
              f"    given = {{k: v for k, v in dict({', '.join(f'{n}={n}' for n in names)}).items() if v is not UNSET}}\n"
              f"    original(self, video_processor=None, **given, **kwargs)\n")
    scope = {"UNSET": object(), "original": processor_class.__init__}
    exec(source, scope)  # noqa: S102 - a signature made from the processor's own parameter names
    return type(f"{processor_class.__name__}ImagesOnly", (processor_class,), {"__init__": scope["__init__"],
                                                                              "__module__": __name__})


def processor_classes() -> dict[str, tuple[type, type]]:
    """(config class, images-only processor class) per processor that holds a video processor."""
    import transformers as T

    pairs = {
        "qwen2_vl": (T.Qwen2VLConfig, T.Qwen2VLProcessor), "qwen2_5_vl": (T.Qwen2_5_VLConfig, T.Qwen2_5_VLProcessor),
        "qwen3_vl": (T.Qwen3VLConfig, T.Qwen3VLProcessor),
        "onevision": (T.LlavaOnevisionConfig, T.LlavaOnevisionProcessor),
        "internvl": (T.InternVLConfig, T.InternVLProcessor),
    }
    return {k: (config, images_only(proc)) for k, (config, proc) in pairs.items()}


def build_processor(name: str, model, tokenizer):
    import transformers as T

    family = FAMILIES[name]
    cfg = model.config
    template = chat_template(family.image_text)
    kind = family.processor if name != "qwen2_5_vl" else "qwen2_5_vl"
    if family.processor == "llava_next":
        side = cfg.vision_config.image_size
        images = T.LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                              image_grid_pinpoints=cfg.image_grid_pinpoints)
        return T.LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=cfg.vision_config.patch_size,
                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                    num_additional_image_tokens=1, chat_template=template)
    if family.processor == "gemma3":
        side = cfg.vision_config.image_size
        images = T.Gemma3ImageProcessorPil(size={"height": side, "width": side})
        return T.Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                                 image_seq_length=cfg.mm_tokens_per_image)
    _, cls = processor_classes()[kind]
    if family.processor in ("qwen2_vl", "qwen3_vl"):
        v = cfg.vision_config
        pil = T.Qwen2VLImageProcessorPil
        images = pil(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                     min_pixels=1024, max_pixels=4096)
        return cls(image_processor=images, tokenizer=tokenizer, chat_template=template)
    if family.processor == "onevision":
        side = cfg.vision_config.image_size
        images = T.LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                   image_grid_pinpoints=cfg.image_grid_pinpoints)
        side_tokens = side // cfg.vision_config.patch_size
        return cls(image_processor=images, tokenizer=tokenizer, num_image_tokens=side_tokens * side_tokens,
                   vision_feature_select_strategy=cfg.vision_feature_select_strategy, chat_template=template,
                   vision_aspect_ratio=cfg.vision_aspect_ratio)
    if family.processor == "internvl":
        side = cfg.vision_config.image_size[0]
        images = T.GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=False)
        return cls(image_processor=images, tokenizer=tokenizer, image_seq_length=cfg.image_seq_length,
                   chat_template=template)
    if family.processor == "video_llava":
        side = cfg.vision_config.image_size
        images = T.VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return cls(image_processor=images, tokenizer=tokenizer, patch_size=cfg.vision_config.patch_size,
                   vision_feature_select_strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1,
                   chat_template=template)
    raise ValueError(name)


def tiny_model(name: str):
    from prunekit.registry import registry

    return registry.get("adapters", FAMILIES[name].adapter).tiny(num_layers=4)


def save(name: str, folder: Path):
    """Write the tiny checkpoint of family ``name`` to ``folder``; returns the model."""
    model = tiny_model(name)
    tokenizer = build_tokenizer(FAMILIES[name])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    build_processor(name, model, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


# -- stand-ins for what needs torchvision, installed in the lmms-eval process ---------------------------------------
def _image(element):
    from PIL import Image

    image = element.get("image", element.get("image_url"))
    if isinstance(image, dict):
        image = image.get("url")
    if isinstance(image, str):
        if image.startswith("data:"):
            image = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1])))
        else:
            image = Image.open(image.removeprefix("file://"))
    return image.convert("RGB")


def _fit(image, element: dict, patch: int):
    """``image`` scaled to sides that are multiples of two patches, within the element's min/max pixels (wrappers
    that pass ``do_resize=False`` to the processor rely on this, as on qwen_vl_utils)."""
    import math

    factor = 2 * patch
    low, high = element.get("min_pixels", 4 * factor * factor), element.get("max_pixels", 16384 * factor * factor)
    w, h = image.size
    scale = math.sqrt(high / (w * h)) if w * h > high else math.sqrt(low / (w * h)) if w * h < low else 1.0
    snap = math.floor if scale < 1 else math.ceil
    size = [max(factor, snap(side * scale / factor) * factor) for side in (w, h)]
    return image.resize(tuple(size))


def process_vision_info(conversations, return_video_kwargs=False, return_video_metadata=False, image_patch_size=14,
                        **kwargs):
    """Images of the messages (``conversations``: one conversation or a list of them) in order; no videos."""
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    images = []
    for conversation in conversations:
        for message in conversation:
            if not isinstance(message.get("content"), list):
                continue
            for part in message["content"]:
                if "video" in part or part.get("type") == "video":
                    raise NotImplementedError("the test stand-in for qwen_vl_utils reads no videos")
                if "image" in part or "image_url" in part or part.get("type") in ("image", "image_url"):
                    images.append(_fit(_image(part), part, image_patch_size))
    out = (images or None, None)
    return (*out, {}) if return_video_kwargs else out


def install_stand_ins() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        pass
    import types

    from transformers import AutoProcessor

    for config, cls in processor_classes().values():
        AutoProcessor.register(config, cls, exist_ok=True)
        setattr(sys.modules[__name__], cls.__name__, cls)
    module = types.ModuleType("qwen_vl_utils")
    module.process_vision_info = process_vision_info
    sys.modules["qwen_vl_utils"] = module


if __name__ == "__main__":
    install_stand_ins()
    from lmms_eval.cli.dispatch import main

    main()
    sys.exit(0)
