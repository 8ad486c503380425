"""Webdataset tar shards in img2dataset's layout: reading them as a ``datasets`` stream, and writing them.

A shard is a ``.tar`` whose members are grouped by key: ``000000012.jpg`` + ``000000012.txt`` (the caption) and/or
``000000012.json`` (img2dataset's metadata: ``{"caption": ...}``, or ``{"captions": [...]}`` for several). An image
extension (jpg, jpeg, png, webp, bmp, tif, tiff, gif) marks the image. Beside a shard, img2dataset's
``00000_stats.json`` (``successes``: the rows it holds) lets the reader tell a shard cut short.

:func:`load_webdataset_shards` opens a folder (or a glob) of shards, streaming by default, reading each tar with
``tarfile`` in a ``datasets.IterableDataset.from_generator`` whose shards are the tar files (the column types come
from the first samples, as ``datasets``' webdataset builder infers them), and gives the rows the canonical columns
the rest of the package reads:

* ``image``: ``{"bytes", "path"}`` (``Image(decode=False)``; the collator decodes, drafting JPEGs to size);
* ``caption``: the json's ``captions`` list, else its ``caption``, else the ``.txt`` text (None when absent: the
  collator drops and counts caption-less rows);
* ``image_id``: the key as an integer (img2dataset's keys are digits, unique across shards), else a stable 63-bit
  hash of the key, so the same image has the same id on every process and in every epoch;
* the json's other fields (a label, a url...).

Splits: shards directly in the folder are the ``train`` split; sub-folders (``train/``, ``test/``, ``validation/``
or ``dev/``) give splits. ``streaming=False`` reads one split's files, and only those, into Arrow.

Bad shards, found where they are read (policy ``bad_shards``): a tar that does not open or ends mid-member
(truncated, empty, not a tar) ends there, its earlier rows kept; a sample whose ``.txt`` / ``.json`` does not decode
is skipped alone; a shard with fewer rows than its stats file records is short. With ``"skip"`` each is named in a
warning and noted in this process's fault log (DataLoader workers included): :func:`shard_faults` reads it back
and :func:`shard_fault_report` counts each fault once for the data report. With ``"fail"`` a :class:`ShardError`
names the shard (``hf_siglip.training.stream_training`` raises it on every process).

Distributed training: the stream's ``n_shards`` is the number of tar files; ``SiglipTrainer`` hands each process
its own shards (accelerate's ``IterableDataset.shard`` path) and ends an epoch on every process when the first
one runs out of rows (see ``SiglipTrainer``), so no row is seen twice within an epoch and no process waits
forever. Give at least as many shards as processes x DataLoader workers, of similar sizes.

:func:`write_webdataset_shards` (also ``hf-siglip shards SRC DST``) writes any image-text dataset the package
loads (an imagefolder, say) as such shards, copying the encoded image bytes as they are (no re-encoding), with a
stats file beside each.
"""

from __future__ import annotations

import atexit
import glob as globbing
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import datasets
import pyarrow as pa

from ..errors import HfSiglipError  # a leaf module: data/ still imports nothing else of the package
from .splits import split_name
from .text import normalize_captions

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
STATS_SUFFIX = "_stats.json"  # img2dataset's: 00000_stats.json beside 00000.tar, its "successes" the rows written
BAD_SHARDS = ("skip", "fail")
_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_SAMPLES_FOR_FEATURES = 5  # as datasets' webdataset builder
_MARKER = "__shard_fault__"  # a split read into Arrow keeps its faults as marker rows (see _open_split)


class ShardError(HfSiglipError):
    """A shard that cannot be read as it should, with ``bad_shards="fail"``: one line naming the shard."""

    def __init__(self, message: str):
        if message.startswith("Caught ShardError"):  # re-raised from a DataLoader worker, with its traceback
            message = message.strip().splitlines()[-1].split("ShardError: ", 1)[-1]
        super().__init__(message)


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


def _caption_of(metadata, text, several: bool):
    caption = text
    if isinstance(metadata, dict):
        caption = next((metadata[name] for name in ("captions", "caption") if metadata.get(name) is not None), text)
    if several and isinstance(caption, str):
        return [caption]
    return caption


