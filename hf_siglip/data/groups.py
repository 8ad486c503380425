"""Positive groups across a whole dataset (beyond FFF's in-batch mining).

:func:`assign_positive_groups` embeds every image and caption with a given SigLIP-like model (or uses
precomputed ``image_embeds``), links two rows when

* their images are near-duplicates (image-image cosine >= ``image_threshold``),
* any caption of one is near any caption of the other (text-text cosine >= ``text_threshold``), or
* the image of one matches a caption of the other (image-text cosine >= ``image_text_threshold``),

merges linked rows with union-find, and writes ``image_id`` (the row index plus ``id_offset``, if the
column is absent) and ``group_id`` (the smallest ``image_id`` in the group; found by each row's ``image_id``
when those are unique, else by its position). The collator uses
``group_id`` as the positive id. Each threshold may be ``None`` to switch that criterion off.

Neighbours come from :func:`nearest_neighbours`: ``faiss`` (``IndexFlatIP``, exact inner product) when
installed and ``backend="auto"``/``"faiss"``, else an exact chunked ``torch`` top-k. Only the ``k``
nearest neighbours of each item are considered, so a clique larger than ``k`` is still joined through
union-find chains.

Policies: a row whose image does not decode gets no image embedding and is linked only through its
captions (counted in ``stats["undecodable_images"]``); rows with no usable caption take part through
their image only. Streams (``IterableDataset``) are read once to embed, and the ids are written back
with a lazy map: by ``image_id`` when the rows' ids are unique, so a later shuffle or a split across processes
keeps each row's group; else by position, so the stream must be read in the same order (no shuffle after this).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

import datasets
import numpy as np
import torch

from ._maps import map_new_columns
from .embedding import embed_images, embed_texts
from .images import ImageDecodeError, decode_image
from .text import normalize_captions

logger = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "auto",
                       chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of each query among ``keys`` -> ``(scores, indices)`` of shape (Q, k).

    ``backend``: ``"auto"`` (faiss if installed, else torch), ``"faiss"`` (raises if missing) or ``"torch"``.
    """
    k = min(k, len(keys))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' needs faiss-cpu: pip install 'hf_siglip[data]' (or faiss-cpu)")
    if faiss is not None:
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(np.ascontiguousarray(keys.numpy(), dtype=np.float32))
        scores, indices = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return scores, indices.astype(np.int64)
    scores, indices = [], []
    for start in range(0, len(queries), chunk_size):
        top = (queries[start:start + chunk_size] @ keys.T).topk(k, dim=1)
        scores.append(top.values.numpy())
        indices.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(indices)


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return int(x)

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def roots(self) -> np.ndarray:
        return np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64, count=len(self.parent))


def _link(uf: UnionFind, scores, indices, query_rows, key_rows, threshold) -> int:
    """Union every (query row, neighbour row) pair scoring >= threshold; return the merges made."""
    query, slot = np.nonzero((scores >= threshold) & (indices >= 0))  # faiss pads missing hits with -1
    a, b = query_rows[query], key_rows[indices[query, slot]]
    return sum(uf.union(int(x), int(y)) for x, y in zip(a[a != b], b[a != b]))


def group_size_stats(group_ids) -> dict:
    """Summary of group sizes: groups, rows in multi-row groups, mean/max size, size histogram."""
    _, sizes = np.unique(np.asarray(group_ids), return_counts=True)
    histogram = Counter(int(s) for s in sizes)
    return {"rows": int(sizes.sum()), "groups": int(len(sizes)),
            "rows_in_multi_row_groups": int(sizes[sizes > 1].sum()), "mean_group_size": float(sizes.mean()),
            "max_group_size": int(sizes.max()), "group_size_histogram": dict(sorted(histogram.items()))}


