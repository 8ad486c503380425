"""Opening the image-text data users have, as a ``datasets`` Dataset / IterableDataset.

:func:`load_image_text_dataset` accepts:

* a folder of images with ``metadata.jsonl`` / ``metadata.csv`` (the ``imagefolder`` convention:
  ``file_name`` plus a caption column holding a string or a list of strings), or a folder of split
  folders (``train/``, ``dev/``, ``test/``...) each with its own metadata file, as ``datasets`` loads it
  (``dev/`` and ``val/`` become the ``validation`` split);
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a folder, glob or file of webdataset ``.tar`` shards in img2dataset's layout (:mod:`hf_siglip.data.shards`),
  streamed unless ``streaming=False``;
* a folder (or single file) of ``.parquet`` / ``.arrow`` / ``.jsonl`` / ``.csv`` files;
* anything else is passed to ``datasets.load_dataset`` (a hub id, a builder name, a local script).

Policies:

* a configured image or caption column that is missing: **raises** ``KeyError`` naming the column and
  the columns that exist (also for streaming datasets whose features are known);
* by default the image column is cast to ``Image(decode=False)``: rows then carry the encoded bytes /
  path, so a truncated or garbage file cannot crash iteration inside ``datasets``; the collator decodes
  it and skips undecodable rows with a counted warning (:mod:`hf_siglip.data.images`). Pass
  ``decode_images=True`` for PIL images (an undecodable file then raises in ``datasets`` on access);
* a line of ``metadata.jsonl`` that is not a JSON object: **raises** ``ValueError`` naming the file and
  the line number;
* caption cells are not rewritten here; None / empty / whitespace captions are handled where captions
  are used (collator, caption sampler; :mod:`hf_siglip.data.text`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import datasets

from .shards import is_shard_source, load_webdataset_shards
from .splits import select_split, split_name

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


_METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# datasets' own split names for common folder names (its data-files patterns map these the same way)


def _metadata_files(path: Path) -> list[Path]:
    """Metadata files of an imagefolder: at the top, or one per split folder."""
    top = [path / name for name in _METADATA_NAMES if (path / name).exists()]
    return top or sorted(p for name in _METADATA_NAMES for p in path.glob(f"*/{name}"))


def _folder_builder(path: Path) -> tuple[str, dict]:
    if _metadata_files(path):
        return "imagefolder", {"data_dir": str(path)}
    for suffix, builder in _FILE_BUILDERS.items():
        files = sorted(str(p) for p in path.rglob(f"*{suffix}"))
        if files:
            return builder, {"data_files": files}
    return "imagefolder", {"data_dir": str(path)}


def load_image_text_dataset(source: str, split: Optional[str] = "train", image_column: str = "image",
                            caption_column: str = "caption", streaming: Optional[bool] = None,
                            decode_images: bool = False, bad_shards: str = "skip", agreed_failure: bool = False,
                            **load_kwargs):
    """Open ``source`` (see module docstring) and check its image and caption columns.

    Args:
        source: a local folder or file, or any ``load_dataset`` path / hub id.
        split: split to return; ``None`` returns the whole ``DatasetDict``.
        image_column / caption_column: the columns the collator will read.
        streaming: return an ``IterableDataset`` (a ``save_to_disk`` folder is converted with
            ``to_iterable_dataset``). Default: tar shards stream, everything else does not.
        decode_images: keep ``datasets``' PIL decoding instead of ``Image(decode=False)``.
        bad_shards: tar shards only: ``"skip"`` names, skips and notes a bad shard (truncated, empty, an
            undecodable member, fewer rows than its stats file), ``"fail"`` raises naming it (:mod:`.shards`).
        agreed_failure: tar shards streamed with ``"fail"``: raised at the trainer's next agreed batch, on every
            process (:func:`~hf_siglip.data.shards.load_webdataset_shards`).
        **load_kwargs: passed to ``datasets.load_dataset``.
    """

    path = Path(os.path.expanduser(str(source)))
    if is_shard_source(source):
        dataset = load_webdataset_shards(source, split=split, streaming=streaming is not False,
                                         bad_shards=bad_shards, agreed_failure=agreed_failure)
    elif path.is_dir() and _is_saved_to_disk(path):
        dataset = datasets.load_from_disk(str(path))
        if split is not None and isinstance(dataset, datasets.DatasetDict):
            dataset = select_split(dataset, split, str(path))
        if streaming:
            dataset = (datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dataset.items()})
                       if isinstance(dataset, datasets.DatasetDict) else dataset.to_iterable_dataset())
    else:
        metadata = [file for file in _metadata_files(path) if file.suffix == ".jsonl"] if path.is_dir() else []
        if any([_has_mixed_caption_types(file, caption_column) for file in metadata]):  # reads (checks) them all
            dataset = _load_mixed_metadata(path, metadata, image_column, caption_column, split, streaming)
            builder = None
        elif path.is_dir():
            builder, kwargs = _folder_builder(path)
        elif path.is_file() and path.suffix in _FILE_BUILDERS:
            builder, kwargs = _FILE_BUILDERS[path.suffix], {"data_files": [str(path)]}
        else:
            builder, kwargs = str(source), {}
        if builder is not None:
            kwargs.update(load_kwargs)
            dataset = datasets.load_dataset(builder, split=split, streaming=bool(streaming), **kwargs)

    for part in (dataset.values() if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict))
                 else [dataset]):
        check_columns(part, [image_column, caption_column])
    if not decode_images:
        dataset = _undecoded(dataset, image_column)
    return dataset


def _metadata_rows(metadata: Path):
    """(line number, row) for each non-blank line; a line that is not a JSON object raises naming file and line."""
    with open(metadata, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata} line {line_number}: not valid JSON ({error.msg} at column "
                                 f"{error.colno}): {line.strip()[:80]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{metadata} line {line_number}: expected a JSON object with file_name and the "
                                 f"caption, got {type(row).__name__}")
            yield line_number, row


def _has_mixed_caption_types(metadata: Path, caption_column: str) -> bool:
    """True when ``metadata.jsonl`` mixes plain-string and list captions (pyarrow refuses such a column).
    Reads every line, so a malformed one is reported here with its file and line number."""
    kinds = set()
    for _, row in _metadata_rows(metadata):
        value = row.get(caption_column)
        if value is not None:
            kinds.add(isinstance(value, str))
    return len(kinds) > 1


def _load_mixed_metadata(path: Path, metadata_files: list[Path], image_column: str, caption_column: str, split,
                         streaming):
    """imagefolder fallback for a caption column mixing strings and lists: every cell becomes a list
    (a string -> one-element list; None stays None and is counted where captions are used). A top-level
    metadata file is the 'train' split; a split folder's file is that split."""
    parts = {}
    for metadata in metadata_files:
        rows = []
        for line_number, row in _metadata_rows(metadata):
            if "file_name" not in row:
                raise KeyError(f"{metadata} line {line_number}: no 'file_name'")
            row[image_column] = str(metadata.parent / row.pop("file_name"))
            if isinstance(row.get(caption_column), str):
                row[caption_column] = [row[caption_column]]
            rows.append(row)
        name = "train" if metadata.parent == path else split_name(metadata.parent.name)
        parts[name] = datasets.Dataset.from_list(rows).cast_column(image_column, datasets.Image())
    dataset = datasets.DatasetDict(parts)
    if split is not None:
        dataset = select_split(dataset, split, str(path))
    if streaming:
        dataset = (datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dataset.items()})
                   if isinstance(dataset, datasets.DatasetDict) else dataset.to_iterable_dataset())
    return dataset


