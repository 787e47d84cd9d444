"""Procedural visual question answering on small coloured shapes, deterministic per seed.

Each image has a few small shapes on a smooth, noisy, tinted background, so most patches carry nothing the answer
needs. Every question has a one-word answer, and the question types stress the three TOPS principles:

* ``color`` / ``shape`` — an attribute of the one object the question names (task relevance);
* ``exist`` / ``count`` — whether / how many objects match (coverage: every matching object must survive);
* ``spatial`` — the colour of the only object in a named quadrant (positions must survive pruning);
* ``colors`` — how many different colours are present (diversity: one token of each colour must survive).

Samples are a pure function of ``(seed, split, index)``; splits never share a scene.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.07, "medium": 0.095, "large": 0.12}  # radius as a fraction of the image side
QUESTION_TYPES = ("color", "shape", "exist", "count", "spatial", "colors")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float

    @property
    def quadrant(self) -> str:
        return f"{'top' if self.y < 0.5 else 'bottom'} {'left' if self.x < 0.5 else 'right'}"


@dataclass
class VQASample:
    image: Image.Image
    question: str
    answer: str
    type: str
    objects: list[Obj] = field(default_factory=list)


def _scene(rng: random.Random, min_objects: int, max_objects: int) -> list[Obj]:
    n = rng.randint(min_objects, max_objects)
    objects: list[Obj] = []
    while len(objects) < n:
        for _ in range(200):  # rejection sampling: no overlaps, nothing cut by the border, off the quadrant lines
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            if abs(x - 0.5) < r or abs(y - 0.5) < r:
                continue
            if all(math.hypot(x - o.x, y - o.y) > r + SIZES[o.size] + 0.03 for o in objects):
                objects.append(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), size, x, y))
                break
        else:  # the image is full: start the scene again
            objects = []
            n = rng.randint(min_objects, max_objects)
    return objects


def render_scene(objects: list[Obj], size: int, seed: int) -> Image.Image:
    """Draw ``objects`` on a smooth tinted background with pixel noise (deterministic per ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(2, 2, 3, generator=g) * 90 + 110  # a pale bilinear gradient
    t = torch.linspace(0, 1, size)
    wy, wx = t[:, None, None], t[None, :, None]
    base = (corners[0, 0] * (1 - wy) * (1 - wx) + corners[0, 1] * (1 - wy) * wx
            + corners[1, 0] * wy * (1 - wx) + corners[1, 1] * wy * wx)
    noise = torch.randn(size, size, 3, generator=g) * 12
    pixels = (base + noise).clamp(0, 255).to(torch.uint8)
    image = Image.frombytes("RGB", (size, size), pixels.numpy().tobytes())
    draw = ImageDraw.Draw(image)
    for o in objects:
        jitter = torch.randint(-15, 16, (3,), generator=g).tolist()
        draw_object(draw, o, size, tuple(max(0, min(255, c + j)) for c, j in zip(COLORS[o.color], jitter)))
    return image


def draw_object(draw: ImageDraw.ImageDraw, o: Obj, size: int, fill) -> None:
    """Draw one shape on an image ``size`` pixels wide (also used to draw label maps with integer fills)."""
    cx, cy, r = o.x * size, o.y * size, SIZES[o.size] * size
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def make_question(objects: list[Obj], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A ``(question, answer)`` of type ``kind`` about ``objects``, or None when the scene cannot support one."""
    if kind in ("color", "shape"):  # name the object by its other attribute, which must be unique in the scene
        named_by = "shape" if kind == "color" else "color"
        unique = [o for o in objects if sum(getattr(p, named_by) == getattr(o, named_by) for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        if kind == "color":
            return f"what color is the {o.shape}?", o.color
        return f"what shape is the {o.color} object?", o.shape
    if kind == "exist":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"is there a {color} {shape}?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
        return f"is there a {color} {shape}?", "no"
    if kind == "count":
        if rng.random() < 0.5:
            color = rng.choice(sorted({o.color for o in objects}))
            return f"how many {color} objects are there?", NUMBERS[sum(o.color == color for o in objects)]
        shape = rng.choice(sorted({o.shape for o in objects}))
        return f"how many {shape}s are there?", NUMBERS[sum(o.shape == shape for o in objects)]
    if kind == "spatial":
        alone = [q for q in QUADRANTS if sum(o.quadrant == q for o in objects) == 1]
        if not alone:
            return None
        q = rng.choice(alone)
        o = next(o for o in objects if o.quadrant == q)
        return f"what color is the object in the {q}?", o.color
    if kind == "colors":
        return "how many colors are there?", NUMBERS[len({o.color for o in objects})]
    raise ValueError(f"question type must be one of {', '.join(QUESTION_TYPES)}; got {kind!r}")


class ShapesVQA:
    """``len(ds)`` samples of one split; ``ds[i]`` is a :class:`VQASample`, a pure function of (seed, split, i).

    Question types cycle through ``types`` so every split is balanced across them."""

    def __init__(self, split: str = "test", size: int = 1000, *, seed: int = 0, image_size: int = 192,
                 min_objects: int = 3, max_objects: int = 8, types: tuple[str, ...] = QUESTION_TYPES) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        bad = [t for t in types if t not in QUESTION_TYPES]
        if bad or not types:
            raise ValueError(f"types must be a non-empty subset of {', '.join(QUESTION_TYPES)}; got {list(types)}")
        if not 1 <= min_objects <= max_objects <= 10:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 10; got {min_objects}, {max_objects}")
        if size < 0 or image_size < 32:
            raise ValueError(f"size must be >= 0 and image_size >= 32; got {size}, {image_size}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.min_objects, self.max_objects, self.types = min_objects, max_objects, tuple(types)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[VQASample]:
        return (self[i] for i in range(self.size))

    def __getitem__(self, index: int) -> VQASample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        kind = self.types[index % len(self.types)]
        # one stream per (seed, split, index); the split is part of the key, so splits never share a scene
        key = (self.seed * 3 + SPLITS[self.split]) * 1_000_003 + index
        rng = random.Random(key)
        while True:
            objects = _scene(rng, self.min_objects, self.max_objects)
            qa = make_question(objects, kind, rng)
            if qa is not None:
                break
        image = render_scene(objects, self.image_size, seed=key)
        return VQASample(image, qa[0], qa[1], kind, objects)


def load_jsonl(path: str | Path) -> list[VQASample]:
    """A user's own data: one JSON object per line with ``image`` (a path, relative to the file's folder),
    ``question``, ``answer`` and optionally ``type``."""
    path = Path(path)
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        missing = [k for k in ("image", "question", "answer") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: each line needs string fields image, question, answer; missing or not a "
                             f"string: {', '.join(missing)}")
        image_path = (path.parent / row["image"]).resolve()
        if not image_path.is_file():
            raise ValueError(f"{path}:{n}: image file not found: {row['image']}")
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        samples.append(VQASample(image, row["question"], row["answer"], str(row.get("type", "custom"))))
    return samples
