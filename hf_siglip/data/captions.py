"""Caption augmentation (FFF batch text augmentation): choose k captions per image per epoch.

:class:`CaptionSampler` draws k distinct captions per row from one or several caption columns (e.g.
the original ``caption`` plus ``pseudo_captions``), weighted per column, deterministically from
``(seed, epoch, row key)``: the row key is the row's ``image_id`` when the dataset has one, else its
index. Draws use counter-based hashing, so the result does not depend on batch size, ``num_proc`` or
whether the dataset is streamed, and each epoch gives a fresh, reproducible choice.

Two ways to use it:

* as a ``datasets`` map (:func:`add_sampled_captions`): reads only the caption (and id) columns via
  ``input_columns``, so images are neither decoded nor copied; re-run per epoch with ``epoch=e``;
* as the collator hook (``SiglipDataCollator(caption_sampler=...)`` + ``collator.set_epoch(e)``).

Weighting: a column's weight is its probability mass, split evenly over that row's captions in the
column (weights ``{"caption": 1, "pseudo_captions": 1}`` give the one original caption as much mass as
all pseudo-captions together). Sampling is without replacement (Efraimidis-Spirakis keys); a row with
fewer than k usable captions yields all of them (the ids keep them together; no duplicates are made).
None/empty/whitespace captions are never drawn (see :mod:`hf_siglip.data.text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ._hashing import hashed_uniform
from ._maps import map_new_columns
from .text import normalize_captions


@dataclass
class CaptionSampler:
    """Weighted, per-epoch deterministic choice of ``k`` captions per image.

    Args:
        columns: caption column names, or a mapping column -> weight (column mass, see module doc).
        k: captions per image.
        seed: base seed.
        output_column: column written by :func:`add_sampled_captions`.
        id_column: column used as the row key when present (falls back to the row index).
    """

    columns: Sequence[str] | Mapping[str, float] = ("caption",)
    k: int = 1
    seed: int = 0
    output_column: str = "sampled_captions"
    id_column: str = "image_id"
    weights: dict[str, float] = field(init=False)

    def __post_init__(self):
        if isinstance(self.columns, Mapping):
            self.weights = {str(c): float(w) for c, w in self.columns.items()}
        else:
            self.weights = {str(c): 1.0 for c in self.columns}
        if not self.weights or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"need at least one caption column with a non-negative weight, got {self.columns!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def sample(self, caption_columns: Mapping[str, Sequence], keys: Sequence[int], epoch: int = 0) -> list[list[str]]:
        """Sample for a batch: ``caption_columns[col][i]`` is row i's cell (string, list or None)."""
        keys = np.asarray(keys, dtype=np.int64)
        candidates: list[str] = []
        rows: list[int] = []
        weights: list[float] = []
        for i in range(len(keys)):
            for column, weight in self.weights.items():
                captions, _ = normalize_captions(caption_columns[column][i], row=int(keys[i]))
                if captions and weight > 0:
                    candidates.extend(captions)
                    rows.extend([i] * len(captions))
                    weights.extend([weight / len(captions)] * len(captions))
        if not candidates:
            return [[] for _ in range(len(keys))]
        rows_array = np.asarray(rows)
        starts = np.searchsorted(rows_array, np.arange(len(keys)))
        slots = np.arange(len(rows_array)) - starts[rows_array]  # position of each candidate within its row
        u = hashed_uniform(self.seed, epoch, keys[rows_array], slots)
        # Efraimidis-Spirakis: the k largest u**(1/w) per row are a weighted sample without replacement.
        scores = np.log(u) / np.asarray(weights)
        order = np.lexsort((-scores, rows_array))  # by row, best score first
        rank = np.arange(len(order)) - starts[rows_array[order]]
        chosen = np.sort(order[rank < self.k])  # back to row order, original caption order within a row
        result: list[list[str]] = [[] for _ in range(len(keys))]
        for j in chosen.tolist():
            result[rows[j]].append(candidates[j])
        return result


def add_sampled_captions(dataset, sampler: CaptionSampler, epoch: int = 0, num_proc: int | None = None,
                         batch_size: int = 1000, **map_kwargs):
    """Add ``sampler.output_column`` (k captions per row for ``epoch``) to a Dataset or IterableDataset.

    Only the caption columns (and the id column) are read and only the new column is written, so
    images are neither decoded nor copied (:func:`~hf_siglip.data._maps.map_new_columns`).
    ``num_proc`` is ignored for an ``IterableDataset`` (streaming maps run lazily in the reader).
    """
    names = dataset.column_names or []
    missing = [c for c in sampler.weights if names and c not in names]
    if missing:
        raise KeyError(f"caption column(s) {missing} not in dataset columns {names}")
    use_ids = sampler.id_column in names
    input_columns = list(sampler.weights) + ([sampler.id_column] if use_ids else [])

    def sample_batch(*values):
        # datasets passes the input columns positionally, then the indices
        *values, indices = values
        columns = dict(zip(sampler.weights, values))
        keys = values[-1] if use_ids else indices
        return {sampler.output_column: sampler.sample(columns, keys, epoch)}

    return map_new_columns(dataset, sample_batch, input_columns, [sampler.output_column], num_proc=num_proc,
                           batch_size=batch_size, with_indices=True, **map_kwargs)
