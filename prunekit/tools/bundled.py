"""The small LLaVA that ships with prunekit, trained on :mod:`prunekit.data` shapes questions.

It is a genuine ``LlavaForConditionalGeneration`` (CLIP ViT with a [CLS] token, MLP projector, Llama decoder), loaded
with the normal ``from_pretrained`` from a folder inside the package, so everything runs offline::

    model, processor = prunekit.bundled.load()
    inputs = processor(images=image, text=prunekit.bundled.prompt("what color is the circle?"), return_tensors="pt")
    answer = processor.decode(model(**inputs).logits[0, -1].argmax())

This module also holds what the training script (``scripts/train_bundled.py``) needs to build the untrained model:
the word-level tokenizer, the processor, the config, and the per-patch labels of a scene.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.shapes import COLORS, NUMBERS, QUADRANTS, SHAPES, Obj, draw_object

#: where the trained weights, tokenizer and processor live inside the package
MODEL_DIR = Path(__file__).parent / "assets" / "shapes-llava"

IMAGE_SIZE = 192
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 x 12 = 144 visual tokens
IMAGE_TOKEN = "<image>"
CENTER_WORD = "<center>"  # the word a patch holding an object's centre is aligned to (see patch_targets)
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, CENTER_WORD)
ANSWERS = tuple(COLORS) + SHAPES + ("yes", "no") + NUMBERS


def vocabulary() -> list[str]:
    words = ["what", "color", "colors", "shape", "is", "the", "object", "objects", "in", "how", "many", "are",
             "there", "a", "?", *(f"{s}s" for s in SHAPES)]
    words += [w for q in QUADRANTS for w in q.split()]
    vocab: list[str] = []
    for w in (*SPECIALS, *ANSWERS, *words):
        if w not in vocab:
            vocab.append(w)
    return vocab


#: the processor's chat template: a user turn of one image and a question becomes the prompt below
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
                 "{% endif %}{% endfor %}{% endfor %}")


def prompt(question: str) -> str:
    """The bundled model's prompt: the image first, then the question; the next word is the answer."""
    return f"{IMAGE_TOKEN}\n{question}"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(IMAGE_TOKEN, "isolated"),
                                                 pre_tokenizers.Whitespace()])
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN})


def build_processor(tokenizer=None):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_config(*, vision_layers: int = 4, vision_width: int = 128, text_layers: int = 8, text_width: int = 192,
                 text_heads: int = 6):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_width // 32,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=vision_width)
    text = LlamaConfig(hidden_size=text_width, intermediate_size=3 * text_width, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, num_key_value_heads=text_heads, vocab_size=len(vocab),
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=True)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab.index(IMAGE_TOKEN),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=True)


def patch_labels(objects: list[Obj], image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                 min_cover: float = 0.25) -> dict[str, torch.Tensor]:
    """Per-patch labels of a scene, row-major: ``color`` / ``shape`` (0 = background, else 1 + index into COLORS /
    SHAPES) of the object covering the largest share of the patch if it covers at least ``min_cover`` of it,
    ``center`` (1 where an object's centre lies) and ``quadrant`` (index into QUADRANTS)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, o in enumerate(objects):
        draw_object(draw, o, image_size, i + 1)
    ids = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(image_size, image_size).long()
    g = image_size // patch_size
    blocks = ids.view(g, patch_size, g, patch_size).permute(0, 2, 1, 3).reshape(g * g, -1)
    counts = torch.zeros(g * g, len(objects) + 1, dtype=torch.long).scatter_add_(1, blocks, torch.ones_like(blocks))
    counts[:, 0] = 0
    share, owner = counts.max(1)
    owner = torch.where(share >= min_cover * patch_size ** 2, owner, torch.zeros_like(owner))
    color_ix = torch.tensor([0] + [1 + list(COLORS).index(o.color) for o in objects])
    shape_ix = torch.tensor([0] + [1 + SHAPES.index(o.shape) for o in objects])
    center = torch.zeros(g * g, dtype=torch.long)
    for o in objects:
        center[min(int(o.y * g), g - 1) * g + min(int(o.x * g), g - 1)] = 1
    rows, cols = torch.arange(g * g) // g, torch.arange(g * g) % g
    quadrant = (rows >= g / 2).long() * 2 + (cols >= g / 2).long()
    return {"color": color_ix[owner], "shape": shape_ix[owner], "center": center, "quadrant": quadrant}


def patch_targets(labels: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """The embedding each patch is aligned to: the sum of the word embeddings of its colour, shape and quadrant
    words, plus :data:`CENTER_WORD` where an object's centre lies. ``labels`` may carry leading batch dimensions."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    colors = torch.tensor([vocab[c] for c in COLORS])
    shapes = torch.tensor([vocab[s] for s in SHAPES])
    vert = torch.tensor([vocab["top"], vocab["top"], vocab["bottom"], vocab["bottom"]])
    horiz = torch.tensor([vocab["left"], vocab["right"], vocab["left"], vocab["right"]])
    c, s = labels["color"], labels["shape"]
    out = embeddings[vert[labels["quadrant"]]] + embeddings[horiz[labels["quadrant"]]]
    out = out + (c > 0).unsqueeze(-1) * embeddings[colors[(c - 1).clamp(min=0)]]
    out = out + (s > 0).unsqueeze(-1) * embeddings[shapes[(s - 1).clamp(min=0)]]
    return out + labels["center"].unsqueeze(-1) * embeddings[vocab[CENTER_WORD]]


def load(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, processor)`` of the bundled model (or of a trained copy at ``path``), loaded offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {path}: expected config.json and model.safetensors there "
                                f"(train one with scripts/train_bundled.py)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


__all__ = ["MODEL_DIR", "ANSWERS", "IMAGE_SIZE", "PATCH_SIZE", "GRID", "vocabulary", "prompt", "build_tokenizer",
           "build_processor", "build_config", "patch_labels", "patch_targets", "load"]
