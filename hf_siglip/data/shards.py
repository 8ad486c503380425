"""Webdataset tar shards in img2dataset's layout: reading them as a ``datasets`` stream, and writing them.

A shard is a ``.tar`` whose members are grouped by key: ``000000012.jpg`` + ``000000012.txt`` (the caption) and/or
``000000012.json`` (img2dataset's metadata: ``{"caption": ...}``, or ``{"captions": [...]}`` for several). Any image
extension ``datasets``' webdataset loader knows (jpg, jpeg, png, webp...) is the image.

:func:`load_webdataset_shards` opens a folder (or a glob) of shards through ``datasets``' own ``webdataset`` builder,
streaming by default, and gives the rows the canonical columns the rest of the package reads:

* ``image``: ``{"bytes", "path"}`` (``Image(decode=False)``; the collator decodes, drafting JPEGs to size);
* ``caption``: the json's ``captions`` list, else its ``caption``, else the ``.txt`` text (None when absent: the
  collator drops and counts caption-less rows);
* ``image_id``: the key as an integer (img2dataset's keys are digits, unique across shards), else a stable 63-bit
  hash of the key, so the same image has the same id on every process and in every epoch.

Splits: shards directly in the folder are the ``train`` split; sub-folders (``train/``, ``test/``, ``validation/``
or ``dev/``) or file-name prefixes (``train-00000.tar``) give splits, as ``datasets`` infers them.

Distributed training: the stream's ``n_shards`` is the number of tar files; ``SiglipTrainer`` hands each process
its own shards (accelerate's ``IterableDataset.shard`` path) and ends an epoch on every process when the first
one runs out of rows (see ``SiglipTrainer``), so no row is seen twice within an epoch and no process waits
forever. Give at least as many shards as processes x DataLoader workers, of similar sizes.

:func:`write_webdataset_shards` (also ``hf-siglip shards SRC DST``) writes any image-text dataset the package
loads (an imagefolder, say) as such shards, copying the encoded image bytes as they are (no re-encoding).
"""

from __future__ import annotations

import glob as globbing
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Optional

import datasets

from .text import normalize_captions

SHARD_SUFFIX = ".tar"
_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_KEY_COLUMNS = ("__key__", "__url__")


def is_shard_source(source) -> bool:
    """True for a ``.tar`` file, a glob matching one, or a folder holding ``.tar`` files (at the top or one level
    down, for split folders)."""
    text = os.path.expanduser(str(source))
    if any(char in text for char in "*?["):
        return any(name.endswith(SHARD_SUFFIX) for name in globbing.glob(text))
    path = Path(text)
    if path.is_file():
        return path.suffix == SHARD_SUFFIX
    return path.is_dir() and (any(path.glob(f"*{SHARD_SUFFIX}")) or any(path.glob(f"*/*{SHARD_SUFFIX}")))


def image_id_of_key(key: str) -> int:
    """The row's id: the key itself when it is a number (img2dataset), else a stable 63-bit hash of it."""
    if key.isdigit() and len(key) <= 18:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _caption_of(row: dict):
    metadata = row.get("json")
    if isinstance(metadata, dict):
        for name in ("captions", "caption"):
            if metadata.get(name) is not None:
                return metadata[name]
    return row.get("txt")


def _canonical_rows(batch: dict, metadata_columns: tuple[str, ...] = ()) -> dict:
    count = len(batch["__key__"])
    image_columns = [name for name in _IMAGE_COLUMNS if name in batch]
    images = [next((batch[name][i] for name in image_columns if batch[name][i] is not None), None)
              for i in range(count)]
    rows = [{name: batch[name][i] for name in ("json", "txt") if name in batch} for i in range(count)]
    columns = {"image": images, "caption": [_caption_of(row) for row in rows],
               "image_id": [image_id_of_key(key) for key in batch["__key__"]]}
    for name in metadata_columns:  # the json's other fields (a label, a url...) become columns
        columns[name] = [(row.get("json") or {}).get(name) for row in rows]
    return columns


def _shard_files(source: str) -> dict[str, list[str]]:
    """{split: sorted tar files}: a glob or file is 'train'; a folder's top-level tars are 'train', each sub-folder
    holding tars is a split of its name (datasets' aliases: dev/val -> validation)."""
    from .loading import _split_name

    text = os.path.expanduser(str(source))
    if any(char in text for char in "*?[") or Path(text).is_file():
        return {"train": sorted(globbing.glob(text))}
    path = Path(text)
    splits = {}
    top = sorted(str(p) for p in path.glob(f"*{SHARD_SUFFIX}"))
    if top:
        splits["train"] = top
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(str(p) for p in folder.glob(f"*{SHARD_SUFFIX}"))
        if files:
            splits.setdefault(_split_name(folder.name), []).extend(files)
    return splits