def _shard_files(source: str) -> dict[str, list[str]]:
    """{split: sorted tar files}: a glob or file is 'train'; a folder's top-level tars are 'train', each sub-folder
    holding tars is a split of its name (datasets' aliases: dev/val -> validation)."""

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
            splits.setdefault(split_name(folder.name), []).extend(files)
    return splits


def load_webdataset_shards(source, split: Optional[str] = "train", streaming: bool = True, bad_shards: str = "skip",
                           agreed_failure: bool = False):
    """Open tar shards (see module docstring) with canonical columns ``image``, ``caption``, ``image_id``.

    ``streaming=False`` reads the split's shards (only those) into an Arrow cache once (a small evaluation split,
    say). ``split=None`` returns every split (an ``IterableDatasetDict`` / ``DatasetDict``). ``bad_shards``:
    ``"skip"`` (name, skip and note them: :func:`shard_fault_report`) or ``"fail"`` (:class:`ShardError`).
    ``agreed_failure`` (with ``"fail"``, for streams): a fault is named and noted as fatal and reading goes on;
    :func:`pending_shard_failure` tells it, for ``hf_siglip.training.stream_training`` to raise on every process at
    the next
    batch they agree on (a stream read by one process alone, for a start-up summary say, must not fail alone).
    """

    if bad_shards not in BAD_SHARDS:
        raise ValueError(f"bad_shards must be one of {BAD_SHARDS}, got {bad_shards!r}")
    files = _shard_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no {SHARD_SUFFIX} shards found")
    if split is not None:  # only this split's files are read (select_split's aliases: dev / val -> validation)
        name = next((key for key in files if key == split), None) or next(
            (key for key in files if split_name(key) == split_name(split)), None)
        if name is None:
            raise KeyError(f"{source} has no split {split!r}; its splits are {sorted(files)}")
        files = {name: files[name]}
    parts = {name: _open_split(paths, name, str(source), streaming, bad_shards, agreed_failure)
             for name, paths in files.items()}
    if split is not None:
        return next(iter(parts.values()))
    return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(parts)


def _open_split(paths: list[str], split: str, source: str, streaming: bool, bad_shards: str, agreed: bool):
    features, metadata_columns, several = _infer_features(paths, source)
    options = {"split": split, "bad_shards": bad_shards, "metadata_columns": metadata_columns, "several": several,
               "fault_log": _fault_log_dir(), "markers": not streaming, "agreed": agreed and streaming}
    if streaming:  # one shard per list item: datasets splits the list across processes and DataLoader workers
        return datasets.IterableDataset.from_generator(_generate_rows, features=features,
                                                       gen_kwargs={"shards": paths, "options": options})
    # the Arrow cache is keyed by the shards' paths, sizes and times (a rewritten shard is read again); faults are
    # stored as marker rows, so a cached split reports them on every load too
    options["fault_log"] = None
    stamps = [[os.path.getsize(path), os.path.getmtime(path)] for path in paths]
    marked = datasets.Features({**features, _MARKER: datasets.Value("string")})
    table = datasets.Dataset.from_generator(_generate_rows, features=marked,
                                            gen_kwargs={"shards": paths, "stamps": stamps, "options": options})
    markers = table[_MARKER]
    faults = [json.loads(marker) for marker in markers if marker is not None]
    if faults:
        for fault in faults:  # named (or failed) on every load, the cache's included
            _note_fault(fault, {**options, "markers": False, "fault_log": _fault_log_dir()})
        table = table.select([row for row, marker in enumerate(markers) if marker is None])
    return table.remove_columns(_MARKER)


