"""Shared helpers for the data tests: a word-level tokenizer, a PIL-only processor, a tiny random
SigLIP model, and image folders with real (and really broken) files. Nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_tokenizer(words=None):
    """A ``PreTrainedTokenizerFast`` over a word-level vocabulary (no sentencepiece needed)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_siglip.data.demo import demo_vocabulary

    words = list(words) if words is not None else demo_vocabulary()
    extra = ["cat", "dog", "sits", "runs", "man", "woman", "holds", "sign", "stop", "photo", "ok", "x", "y"]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in words + extra:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def make_processor(image_size: int = 32, words=None):
    from transformers import SiglipImageProcessorPil, SiglipProcessor

    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return SiglipProcessor(image_processor=image_processor, tokenizer=make_tokenizer(words))


def make_tiny_siglip(vocab_size: int, image_size: int = 32, seed: int = 0):
    """A randomly initialised 1-layer ``transformers.SiglipModel`` (CPU, eval mode)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=64, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **common),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
    )
    return SiglipModel(config).eval()


def save_tiny_blip_captioner(path) -> str:
    """Save a randomly initialised 1-layer BLIP captioner + processor to ``path`` (for pseudo-captions)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "sep_token": "[SEP]", "cls_token": "[CLS]"})
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=0,
                         max_position_embeddings=64, encoder_hidden_size=32, **common),
        vision_config=dict(image_size=32, patch_size=8, **common))
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_vit_teacher(path, classifier: bool = True, num_labels: int = 10, seed: int = 0) -> str:
    """Save a randomly initialised 1-layer ViT (16 px) with its image processor to ``path``, as a concept
    distillation teacher: an image classifier (logits scaled up so they differ from image to image) or, with
    ``classifier=False``, a feature model (``ViTModel``, pooler included)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_labels=num_labels)
    torch.manual_seed(seed)
    model = ViTForImageClassification(config) if classifier else ViTModel(config)
    if classifier:
        with torch.no_grad():
            model.classifier.weight.mul_(20.0)
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def random_rgb(rng, size=16):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_broken_image_folder(root: Path, seed: int = 0) -> dict:
    """Write an imagefolder with good and broken real files plus ``metadata.jsonl``.

    Returns ``{file_name: expected_outcome}`` where the outcome is "ok" or the reason it must be dropped.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    random_rgb(rng).save(root / "good.jpg")
    random_rgb(rng).save(root / "good.png")
    data = jpeg_bytes(random_rgb(rng, 64))
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "garbage.png").write_bytes(b"this is not an image" * 20)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA").save(root / "rgba.png")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(root / "sixteen_bit.png")
    rows = [
        ("good.jpg", ["a cat sits", "a photo of a cat", "cat"], "ok"),
        ("good.png", "a dog runs", "ok"),
        ("truncated.jpg", ["a man"], "undecodable"),
        ("garbage.png", ["a woman"], "undecodable"),
        ("grey.png", ["a grey photo", None, "   "], "ok"),
        ("rgba.png", [], "no caption"),
        ("sixteen_bit.png", ["a stop sign"], "ok"),
    ]
    with open(root / "metadata.jsonl", "w") as handle:
        for name, caption, _ in rows:
            handle.write(json.dumps({"file_name": name, "caption": caption}) + "\n")
    return {name: outcome for name, _, outcome in rows}