def load_webdataset_shards(source, split: Optional[str] = "train", streaming: bool = True):
    """Open tar shards (see module docstring) with canonical columns ``image``, ``caption``, ``image_id``.

    ``streaming=False`` reads them into an Arrow cache once (a small evaluation split, say). ``split=None``
    returns every split (an ``IterableDatasetDict`` / ``DatasetDict``).
    """
    from .loading import select_split

    files = _shard_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no {SHARD_SUFFIX} shards found")
    raw = datasets.load_dataset("webdataset", data_files=files, streaming=streaming)
    if split is not None:
        raw = select_split(raw, split, str(source))
    if isinstance(raw, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(raw)({name: _canonical(part, str(source)) for name, part in raw.items()})
    return _canonical(raw, str(source))


def _canonical(raw, source: str):
    names = list(raw.features)
    image_columns = [name for name in _IMAGE_COLUMNS if name in names]
    if not image_columns:
        raise KeyError(f"{source}: the shards hold no image member (members per key: {sorted(names)}; expected one "
                       f"of {list(_IMAGE_COLUMNS)})")
    if "txt" not in names and "json" not in names:
        raise KeyError(f"{source}: the shards hold no caption member (.txt or .json); members per key: {sorted(names)}")
    metadata = raw.features.get("json")
    several = isinstance(metadata, dict) and "captions" in metadata  # json {"captions": [...]}: a list per row
    caption = datasets.List(datasets.Value("string")) if several else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": caption,
                                  "image_id": datasets.Value("int64")})
    metadata_columns = tuple(name for name in (metadata if isinstance(metadata, dict) else {})
                             if name not in ("caption", "captions", *features))
    features.update({name: metadata[name] for name in metadata_columns})
    for name in image_columns:
        raw = raw.cast_column(name, datasets.Image(decode=False))
    return raw.map(_canonical_rows, batched=True, remove_columns=names, features=features,
                   fn_kwargs={"metadata_columns": metadata_columns})


def write_webdataset_shards(dataset, output_dir, rows_per_shard: int = 1000, image_column: str = "image",
                            caption_column: str = "caption") -> list[str]:
    """Write ``dataset`` (any dataset :func:`~hf_siglip.data.load_image_text_dataset` returns, images undecoded)
    as img2dataset-style shards ``00000.tar, 00001.tar, ...`` in ``output_dir``; returns their paths.

    Each row becomes ``{key}.{ext}`` (its encoded bytes copied, ``ext`` from the image's format) and ``{key}.json``
    (``{"caption": text}`` or ``{"captions": [...]}``) plus ``{key}.txt`` (the first caption), with ``key`` the row
    number zero-padded to 9 digits, so ids stay unique across shards. A row whose image has neither bytes nor a
    readable file raises, naming the row.
    """
    from PIL import Image

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(dataset, datasets.Dataset) and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    paths, archive = [], None
    try:
        for row_number, row in enumerate(dataset):
            if row_number % rows_per_shard == 0:
                if archive is not None:
                    archive.close()
                paths.append(str(output_dir / f"{len(paths):05d}{SHARD_SUFFIX}"))
                archive = tarfile.open(paths[-1], "w")
            key = f"{row_number:09d}"
            data = _encoded_bytes(row[image_column], row_number)
            try:
                extension = (Image.open(io.BytesIO(data)).format or "jpeg").lower()
            except (OSError, ValueError):  # broken bytes travel as they are: the collator counts and skips them
                extension = "jpg"
            extension = {"jpeg": "jpg", "tiff": "tif"}.get(extension, extension)
            captions, _ = normalize_captions(row[caption_column], row=row_number)
            raw = row[caption_column]
            metadata = {"captions": captions} if isinstance(raw, (list, tuple)) else {"caption": raw}
            metadata.update({name: value for name, value in row.items()  # a label, say: kept for evaluation
                             if name not in (image_column, caption_column, "image_id") and _is_plain(value)})
            members = {f"{key}.{extension}": data, f"{key}.json": json.dumps(metadata).encode()}
            if captions:
                members[f"{key}.txt"] = captions[0].encode()
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    finally:
        if archive is not None:
            archive.close()
    return paths


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and all(isinstance(item, (str, int, float, bool)) for item in value))


def _encoded_bytes(value, row_number: int) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
    elif isinstance(value, (bytes, bytearray)):
        return bytes(value)
    elif isinstance(value, str):
        return Path(value).read_bytes()
    raise ValueError(f"row {row_number}: image has neither bytes nor a file path ({type(value).__name__})")