def _infer_features(paths: list[str], source: str):
    """(features, metadata columns, several captions) from the first few samples of the first readable shards."""
    samples = []
    for path in paths:
        try:
            with tarfile.open(path, "r|*") as archive:
                for _, members in _samples(archive):
                    samples.append(members)
                    if len(samples) >= _SAMPLES_FOR_FEATURES:
                        break
        except (tarfile.TarError, OSError, EOFError):  # read (and named) with the rows
            pass
        if len(samples) >= _SAMPLES_FOR_FEATURES:
            break
    if not samples:
        raise ShardError(f"{source}: none of its {len(paths)} shard(s) ({paths[0]}...) holds a readable sample")
    names = sorted({extension for members in samples for extension in members})
    if not any(extension in _IMAGE_COLUMNS for extension in names):
        raise KeyError(f"{source}: the shards hold no image member (members per key: {names}; expected one "
                       f"of {list(_IMAGE_COLUMNS)})")
    if "txt" not in names and "json" not in names:
        raise KeyError(f"{source}: the shards hold no caption member (.txt or .json); members per key: {names}")
    metadata = []
    for members in samples:
        try:
            value = json.loads(members["json"].decode("utf-8")) if "json" in members else {}
        except ValueError:
            continue
        metadata.append(value if isinstance(value, dict) else {})
    several = any("captions" in value for value in metadata)
    caption = datasets.List(datasets.Value("string")) if several else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": caption,
                                  "image_id": datasets.Value("int64")})
    fields = [{name: value for name, value in row.items() if name not in ("caption", "captions", *features)}
              for row in metadata]
    if any(fields):  # the json's other fields (a label, a url...) become columns, typed as datasets would
        schema = pa.Table.from_pylist(fields).schema
        features.update(datasets.Features.from_arrow_schema(schema))
    return features, tuple(name for name in features if name not in ("image", "caption", "image_id")), several


_KEY_PATTERN = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's: key = path up to the name's first dot


def _samples(archive):
    """(key, {extension: bytes}) per sample: consecutive members sharing a key, as webdataset groups them."""
    key, members = None, {}
    for info in archive:
        match = _KEY_PATTERN.match(info.name) if info.isfile() else None
        if match is None:
            continue
        if members and match.group(1) != key:
            yield key, members
            members = {}
        key = match.group(1)
        members[match.group(2).lower()] = archive.extractfile(info).read()
    if members:
        yield key, members


def _row(key: str, members: dict, options: dict) -> dict:
    """A canonical row; a member that does not decode (a non-UTF-8 .txt, a .json that is not JSON) raises
    ValueError naming it."""
    image = next(((extension, members[extension]) for extension in members if extension in _IMAGE_COLUMNS), None)
    try:
        metadata = json.loads(members["json"].decode("utf-8")) if "json" in members else None
    except ValueError as error:
        raise ValueError(f"{key}.json does not decode ({error})") from None
    try:
        text = members["txt"].decode("utf-8") if "txt" in members else None
    except UnicodeDecodeError as error:
        raise ValueError(f"{key}.txt is not UTF-8 text ({error.reason} at byte {error.start})") from None
    row = {"image": {"bytes": image[1], "path": f"{key}.{image[0]}"} if image else None,
           "caption": _caption_of(metadata, text, options["several"]), "image_id": image_id_of_key(key)}
    for name in options["metadata_columns"]:
        row[name] = metadata.get(name) if isinstance(metadata, dict) else None
    return row


def _generate_rows(shards: list[str], options: dict, stamps=None):
    """The rows of ``shards`` in order (``stamps`` only keys the Arrow cache)."""
    for path in shards:
        yield from _shard_rows(path, options)


def _shard_rows(path: str, options: dict):
    """The rows of one shard. A sample whose .txt or .json does not decode is skipped; a shard that does not open
    or ends mid-member (truncated, empty, not a tar) ends there; one that holds fewer rows than its
    ``<shard>_stats.json`` says is short. Each is a fault (:func:`_note_fault`): named, noted, or with
    ``bad_shards="fail"`` a :class:`ShardError`."""
    rows, skipped, unreadable = 0, 0, None  # skipped: samples whose member did not decode (not missing)
    try:
        with tarfile.open(path, "r|*") as archive:
            for key, members in _samples(archive):
                try:
                    row = _row(key, members, options)
                except ValueError as error:
                    skipped += 1
                    marker = _note_fault(_fault(options, path, "rows_with_undecodable_member", 1, str(error),
                                                key=key), options)
                    if marker is not None:
                        yield marker
                    continue
                rows += 1
                yield {**row, _MARKER: None} if options["markers"] else row
    except (tarfile.TarError, OSError, EOFError) as error:
        unreadable = f"{error or type(error).__name__} after {rows} row(s)"
    expected = expected_rows(path)
    missing = max(0, expected - rows - skipped) if expected is not None else 0
    fault = None
    if unreadable is not None:
        detail = unreadable + (f" of the {expected} its stats file records" if expected is not None else "")
        fault = _fault(options, path, "shards_unreadable", 1, detail, missing=missing)
    elif missing:
        detail = f"{rows} row(s) where its stats file records {expected} (cut on a member boundary?)"
        fault = _fault(options, path, "shards_short", 1, detail, missing=missing)
    marker = _note_fault(fault, options) if fault is not None else None
    if marker is not None:
        yield marker


