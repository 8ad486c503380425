"""Label noise for robustness studies, with the semantics of SigLIP (Zhai et al. 2023) section 4.10.

:func:`corrupt_labels` takes one rate per kind of noise, each drawn independently per row:

* ``image``: the image is replaced by uniform RGB noise with probability ``image``;
* ``text``: every caption of the row is replaced by a random sequence of words (from ``vocabulary``, a
  tokenizer's vocabulary, or by default the words of the captions of the first ``window_size`` rows: the same
  rows for a Dataset and a stream, and a stream is not read twice for them) with probability ``text``;
* ``pairing``: a fraction ``pairing`` of rows is chosen and their captions are permuted among themselves
  with no row keeping its own (a derangement), across the whole ``Dataset``; on a stream, across each window of
  ``window_size`` consecutive rows. Both sides stay natural; only the pairs are wrong.

The paper's settings are these rates: "image" ``{image: p}``, "text" ``{text: p}``, "batch alignment"
``{pairing: p}``, "image & text" ``{image: p, text: p}`` (independent draws, so both sides of one row are
corrupted with probability p^2) and "image, text & batch alignment" (all three).

Draws are counter-based on ``(seed, kind, row key)`` (the row's ``image_id`` when present, else its index), so
which rows are corrupted does not depend on batching, ``num_proc`` or streaming; the pairing permutation
depends on the seed (and, on a stream, the window). Nothing is silent: a ``noise`` column records what was done
to each row (``""``, or kinds joined by ``+``, e.g. ``"image+text"``) and the report counts rows per kind.
The image column is only read (as encoded bytes, never decoded) when ``image > 0``.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from typing import Optional, Sequence

import datasets
import numpy as np
from PIL import Image

from ._hashing import hashed_uniform
from ._maps import map_new_columns, with_encoded_images
from .text import normalize_captions

KINDS = ("image", "text", "pairing")
_STREAM = {"image": 1, "text": 2, "pairing": 3, "shuffle": 4}  # independent random streams per purpose
_WORD = re.compile(r"\w+")


def _noise_png(rng: np.random.Generator, size: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _derangement_sources(selected: np.ndarray, rng: np.random.Generator) -> dict[int, int]:
    """row -> the row whose caption it takes; every selected row gets another one's (a cyclic shift of a
    random order). A single selected row cannot be mis-paired: it is left out."""
    if len(selected) < 2:
        return {}
    order = rng.permutation(selected)
    return {int(target): int(source) for target, source in zip(np.roll(order, 1), order)}


def caption_words(captions: Sequence) -> list[str]:
    """The distinct words of caption cells (strings or lists), in first-seen order."""
    seen = {}
    for row, cell in enumerate(captions):
        for caption in normalize_captions(cell, row=row)[0]:
            for word in _WORD.findall(caption.lower()):
                seen.setdefault(word, None)
    return list(seen)


def _window_words(captions) -> list[str]:
    words = caption_words(captions)
    if not words:
        raise ValueError("text noise needs words: the first window of captions holds none; pass vocabulary= or "
                         "tokenizer=")
    return words


def corrupt_labels(dataset, image: float = 0.0, text: float = 0.0, pairing: float = 0.0, seed: int = 0,
                   vocabulary: Optional[Sequence[str]] = None, tokenizer=None, max_random_words: int = 16,
                   noise_image_size: int = 64, window_size: int = 1000, image_column: str = "image",
                   caption_column: str = "caption", id_column: str = "image_id", num_proc: Optional[int] = None):
    """Return ``(dataset, report)`` with label noise at the given rates (see module docstring).

    A caption cell keeps its shape: a string stays a string, a list keeps its length.
    """
    rates = {"image": image, "text": text, "pairing": pairing}
    for kind, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"label noise rate {kind} must be in [0, 1], got {rate}")
    names = dataset.column_names or []
    use_ids = id_column in names
    is_table = isinstance(dataset, datasets.Dataset)
    words = list(vocabulary) if vocabulary is not None else None
    if text > 0 and words is None and tokenizer is None and is_table:
        words = _window_words(dataset.select(range(min(window_size, len(dataset))))[caption_column])

    def random_text(rng: np.random.Generator) -> str:
        length = int(rng.integers(1, max_random_words + 1))
        if words is not None:
            return " ".join(words[i] for i in rng.integers(0, len(words), length))
        return tokenizer.decode(rng.integers(0, len(tokenizer), length).tolist(), skip_special_tokens=True)

    def chosen(kind: str, keys) -> np.ndarray:
        return hashed_uniform(seed, _STREAM[kind], np.asarray(keys)) < rates[kind]

    report = Counter()
    sources: dict[int, int] = {}  # Dataset: row index -> index of the row whose caption it takes
    all_captions = None
    if is_table:
        keys = np.asarray(dataset[id_column]) if use_ids else np.arange(len(dataset))
        if pairing > 0:
            sources = _derangement_sources(np.flatnonzero(chosen("pairing", keys)),
                                           np.random.default_rng([seed, _STREAM["shuffle"]]))
            all_captions = dataset.select_columns([caption_column])[caption_column]
        report.update(rows=len(dataset), rows_image_noise=int(chosen("image", keys).sum()) if image > 0 else 0,
                      rows_text_noise=int(chosen("text", keys).sum()) if text > 0 else 0,
                      rows_pairing_shuffled=len(sources))

    def corrupt_batch(*columns):
        *columns, indices = columns
        values = dict(zip(input_columns, columns))
        keys = np.asarray(values[id_column] if use_ids else indices)
        captions = list(values[caption_column])
        nonlocal words
        if text > 0 and words is None and tokenizer is None:  # a stream: its first window's words (not re-read)
            words = _window_words(captions)
        labels = [[] for _ in keys]
        if pairing > 0:
            if is_table:
                batch_sources = {row: sources[int(index)] for row, index in enumerate(indices) if int(index) in sources}
                originals = {row: all_captions[source] for row, source in batch_sources.items()}
            else:  # a stream: within this window
                local = _derangement_sources(np.flatnonzero(chosen("pairing", keys)),
                                             np.random.default_rng([seed, _STREAM["shuffle"], int(keys[0])]))
                originals = {target: captions[source] for target, source in local.items()}
            for row, caption in originals.items():
                captions[row] = caption
                labels[row].append("pairing")
        out = {"noise": None}
        if text > 0:
            for row in np.flatnonzero(chosen("text", keys)):
                rng = np.random.default_rng([seed, _STREAM["text"], int(keys[row])])
                cell = captions[row]
                captions[row] = random_text(rng) if isinstance(cell, str) or cell is None else \
                    [random_text(rng) for _ in range(max(1, len(cell)))]
                labels[row].append("text")
        if text > 0 or pairing > 0:
            out[caption_column] = captions
        if image > 0:
            images = list(values[image_column])
            for row in np.flatnonzero(chosen("image", keys)):
                images[row] = _noise_png(np.random.default_rng([seed, _STREAM["image"], int(keys[row])]),
                                         noise_image_size)
                labels[row].append("image")
            out[image_column] = images
        out["noise"] = ["+".join(kind for kind in KINDS if kind in kinds) for kinds in labels]
        if not is_table:
            report["rows"] += len(keys)
            for kinds in labels:
                for kind in kinds:
                    report[{"image": "rows_image_noise", "text": "rows_text_noise",
                            "pairing": "rows_pairing_shuffled"}[kind]] += 1
        return out

    input_columns = [caption_column] + ([image_column] if image > 0 else []) + ([id_column] if use_ids else [])
    output_columns = ["noise"] + ([caption_column] if text > 0 or pairing > 0 else []) + \
        ([image_column] if image > 0 else [])
    features = None
    if dataset.features is not None:
        features = datasets.Features({"noise": datasets.Value("string")})
        for column in output_columns[1:]:
            features[column] = dataset.features[column]
        if image > 0:
            features[image_column] = datasets.Image(decode=False)
    batch_size = window_size if not is_table else 1000

    def run(reader):
        return map_new_columns(reader, corrupt_batch, input_columns, output_columns, num_proc=num_proc,
                               batch_size=batch_size, with_indices=True, desc="label noise", features=features)

    result = with_encoded_images(dataset, image_column, run) if image > 0 else run(dataset)
    return result, report