def check_columns(dataset, columns) -> None:
    """Raise ``KeyError`` naming each missing column (skipped when a stream's columns are unknown)."""
    names = dataset.column_names
    if names is None:
        return
    missing = [c for c in columns if c not in names]
    if missing:
        raise KeyError(f"column(s) {missing} not found; the dataset has columns {names}. "
                       "Set image_column= / caption_column= to the right names.")


def _undecoded(dataset, image_column: str):
    features = dataset.features if not isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)) \
        else next(iter(dataset.values())).features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


CANONICAL_IMAGE, CANONICAL_CAPTION = "image", "caption"


def canonical_columns(dataset, image_column: str = CANONICAL_IMAGE, caption_column: str = CANONICAL_CAPTION):
    """Rename the configured image and caption columns to ``image`` and ``caption``, once, at load: every data
    step, the collator and the evaluation then use those names. A clash (another column already called so) raises
    naming both."""
    renames = {source: target for source, target in ((image_column, CANONICAL_IMAGE),
                                                      (caption_column, CANONICAL_CAPTION)) if source != target}
    names = dataset.column_names or []
    for source, target in renames.items():
        if target in names:
            raise ValueError(f"cannot rename column {source!r} to {target!r}: the dataset already has a {target!r} "
                             f"column (columns: {names}); drop or rename it first")
    return dataset.rename_columns(renames) if renames else dataset


def add_image_ids(dataset, column: str = "image_id", offset: int = 0, key_column: Optional[str] = None):
    """Add an ``image_id`` column holding ``offset + row index`` (a stable id per image).

    On a ``Dataset`` this appends one int64 column without touching the others; on an
    ``IterableDataset`` it is a lazy batched map reading only ``key_column`` (default: the first column
    that is not an image) so images are not decoded.
    """
    if isinstance(dataset, datasets.Dataset):
        return dataset.add_column(column, list(range(offset, offset + len(dataset))),
                                  feature=datasets.Value("int64"))
    names = dataset.column_names or []
    features = dataset.features or {}
    key_column = key_column or next((c for c in names if not isinstance(features.get(c), datasets.Image)), None)
    if key_column is None:
        raise ValueError("add_image_ids on a stream needs key_column= (a small column to read alongside the index)")
    return dataset.map(lambda _, indices: {column: [offset + i for i in indices]}, input_columns=[key_column],
                       batched=True, with_indices=True)