def _fault(options: dict, path: str, reason: str, count: int, detail: str, key: str | None = None,
           missing: int = 0) -> dict:
    return {"split": options["split"], "shard": path, "reason": reason, "count": count, "detail": detail,
            "key": key, "missing": missing}


def _note_fault(fault: dict, options: dict):
    """Fail (``bad_shards="fail"``), or warn naming the shard and note the fault in this process's log. For a split
    read into Arrow (``markers``) the fault becomes a marker row instead, returned, and is noted when the split is
    opened, also from the cache."""
    if options["markers"]:
        return {"image": None, "caption": None, "image_id": None,
                **{name: None for name in options["metadata_columns"]}, _MARKER: json.dumps(fault)}
    fatal = options["bad_shards"] == "fail"
    if fatal and not (options.get("agreed") and options["fault_log"]):
        raise ShardError(_failure_message(fault))
    if options["fault_log"]:  # one file per fault: a fault met again (next epoch, another worker) is not repeated
        fault = {**fault, "fatal": True} if fatal else fault
        identity = json.dumps([fault["split"], fault["shard"], fault["reason"], fault["key"]])
        name = ("fatal-" if fatal else "") + hashlib.blake2b(identity.encode(), digest_size=16).hexdigest() + ".json"
        if not _write_once(os.path.join(options["fault_log"], name), json.dumps(fault)):
            return None
    if fatal:
        logger.warning("bad shard %s: %s; the run stops at the next batch (bad_shards=fail)", fault["shard"],
                       fault["detail"])
        return None
    consequence = {"rows_with_undecodable_member": "its row is skipped",
                   "shards_short": "its missing rows are counted"}.get(fault["reason"], "the rest of it is skipped")
    logger.warning("bad shard %s: %s; %s (bad_shards=skip)", fault["shard"], fault["detail"], consequence)
    return None


def _write_once(path: str, text: str) -> bool:
    """Write `path` whole unless it exists (a hard link is atomic and refuses an existing name); True if written."""
    temporary = f"{path}.{os.getpid()}.tmp"
    Path(temporary).write_text(text)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)


def _failure_message(fault: dict) -> str:
    return f"bad shard {fault['shard']}: {fault['detail']} (--bad_shards skip skips and counts it)"


def pending_shard_failure() -> Optional[str]:
    """The message of a fault noted as fatal (``agreed_failure``) in this process's log, or None: a directory
    listing, cheap enough to ask at every batch."""
    folder = _FAULT_LOG.get(os.getpid())
    for name in sorted(os.listdir(folder)) if folder else ():
        if name.startswith("fatal-") and name.endswith(".json"):
            return _failure_message(json.loads(Path(folder, name).read_text()))
    return None


def expected_rows(path: str) -> int | None:
    """The rows a shard should hold, from img2dataset's ``<shard>_stats.json`` beside it (``successes``), or None."""
    stats = Path(path[: -len(SHARD_SUFFIX)] + STATS_SUFFIX) if path.endswith(SHARD_SUFFIX) else None
    try:
        value = json.loads(stats.read_text())["successes"] if stats is not None and stats.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: not a stats file with 'successes'; the rows of %s are not checked", stats, path)
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_FAULT_LOG = {}  # pid -> folder: where this process and its DataLoader workers note faults


def _fault_log_dir() -> str:
    folder = _FAULT_LOG.get(os.getpid())
    if folder is None:
        folder = _FAULT_LOG[os.getpid()] = tempfile.mkdtemp(prefix="hf_siglip-shard-faults-")
        atexit.register(shutil.rmtree, folder, True)
    return folder