def write_image_folder(root: Path, rows, size: int = 16, seed: int = 0) -> Path:
    """An imagefolder of real files: ``rows`` holds ``(kind, caption)`` with kind "good" (a random RGB PNG) or
    "garbage" (bytes that are no image); the caption (a string, a list or None) goes to ``metadata.jsonl``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as handle:
        for index, (kind, caption) in enumerate(rows):
            name = f"{index:04d}.png"
            if kind == "good":
                random_rgb(rng, size).save(root / name)
            else:
                (root / name).write_bytes(b"this is not an image" * 8)
            handle.write(json.dumps({"file_name": name, "caption": caption}) + "\n")
    return root


def photo_like(rng, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a colour gradient, blurred ellipses and rectangles, fine texture and sensor noise
    (saved as JPEG quality 90 at 500 x 375 it takes ~1.9 bits per pixel, like web photos: 1.5-2.9 measured)."""
    from PIL import ImageDraw, ImageFilter

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = (x / width * rng.uniform(0.3, 1) + y / height * rng.uniform(0.3, 1))[..., None] / 2
    image = Image.fromarray((start * (1 - mix) + end * mix).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(8, 20)):
        left, top = rng.uniform(-0.2, 1, 2) * (width, height)
        box_width, box_height = rng.uniform(0.05, 0.5, 2) * (width, height)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([left, top, left + box_width, top + box_height], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))).astype(np.float32)
    pixels += (np.sin(x / rng.uniform(2, 6)) * np.cos(y / rng.uniform(2, 6)) * 12)[..., None]
    pixels += rng.normal(0, 5, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


PHOTO_CLASSES = ["pagoda", "hillside", "petals", "stem"]


def write_photo_folder(root: Path, n_train: int = 24, n_test: int = 16, seed: int = 0,
                       sizes: tuple[int, int] = (40, 300)) -> Path:
    """An imagefolder (``train/`` and ``test/``, each with ``metadata.jsonl``) of real photos: crops of
    scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``, 640 x 427), each side drawn from ``sizes``,
    re-encoded mostly as JPEG (quality 75-95; some greyscale) and some as PNG. Rows carry 2 captions (the first,
    "a photo of the <class>", is shared by every image of its class: duplicate captions) and a ``label`` in
    ``PHOTO_CLASSES`` (the photo and which half of it the crop's centre lies in)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    adjectives = ["bright", "dark", "small", "wide", "tall", "blurry"]
    for split, count in (("train", n_train), ("test", n_test)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as handle:
            for index in range(count):
                source = int(rng.integers(0, 2))
                photo = photos[source]
                height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                height, width = min(height, photo.shape[0]), min(width, photo.shape[1])
                top = int(rng.integers(0, photo.shape[0] - height + 1))
                left = int(rng.integers(0, photo.shape[1] - width + 1))
                image = Image.fromarray(photo[top:top + height, left:left + width])
                label = 2 * source + int(top + height / 2 > photo.shape[0] / 2)
                kind = rng.choice(["jpeg", "jpeg", "jpeg", "grey", "png"])
                name = f"{index:03d}.{'png' if kind == 'png' else 'jpg'}"
                if kind == "grey":
                    image = image.convert("L")
                if kind == "png":
                    image.save(folder / name)
                else:
                    image.save(folder / name, quality=int(rng.integers(75, 96)))
                captions = [f"a photo of the {PHOTO_CLASSES[label]}",
                            f"a {rng.choice(adjectives)} {PHOTO_CLASSES[label]}"]
                handle.write(json.dumps({"file_name": name, "caption": captions, "label": label}) + "\n")
    return root


def write_captioned_splits(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """An imagefolder as users bring one: ``train/`` and ``test/``, 3 captions per row (one of them, "a circle",
    shared by many rows: duplicate captions), a ``label`` column (0 circle, 1 square, 2 star), and images mixed
    .jpg / .png / greyscale .png."""
    rng = np.random.default_rng(seed)
    words, shapes = ["red", "blue", "green", "small", "large"], ["circle", "square", "star"]
    for split, count in (("train", n_train), ("test", n_test)):
        folder = Path(root) / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as handle:
            for index in range(count):
                label = int(rng.integers(0, 3))
                image = random_rgb(rng, 16)
                name = f"{index:04d}." + ("jpg" if index % 3 == 0 else "png")
                (image.convert("L") if index % 3 == 2 else image).save(folder / name)
                captions = [f"a {rng.choice(words)} {shapes[label]}", f"a {shapes[label]}",
                            f"{rng.choice(words)} {rng.choice(words)} {shapes[label]}"]
                handle.write(json.dumps({"file_name": name, "caption": captions, "label": label}) + "\n")
    return Path(root)
