"""The embedded demo dataset: coloured shapes with template captions, generated in-process.

``make_demo_dataset()`` draws small RGB images of one shape (5 kinds) in one colour (6), one size
(2), one position (5) on one background (3) -- 900 distinct concepts -- with a little jitter in
place, size, colour and background so no two images are identical. Each image has several captions
made from templates: the first names all five attributes, the others only some ("a red circle", "a
triangle on the left", ...), so concepts and captions repeat across images: the batch holds false negatives, which is
what multi-positive training and positive mining are for. ``test`` holds freshly drawn images for
evaluation; zero-shot classification uses ``label`` (colour x shape, ``DEMO_CLASSES``, chance 1/30)
with ``DEMO_TEMPLATES``. Deterministic given ``seed``; ~5,000 rows take a couple of seconds.

``make_digits_dataset()`` does the same for scikit-learn's bundled handwritten digits (real 8x8
images, coloured and upscaled), with ``DIGITS_CLASSES`` / ``DIGITS_TEMPLATES`` for zero-shot.
"""

from __future__ import annotations

import math
import re

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 40),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
}
SIZES = ("small", "large")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}
BACKGROUNDS = {"black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128)}

#: zero-shot class names, index = ``label``
DEMO_CLASSES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
#: zero-shot prompt templates (class embeddings are averaged over them)
DEMO_TEMPLATES = ["a {}.", "a photo of a {}.", "a drawing of a {}.", "a {} on a plain background.", "there is a {}."]

#: the first caption of every image names all five attributes (so retrieval has a right answer);
#: the others are drawn from ``CAPTION_TEMPLATES`` and mention only some
FULL_CAPTION_TEMPLATE = "a {size} {colour} {shape} {where} on a {background} background"
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "a {colour} {shape} on a {background} background",
    "a {shape} {where}",
    "a {size} {shape} coloured {colour}",
    "{colour} {shape}, {size}, {where}",
    "a {size} {colour} {shape} {where} on {background}",
    "a drawing of a {colour} {shape}",
    "something {colour} {where}",
)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def _jitter(rgb, rng, amount):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def render_shape(shape: str, colour: str, size: str, position: str, background: str, image_size: int,
                 rng: np.random.Generator) -> Image.Image:
    """Draw one demo image (with jitter from ``rng``)."""
    image = Image.new("RGB", (image_size, image_size), _jitter(BACKGROUNDS[background], rng, 12))
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * image_size
    cy = (fy + rng.uniform(-0.05, 0.05)) * image_size
    r = image_size * (rng.uniform(0.09, 0.12) if size == "small" else rng.uniform(0.17, 0.22))
    fill = _jitter(COLOURS[colour], rng, 20)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def _make_split(n_rows: int, n_captions: int, image_size: int, rng: np.random.Generator, first_id: int) -> dict:
    colours, positions, backgrounds = list(COLOURS), list(POSITIONS), list(BACKGROUNDS)
    columns = {k: [] for k in ("image", "caption", "label", "shape", "colour", "size", "position", "background",
                               "image_id", "concept_id")}
    for i in range(n_rows):
        s, c, z = rng.integers(len(SHAPES)), rng.integers(len(colours)), rng.integers(len(SIZES))
        p, b = rng.integers(len(positions)), rng.integers(len(backgrounds))
        attrs = dict(shape=SHAPES[s], colour=colours[c], size=SIZES[z], position=positions[p],
                     background=backgrounds[b])
        columns["image"].append(render_shape(**attrs, image_size=image_size, rng=rng))
        words = dict(attrs, where=POSITION_PHRASES[attrs["position"]])
        chosen = rng.choice(len(CAPTION_TEMPLATES), size=min(n_captions - 1, len(CAPTION_TEMPLATES)), replace=False)
        columns["caption"].append([FULL_CAPTION_TEMPLATE.format(**words)]
                                  + [CAPTION_TEMPLATES[t].format(**words) for t in chosen])
        columns["label"].append(int(s * len(colours) + c))
        for key, value in attrs.items():
            columns[key].append(value)
        columns["image_id"].append(first_id + i)
        concept = (((s * len(colours) + c) * len(SIZES) + z) * len(positions) + p) * len(backgrounds) + b
        columns["concept_id"].append(int(concept))
    return columns


DEMO_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "caption": datasets.List(datasets.Value("string")),
    "label": datasets.ClassLabel(names=DEMO_CLASSES),
    "shape": datasets.Value("string"),
    "colour": datasets.Value("string"),
    "size": datasets.Value("string"),
    "position": datasets.Value("string"),
    "background": datasets.Value("string"),
    "image_id": datasets.Value("int64"),
    "concept_id": datasets.Value("int64"),
})


