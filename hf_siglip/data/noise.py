"""Label-noise corruption for robustness studies (SigLIP, Zhai et al. 2023, section 4.10).

:func:`corrupt_labels` corrupts each row independently with probability ``p`` in one of the paper's
ways: ``"image"`` (replace the image by uniform RGB noise), ``"text"`` (replace every caption by a
random sequence of tokens/words), ``"image_text"`` (both), ``"pairing"`` (the corrupted rows'
captions are shuffled among themselves within each map batch, so pairs are wrong but both sides
stay natural), or ``"all"`` (each corrupted row gets one of the above at random). Draws are
counter-based on ``(seed, row index)``, so which rows are corrupted, and how, does not depend on
``num_proc`` or batching -- except ``"pairing"``, whose shuffle permutes within one map batch and so
depends on ``batch_size`` and ``num_proc`` (a batch with a single pairing row leaves it clean and
labelled ``""``).

Nothing is silent: a ``noise`` column records what was done to each row (``""`` for clean rows).
Images of uncorrupted rows are passed through as stored bytes (never decoded); the image column is
read with ``Image(decode=False)`` and cast back afterwards.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import datasets
import numpy as np
from PIL import Image

from ._hashing import hashed_uniform

KINDS = ("image", "text", "image_text", "pairing")

# independent random streams per purpose
_STREAM_CORRUPT, _STREAM_KIND, _STREAM_IMAGE, _STREAM_TEXT, _STREAM_SHUFFLE = range(5)


def _noise_png(rng: np.random.Generator, size: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def corrupt_labels(dataset, p: float, kind: str = "all", seed: int = 0, image_column: str = "image",
                   caption_column: str = "caption", vocabulary: Optional[Sequence[str]] = None, tokenizer=None,
                   max_random_tokens: int = 16, noise_image_size: int = 64, num_proc: Optional[int] = None,
                   batch_size: int = 1000):
    """Return ``dataset`` with a fraction ``p`` of rows corrupted (see module docstring).

    Random text is drawn from ``vocabulary`` (a list of words) or, if given, from ``tokenizer``'s
    vocabulary (random ids decoded). The caption cell keeps its shape: a string stays a string, a
    list keeps its length.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if kind not in KINDS + ("all",):
        raise ValueError(f"kind must be one of {KINDS + ('all',)}, got {kind!r}")
    needs_text = kind in ("text", "image_text", "all")
    if needs_text and vocabulary is None and tokenizer is None:
        raise ValueError("text corruption needs vocabulary= or tokenizer=")
    words = list(vocabulary) if vocabulary is not None else None

    def random_text(rng: np.random.Generator) -> str:
        length = int(rng.integers(1, max_random_tokens + 1))
        if words is not None:
            return " ".join(words[i] for i in rng.integers(0, len(words), length))
        return tokenizer.decode(rng.integers(0, len(tokenizer), length).tolist(), skip_special_tokens=True)

    def random_caption(cell, rng):
        if isinstance(cell, str):
            return random_text(rng)
        return [random_text(rng) for _ in range(max(1, len(cell or [])))]

    def corrupt_batch(images, captions, indices):
        indices = np.asarray(indices)
        corrupted = hashed_uniform(seed, _STREAM_CORRUPT, indices) < p
        kinds = np.asarray(KINDS)[(hashed_uniform(seed, _STREAM_KIND, indices) * len(KINDS)).astype(int)] \
            if kind == "all" else np.full(len(indices), kind)
        labels = np.where(corrupted, kinds, "")
        images, captions = list(images), list(captions)
        for row, label in enumerate(labels):
            rng = np.random.default_rng([seed, int(indices[row])])
            if label in ("image", "image_text"):
                images[row] = _noise_png(rng, noise_image_size)
            if label in ("text", "image_text"):
                captions[row] = random_caption(captions[row], rng)
        shuffled = np.flatnonzero(labels == "pairing")
        if len(shuffled) > 1:
            # a derangement (cyclic shift of a random order) so no shuffled row keeps its own caption
            order = np.random.default_rng([seed, _STREAM_SHUFFLE, int(indices[0])]).permutation(shuffled)
            originals = [captions[i] for i in order]
            for position, target in enumerate(np.roll(order, 1)):
                captions[target] = originals[position]
        elif len(shuffled) == 1:
            labels[shuffled[0]] = ""  # a lone row cannot be mis-paired within its batch
        return {image_column: images, caption_column: captions, "noise": labels.tolist()}

    image_feature = (dataset.features or {}).get(image_column)
    decoded = isinstance(image_feature, datasets.Image) and image_feature.decode
    if isinstance(image_feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    kwargs = dict(input_columns=[image_column, caption_column], batched=True, batch_size=batch_size,
                  with_indices=True)
    if num_proc is not None and isinstance(dataset, datasets.Dataset):
        kwargs["num_proc"] = num_proc
    if dataset.features is not None:
        features = dataset.features.copy()
        features["noise"] = datasets.Value("string")
        kwargs["features"] = features
    dataset = dataset.map(corrupt_batch, **kwargs)
    if decoded and dataset.features is not None:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=True))
    return dataset