def assign_positive_groups(dataset, model=None, processor=None, image_threshold: Optional[float] = 0.95,
                           text_threshold: Optional[float] = 0.95, image_text_threshold: Optional[float] = None,
                           k: int = 10, image_column: str = "image", caption_column: str = "caption",
                           image_embeds_column: str = "image_embeds", id_offset: int = 0, backend: str = "auto",
                           batch_size: int = 64, max_length: int = 64):
    """Add ``image_id`` / ``group_id`` columns; return ``(dataset, stats)`` (see module docstring).

    ``model``/``processor`` may be omitted when rows carry ``image_embeds`` and ``text_threshold`` and
    ``image_text_threshold`` are ``None``.
    """
    names = dataset.column_names or []
    use_precomputed = image_embeds_column in names
    read_columns = [c for c in (image_embeds_column if use_precomputed else image_column, caption_column,
                                "image_id") if c in names]
    reader = dataset.select_columns(read_columns)
    if not use_precomputed and isinstance((reader.features or {}).get(image_column), datasets.Image):
        reader = reader.cast_column(image_column, datasets.Image(decode=False))

    stats = Counter()
    image_rows, images, text_rows, texts, existing_ids = [], [], [], [], []
    for row_index, row in enumerate(reader):
        existing_ids.append(row.get("image_id"))
        try:
            images.append(row[image_embeds_column] if use_precomputed else decode_image(row[image_column]))
            image_rows.append(row_index)
        except ImageDecodeError as error:
            stats["undecodable_images"] += 1
            logger.warning("row %d: image does not decode (%s); grouped by its captions only", row_index, error)
        captions, dropped = normalize_captions(row.get(caption_column), row=row_index)
        stats["empty_captions"] += dropped
        texts.extend(captions)
        text_rows.extend([row_index] * len(captions))
    n_rows = len(existing_ids)

    need_text = text_threshold is not None or image_text_threshold is not None
    if use_precomputed:
        image_embeddings = torch.nn.functional.normalize(torch.tensor(np.asarray(images, dtype=np.float32)), dim=-1)
    elif image_threshold is not None or image_text_threshold is not None:
        image_embeddings = embed_images(model, processor, images, batch_size=batch_size)
    else:
        image_embeddings = torch.zeros(0, 0)
    text_embeddings = embed_texts(model, processor, texts, max_length=max_length) if need_text and texts else None

    uf = UnionFind(n_rows)
    image_rows, text_rows = np.asarray(image_rows), np.asarray(text_rows)
    if image_threshold is not None and len(image_rows):
        scores, indices = nearest_neighbours(image_embeddings, image_embeddings, k + 1, backend)
        stats["image_image_links"] = _link(uf, scores, indices, image_rows, image_rows, image_threshold)
    if text_threshold is not None and text_embeddings is not None:
        scores, indices = nearest_neighbours(text_embeddings, text_embeddings, k + 1, backend)
        stats["text_text_links"] = _link(uf, scores, indices, text_rows, text_rows, text_threshold)
    if image_text_threshold is not None and text_embeddings is not None and len(image_rows):
        scores, indices = nearest_neighbours(image_embeddings, text_embeddings, k, backend)
        stats["image_text_links"] = _link(uf, scores, indices, image_rows, text_rows, image_text_threshold)

    has_ids = "image_id" in names and all(i is not None for i in existing_ids)
    image_ids = np.asarray(existing_ids if has_ids else np.arange(n_rows) + id_offset, dtype=np.int64)
    roots = uf.roots()
    smallest = {}
    for root, image_id in zip(roots, image_ids):
        smallest[root] = min(smallest.get(root, image_id), image_id)
    group_ids = np.asarray([smallest[r] for r in roots], dtype=np.int64)
    stats = dict(stats, **group_size_stats(group_ids))
    logger.info("positive groups: %s", stats)

    written = ["group_id"] + ([] if has_ids else ["image_id"])
    features = datasets.Features({name: datasets.Value("int64") for name in written})
    if has_ids and len(set(image_ids.tolist())) == n_rows:
        # by each row's image id: right in whatever order, and on whichever process, a stream's rows are read
        group_of = dict(zip(image_ids.tolist(), group_ids.tolist()))
        return map_new_columns(dataset, lambda ids: {"group_id": [group_of[i] for i in ids]}, ["image_id"],
                               written, features=features), stats

    def write_ids(_, indices):
        out = {"group_id": group_ids[indices].tolist()}
        if not has_ids:
            out["image_id"] = image_ids[indices].tolist()
        return out

    key_column = caption_column if caption_column in names else read_columns[0]
    # only the id columns are written (joined column-wise: images are not copied)
    dataset = map_new_columns(dataset, write_ids, [key_column], written, with_indices=True, features=features)
    return dataset, stats