def make_demo_dataset(n_train: int = 4000, n_test: int = 1000, n_captions: int = 4, image_size: int = 32,
                      seed: int = 0) -> datasets.DatasetDict:
    """Generate the demo ``DatasetDict`` (``train`` / ``test``) with no download.

    Columns: ``image`` (RGB PIL), ``caption`` (list of ``n_captions`` strings: the collator default), ``label``
    (``ClassLabel`` over ``DEMO_CLASSES``), the attributes ``shape``/``colour``/``size``/``position``/
    ``background``, ``image_id`` (unique across both splits) and ``concept_id`` (equal for images of the
    same five attributes: use it as the id column for concept-level positives).
    """
    if n_captions < 1:
        raise ValueError(f"n_captions must be >= 1, got {n_captions}")
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_make_split(n_train, n_captions, image_size, train_rng, 0),
                                            features=DEMO_FEATURES),
        "test": datasets.Dataset.from_dict(_make_split(n_test, n_captions, image_size, test_rng, n_train),
                                           features=DEMO_FEATURES),
    })


def demo_vocabulary() -> list[str]:
    """Every word the demo captions and zero-shot prompts use (for a word-level test tokenizer)."""
    words = set()
    for text in [FULL_CAPTION_TEMPLATE, *CAPTION_TEMPLATES, *DEMO_TEMPLATES, *DIGIT_CAPTION_TEMPLATES,
                 *DIGITS_TEMPLATES] + list(POSITION_PHRASES.values()):
        without_placeholders = re.sub(r"\{[a-z]*\}", " ", text)
        words.update(without_placeholders.replace(",", " , ").replace(".", " . ").split())
    words.update(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS, DIGIT_NAMES)
    return sorted(words)


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: zero-shot class names for :func:`make_digits_dataset` (index = ``label``)
DIGITS_CLASSES = list(DIGIT_NAMES)
#: zero-shot prompt templates for :func:`make_digits_dataset`
DIGITS_TEMPLATES = ["the digit {}.", "a handwritten {}.", "a photo of the number {}.", "a drawing of a {}."]
DIGIT_CAPTION_TEMPLATES = (
    "a {colour} handwritten {name} on {background}",  # always first: names every attribute
    "the digit {name}",
    "a handwritten {name}",
    "a {colour} {name}",
    "the number {name} written in {colour}",
    "a {name} on a {background} background",
)

_DIGITS_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "caption": datasets.List(datasets.Value("string")),
    "label": datasets.ClassLabel(names=DIGITS_CLASSES),
    "colour": datasets.Value("string"),
    "background": datasets.Value("string"),
    "image_id": datasets.Value("int64"),
})


def make_digits_dataset(n_captions: int = 3, image_size: int = 32, test_fraction: float = 0.2,
                        seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1,797 real 8x8 handwritten digits as an image-caption ``DatasetDict``.

    Each digit is upscaled to ``image_size``, drawn in one of the ``COLOURS`` on a ``BACKGROUNDS``
    colour, and gets ``n_captions`` template captions (the first names digit, colour and background).
    ``label`` indexes ``DIGITS_CLASSES`` (chance 1/10) for zero-shot with ``DIGITS_TEMPLATES``. A
    seeded ``test_fraction`` of the digits is held out. Needs scikit-learn (bundled data, no download).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("make_digits_dataset needs scikit-learn: pip install scikit-learn") from error
    if n_captions < 1:
        raise ValueError(f"n_captions must be >= 1, got {n_captions}")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_test = int(round(test_fraction * len(order)))
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)

    def split(indices):
        columns = {k: [] for k in _DIGITS_FEATURES}
        for index in indices:
            ink = digits.images[index] / 16.0
            colour, background = colours[rng.integers(len(colours))], backgrounds[rng.integers(len(backgrounds))]
            pixels = (ink[..., None] * np.asarray(COLOURS[colour]) +
                      (1 - ink[..., None]) * np.asarray(BACKGROUNDS[background]))
            image = Image.fromarray(pixels.round().astype(np.uint8)).resize((image_size, image_size),
                                                                           Image.Resampling.BILINEAR)
            words = dict(name=DIGIT_NAMES[digits.target[index]], colour=colour, background=background)
            others = rng.choice(np.arange(1, len(DIGIT_CAPTION_TEMPLATES)),
                                size=min(n_captions - 1, len(DIGIT_CAPTION_TEMPLATES) - 1), replace=False)
            columns["image"].append(image)
            columns["caption"].append([DIGIT_CAPTION_TEMPLATES[t].format(**words) for t in [0, *others]])
            columns["label"].append(int(digits.target[index]))
            columns["colour"].append(colour)
            columns["background"].append(background)
            columns["image_id"].append(int(index))
        return datasets.Dataset.from_dict(columns, features=_DIGITS_FEATURES)

    return datasets.DatasetDict({"train": split(order[n_test:]), "test": split(order[:n_test])})