def clear_shard_faults() -> None:
    """Forget the faults noted so far in this process (a new run starts counting afresh)."""
    folder = _FAULT_LOG.get(os.getpid())
    for name in os.listdir(folder) if folder else ():
        if name.endswith(".json"):
            os.remove(os.path.join(folder, name))


def shard_faults() -> list[dict]:
    """The faults this process and its DataLoader workers noted (each shard, reason and row once), in order."""
    folder, faults = _FAULT_LOG.get(os.getpid()), []
    for name in os.listdir(folder) if folder else ():
        if name.endswith(".json"):  # written whole (_write_once)
            faults.append(json.loads(Path(folder, name).read_text()))
    return sorted(faults, key=lambda fault: (fault["split"], fault["shard"], fault["key"] or "", fault["reason"]))


def shard_fault_report(faults: list[dict], evaluation_split: Optional[str] = None) -> dict[str, int]:
    """Counts for the data report: ``train/<reason>`` (``evaluation/<reason>`` for the evaluation split) and
    ``.../rows_missing_from_shards``, each shard, reason and row counted once however often it was read."""

    fatal = next((fault for fault in faults if fault.get("fatal")), None)
    if fatal is not None:  # noted under agreed_failure and not raised yet: every process has the same list
        raise ShardError(_failure_message(fatal))
    report, seen = Counter(), set()
    for fault in faults:
        identity = (fault["split"], fault["shard"], fault["reason"], fault["key"])
        if identity in seen:
            continue
        seen.add(identity)
        evaluation = evaluation_split is not None and split_name(fault["split"]) == split_name(evaluation_split)
        stage = "evaluation" if evaluation else "train"
        report[f"{stage}/{fault['reason']}"] += fault["count"]
        if fault["missing"]:
            report[f"{stage}/rows_missing_from_shards"] += fault["missing"]
    return dict(sorted(report.items()))


def write_webdataset_shards(dataset, output_dir, rows_per_shard: int = 1000, image_column: str = "image",
                            caption_column: str = "caption") -> list[str]:
    """Write ``dataset`` (any dataset :func:`~hf_siglip.data.load_image_text_dataset` returns, images undecoded)
    as img2dataset-style shards ``00000.tar, 00001.tar, ...`` in ``output_dir``; returns their paths.

    Each row becomes ``{key}.{ext}`` (its encoded bytes copied as they are) and ``{key}.json`` (``{"caption": text}``
    or ``{"captions": [...]}``) plus ``{key}.txt`` (the first caption), with ``key`` the row number zero-padded to 9
    digits, so ids stay unique across shards. ``ext`` is the first image's format for every row: a folder mixing
    .jpg and .png keeps each image's bytes (readers decode by content: PIL, ``datasets``' Image, webdataset), and
    every sample has the same members, which ``datasets``' webdataset builder requires (it takes the column types
    from the first samples of the first shard and refuses samples whose members differ). Beside each shard,
    ``{shard}_stats.json`` records its rows (``successes``, as img2dataset writes it): the reader counts the rows
    of a shard cut short. A row whose image has neither bytes nor a readable file raises, naming the row.
    """
    from PIL import Image

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(dataset, datasets.Dataset) and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    paths, archive, extension, rows = [], None, None, 0
    try:
        for row_number, row in enumerate(dataset):
            if row_number % rows_per_shard == 0:
                if archive is not None:
                    archive.close()
                    _write_stats(paths[-1], rows)
                paths.append(str(output_dir / f"{len(paths):05d}{SHARD_SUFFIX}"))
                archive, rows = tarfile.open(paths[-1], "w"), 0
            key = f"{row_number:09d}"
            data = _encoded_bytes(row[image_column], row_number)
            if extension is None:
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
            # always a .txt (empty without a caption): every sample has the same members
            members[f"{key}.txt"] = (captions[0] if captions else "").encode()
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            rows += 1
    finally:
        if archive is not None:
            archive.close()
    if paths:
        _write_stats(paths[-1], rows)
    return paths


def _write_stats(path: str, rows: int) -> None:
    stats = {"count": rows, "successes": rows, "failed_to_download": 0, "failed_to_resize": 0}
    Path(path[: -len(SHARD_SUFFIX)] + STATS_SUFFIX).write_text(json.dumps(stats) + "\n")


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
