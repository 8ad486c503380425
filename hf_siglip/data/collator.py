"""``SiglipDataCollator``: rows (image, one or several captions, optional ids) -> model/loss tensors.

Output (all ``torch.Tensor``):

* ``pixel_values`` ``(B, C, H, W)`` float — or ``image_embeds`` ``(B, D)`` float when rows carry a
  precomputed ``image_embeds`` column (locked / cached image tower, SigLiT); with a NaFlex image processor
  (Siglip2) ``pixel_values`` are patches ``(B, N, P)``, beside its ``pixel_attention_mask`` and ``spatial_shapes``.
  With ``normalize_on_device=True`` (what ``SiglipTrainer`` sets, see "Images") the fast path's ``pixel_values``
  are ``uint8`` instead, beside ``pixel_normalization`` ``(B, 2, 3)`` float32 (each image's per-channel scale and
  offset): :func:`normalize_pixel_values` turns them into the float values, on the device;
* ``input_ids`` ``(T, max_length)`` long, padded to ``max_length`` and truncated (as SigLIP was
  trained: no attention mask is needed); ``attention_mask`` beside them with ``return_attention_mask=True``, which a
  BERT-like text tower needs (``hf_siglip.data.embedding.text_uses_attention_mask``: ``hf-siglip train`` and
  ``SiglipTrainer``'s default collator set it for a ``VisionTextDualEncoder``);
* ``image_ids`` ``(B,)`` long and ``text_ids`` ``(T,)`` long: image i and text j are a positive pair iff
  their ids are equal. The k captions of one row become k texts with that row's id;
* ``concept_targets`` ``(B, C)`` float when rows carry that column (a teacher's logits or features for DiHT's
  concept distillation: the ``concept_targets`` data step), one row per kept image.

Ids: ``id_column="auto"`` uses ``group_id`` if the row has it, else ``image_id``. A row without either
gets a fallback id that cannot collide across processes or DataLoader workers:
``(process_index << 48) | (worker_id << 40) | counter`` where ``process_index`` is
``torch.distributed.get_rank()`` when initialised (else 0) and ``counter`` runs over this collator
copy's rows. Fallback ids are unique per row seen, so duplicates of one image are *not* recognised:
add an ``image_id`` column (``add_image_ids`` in :mod:`hf_siglip.data.loading`) for that, and for
per-epoch deterministic caption sampling.

Bad rows (policies; counts in ``collator.stats`` and a ``logging`` warning per affected batch):

* no usable caption (None, empty list, only empty/whitespace strings): row **dropped**, counted;
* None/empty/whitespace captions inside a list: caption **dropped**, counted, the rest kept;
* an image that fails to decode (truncated, garbage, None), or a ``None`` cached ``image_embeds``:
  row **dropped**, counted;
* ``None`` ``concept_targets`` (the teacher could not decode the image): row **dropped**, counted;
* grey-scale / RGBA / 16-bit / palette images: **converted** to RGB (see :mod:`hf_siglip.data.images`);
* a configured column missing from a row: **raises** ``KeyError`` naming the column and the row's columns;
* a non-string caption: **raises** ``TypeError`` naming the row.

If every row of a batch is dropped the tensors are empty (``B = T = 0``) rather than an exception
(``SiglipTrainer`` then skips the step on every process together and counts it). With
``return_drop_counts=True`` (``SiglipTrainer`` switches it on) each batch also carries ``dropped_rows``,
a dict of this batch's drop counts by reason, so counts made in DataLoader workers reach the trainer's
data report.

Images: a row's image is decoded by :func:`~hf_siglip.data.images.decode_image`, JPEGs straight to the smallest
DCT scale (1/2, 1/4, 1/8) that still covers the processor's output size. When the image processor is a plain
"resize to a fixed (H, W), rescale, normalise" (``SiglipImageProcessorPil`` and the like; the rule, read from the
processor's class and settings, is in :mod:`hf_siglip.data.image_preprocessing`), ``pixel_values`` come from
:class:`~hf_siglip.data.image_preprocessing.FixedSizeImagePreprocessing` instead of the processor: one resize per
image with the processor's filter, one vectorised multiply-add for the batch. ``image_fast_path="torch"`` (the
default) resizes bilinear/bicubic with torch's antialiased ``uint8`` kernel, ~7x faster than Pillow's and within
2 of 255 levels of it; ``"pil"`` uses Pillow's resize and matches the processor to float rounding; None always calls
the processor. Any other processor (CLIP's shortest-edge resize + centre crop, Siglip2's NaFlex
patches, torchvision-backend processors) is always called as it is. Both shortcuts are for training only:
:meth:`SiglipDataCollator.for_evaluation` (what ``SiglipTrainer`` evaluates with) decodes in full and calls the
processor, so evaluation sees the pixels the saved processor makes.

Normalising on the device: a float32 batch costs 4x the bytes of its ``uint8`` pixels, and handing it from a
DataLoader worker costs the worker a page fault per 4 KB of shared memory (~0.4 ms per 224 px image, more than the
resize). With ``normalize_on_device=True`` the fast path stops at the ``uint8`` batch and the consumer calls
:func:`normalize_pixel_values` on the batch once it is on the device (``SiglipTrainer`` does, in
``_prepare_inputs``, as timm's ``PrefetchLoader`` does): the same float32 values as the collator's own
normalisation, bit for bit. ``SiglipTrainer`` switches it on when the option is left at None (the default; None
and False give float ``pixel_values``, so a collator used on its own, or with a plain ``transformers.Trainer``,
gives what the model takes). Batches from the processor (any processor the fast path does not reproduce, and
evaluation batches) stay float, and :func:`normalize_pixel_values` leaves them as they are.

Use with ``transformers.Trainer``: set ``remove_unused_columns=False`` (the image/caption columns are
not arguments of the model's ``forward``). ``set_epoch`` changes this object; ``DataLoader`` workers
hold copies made when they start, so call it before each epoch's iterator is created (the default,
non-persistent workers are re-created every epoch). ``stats`` counts only what this process's copy saw.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .captions import CaptionSampler
from .image_preprocessing import RESIZE_BACKENDS, FixedSizeImagePreprocessing, normalize_uint8, unsupported_reason
from .images import ImageDecodeError, decode_image
from .text import normalize_captions

logger = logging.getLogger(__name__)

# beside uint8 pixel_values (normalize_on_device): (B, 2, 3) float32, each image's per-channel scale and offset
PIXEL_NORMALIZATION = "pixel_normalization"
_PROCESS_SHIFT = 48
_WORKER_SHIFT = 40


def _process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _worker_index() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


@dataclass
class SiglipDataCollator:
    """Collate image-text rows for the SigLIP sigmoid loss (see module docstring for the contract).

    Args:
        processor: a processor with ``.image_processor`` and ``.tokenizer`` (e.g. ``SiglipProcessor``);
            or give ``tokenizer`` and ``image_processor`` directly.
        max_length: text length; texts are padded to it and truncated.
        image_column / caption_column: column names; the caption cell is a string or a list of strings.
        id_column: ``"auto"`` (``group_id`` else ``image_id`` else fallback), a column name, or None
            (always fallback ids).
        image_embeds_column: if a row has this column, its vector is emitted as ``image_embeds``
            instead of decoding the image.
        concept_targets_column: if a row has this column, its vectors are emitted as ``concept_targets``.
        caption_sampler: optional :class:`CaptionSampler`; if set, each row's texts are its k sampled
            captions for the current epoch (``set_epoch``) instead of the whole caption column.
        image_transform: optional training augmentation, called as ``image_transform(image, (height, width),
            row_id, epoch)`` (e.g. :class:`~hf_siglip.data.augmentation.ImageAugmentation`).
        image_fast_path: ``"torch"`` (default), ``"pil"`` or None: how ``pixel_values`` are made when the image
            processor is a plain fixed-size resize + rescale + normalise (see "Images" in the module docstring).
        normalize_on_device: True: the fast path's ``pixel_values`` are ``uint8`` with ``pixel_normalization``, for
            :func:`normalize_pixel_values` on the device; None (default; ``SiglipTrainer`` makes it True) or False:
            float ``pixel_values``.
        draft_decode: decode JPEGs at the smallest DCT scale that covers the output size (True, for training
            speed) or in full (False: the pixels the saved processor sees; :meth:`for_evaluation` turns it off).
        return_attention_mask: also emit ``attention_mask``.
        return_drop_counts: also emit ``dropped_rows`` (this batch's drop counts by reason).
        row_index_column: if a row has this column (its position in the dataset), also emit ``row_index`` (B,)
            and ``text_row_index`` (T,): ``SiglipTrainer.evaluate`` recognises by them the rows a distributed
            sampler repeats to even out the last batch, and counts each row once.
    """

    processor: Any = None
    tokenizer: Any = None
    image_processor: Any = None
    max_length: int = 64
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: Optional[str] = "auto"
    image_embeds_column: str = "image_embeds"
    concept_targets_column: str = "concept_targets"
    caption_sampler: Optional[CaptionSampler] = None
    image_transform: Optional[Any] = None
    image_fast_path: Optional[str] = "torch"
    normalize_on_device: Optional[bool] = None
    draft_decode: bool = True
    return_attention_mask: bool = False
    return_drop_counts: bool = False
    row_index_column: Optional[str] = None
    epoch: int = 0
    stats: Counter = field(default_factory=Counter, init=False)
    _fallback_counter: int = field(default=0, init=False, repr=False)
    _fast_path_reason_logged: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.processor is not None:
            self.tokenizer = self.tokenizer or self.processor.tokenizer
            self.image_processor = self.image_processor or self.processor.image_processor
        if self.tokenizer is None:
            raise ValueError("SiglipDataCollator needs a tokenizer (or a processor with .tokenizer)")
        if self.image_fast_path is not None and self.image_fast_path not in RESIZE_BACKENDS:
            raise ValueError(f"image_fast_path is one of {RESIZE_BACKENDS} or None, got {self.image_fast_path!r}")

    def for_evaluation(self) -> "SiglipDataCollator":
        """A copy for evaluation: every caption of a row, no augmentation (deterministic batches), and the images
        exactly as the saved processor makes them (full decoding, the processor itself: no draft JPEG decoding, no
        fast resize), so the trainer's evaluation equals `hf-siglip eval`'s and any evaluator's on the same weights."""
        return dataclasses.replace(self, caption_sampler=None, image_transform=None, image_fast_path=None,
                                   draft_decode=False, normalize_on_device=False)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used by ``caption_sampler`` (fresh, reproducible captions each epoch)."""
        self.epoch = int(epoch)

    def _row_id(self, row: dict) -> int:
        column = self.id_column
        if column == "auto":
            column = "group_id" if "group_id" in row else ("image_id" if "image_id" in row else None)
        if column is not None:
            if column not in row:
                raise KeyError(f"id column {column!r} not in row columns {sorted(row)}")
            return int(row[column])
        self._fallback_counter += 1
        return (_process_index() << _PROCESS_SHIFT) | (_worker_index() << _WORKER_SHIFT) | self._fallback_counter

    def _row_captions(self, row: dict, row_id: int) -> tuple[list[str], int]:
        """The row's texts and how many of its captions were unusable (None / empty)."""
        if self.caption_sampler is not None:
            columns = self.caption_sampler.weights
            for column in columns:
                if column not in row:
                    raise KeyError(f"caption column {column!r} not in row columns {sorted(row)} (row id {row_id})")
            sampled = self.caption_sampler.sample({c: [row[c]] for c in columns}, [row_id], self.epoch)[0]
            # count what was unusable, as in the plain path
            return sampled, sum(normalize_captions(row[column], row_id)[1] for column in columns)
        if self.caption_column not in row:
            raise KeyError(f"caption column {self.caption_column!r} not in row columns {sorted(row)} (row id {row_id})")
        captions, dropped = normalize_captions(row[self.caption_column], row=row_id)
        return captions, dropped

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        use_embeds = bool(rows) and self.image_embeds_column in rows[0]
        use_targets = bool(rows) and self.concept_targets_column in rows[0]
        images, embeds, image_ids, texts, text_ids, targets = [], [], [], [], [], []
        use_row_index = bool(rows) and self.row_index_column is not None and self.row_index_column in rows[0]
        row_indices, text_row_indices = [], []
        dropped = Counter()
        for row in rows:
            row_id = self._row_id(row)
            captions, unusable = self._row_captions(row, row_id)
            if unusable:
                dropped["empty_captions_dropped"] += unusable
            if not captions:
                dropped["rows_without_caption"] += 1
                continue
            if use_targets and row[self.concept_targets_column] is None:  # before decoding: no work for a lost row
                dropped["rows_without_concept_targets"] += 1
                continue
            if use_embeds:
                if row[self.image_embeds_column] is None:  # cached tower could not decode this image
                    dropped["rows_with_undecodable_image"] += 1
                    continue
                embeds.append(np.asarray(row[self.image_embeds_column], dtype=np.float32))
            else:
                if self.image_column not in row:
                    raise KeyError(f"image column {self.image_column!r} not in row columns {sorted(row)} "
                                   f"(row id {row_id})")
                try:
                    image = decode_image(row[self.image_column], min_size=self._decode_size())
                except ImageDecodeError as error:
                    dropped["rows_with_undecodable_image"] += 1
                    logger.warning("dropping row id %d: image does not decode (%s)", row_id, error)
                    continue
                if self.image_transform is not None:
                    image = self.image_transform(image, self._image_size(), row_id, self.epoch)
                images.append(image)
            if use_targets:
                targets.append(np.asarray(row[self.concept_targets_column], dtype=np.float32))
            image_ids.append(row_id)
            if use_row_index:
                row_indices.append(int(row[self.row_index_column]))
                text_row_indices.extend([row_indices[-1]] * len(captions))
            texts.extend(captions)
            text_ids.extend([row_id] * len(captions))
        if dropped:
            self.stats.update(dropped)
            logger.warning("SiglipDataCollator dropped %s in this batch of %d rows; totals so far: %s",
                           dict(dropped), len(rows), dict(self.stats))
        self.stats["rows_collated"] += len(image_ids)
        self.stats["texts_collated"] += len(texts)

        # The drop counts ride with the batch: DataLoader workers hold copies of this collator, so its
        # `stats` miss what they saw; the trainer sums these into its data report.
        batch: dict[str, Any] = {"dropped_rows": dict(dropped)} if self.return_drop_counts else {}
        if use_embeds:
            batch["image_embeds"] = torch.from_numpy(np.stack(embeds)) if embeds else torch.zeros(0, 0)
        else:
            batch.update(self._image_inputs(images))
        if use_targets:
            batch["concept_targets"] = torch.from_numpy(np.stack(targets)) if targets else torch.zeros(0, 0)
        batch.update(self._tokenize(texts))
        batch["image_ids"] = torch.tensor(image_ids, dtype=torch.long)
        batch["text_ids"] = torch.tensor(text_ids, dtype=torch.long)
        if use_row_index:
            batch["row_index"] = torch.tensor(row_indices, dtype=torch.long)
            batch["text_row_index"] = torch.tensor(text_row_indices, dtype=torch.long)
        return batch

    def _decode_size(self) -> tuple[int, int] | None:
        """Smallest decoded size that loses nothing: the processor's output size, or none when a crop augmentation
        may zoom in (it then needs the pixels of the crop at full size); none when draft decoding is off."""
        if not self.draft_decode or not all(self._image_size()):
            return None  # no fixed output size (NaFlex keeps each image's own shape): decode in full
        if self.image_transform is not None:
            scale = getattr(self.image_transform, "crop_scale", (1.0, 1.0))[0]
            height, width = self._image_size()
            return int(height / scale ** 0.5) + 1, int(width / scale ** 0.5) + 1  # the smallest crop still covers it
        return self._image_size()

    def _image_size(self) -> tuple[int, int]:
        """(height, width) the image processor produces."""
        size = getattr(self.image_processor, "size", None) or {}
        return size.get("height", size.get("shortest_edge", 0)), size.get("width", size.get("shortest_edge", 0))

    def _pixel_values(self, images: list) -> dict[str, torch.Tensor]:
        fast = self._fast_image_preprocessing()
        if fast is not None and self.normalize_on_device:
            # uint8 pixels and each image's scale and offset (per image: a batch split or concatenated along its
            # first dimension keeps them), normalised on the device by normalize_pixel_values
            scale_offset = torch.from_numpy(np.stack([fast.scale.reshape(3), fast.offset.reshape(3)]))
            return {"pixel_values": fast.uint8_batch([fast.resize(image) for image in images]),
                    PIXEL_NORMALIZATION: scale_offset.expand(len(images), 2, 3).contiguous()}
        if not images:
            return {"pixel_values": torch.zeros(0, 3, *self._image_size())}
        if fast is not None:
            return {"pixel_values": fast(images)}
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()}

    def _fast_image_preprocessing(self) -> FixedSizeImagePreprocessing | None:
        """The processor's fast equivalent, or None (fast path off, or a processor it does not reproduce). Read
        from the processor at every batch, so changing its settings takes effect at once (the check is ~10 us)."""
        if self.image_fast_path is None:
            return None
        fast = FixedSizeImagePreprocessing.from_image_processor(self.image_processor, resize=self.image_fast_path)
        if fast is None and not self._fast_path_reason_logged:
            self._fast_path_reason_logged = True
            logger.info("image fast path off, calling the image processor: %s",
                        unsupported_reason(self.image_processor))
        return fast

    def _image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """`pixel_values` and whatever else the image processor makes for the model beside them (Siglip2's NaFlex
        patches come with `pixel_attention_mask` and `spatial_shapes`)."""
        if list(getattr(self.image_processor, "model_input_names", ["pixel_values"])) == ["pixel_values"]:
            return self._pixel_values(images)
        from PIL import Image

        # an empty batch gets every input with no rows: those of one blank image, cut to none
        outputs = self.image_processor(images=images or [Image.new("RGB", (32, 32))], return_tensors="pt")
        outputs = {name: value if images else value[:0] for name, value in outputs.items()}
        return {**outputs, "pixel_values": outputs["pixel_values"].float()}

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            out = {"input_ids": torch.zeros(0, self.max_length, dtype=torch.long)}
            if self.return_attention_mask:
                out["attention_mask"] = torch.zeros(0, self.max_length, dtype=torch.long)
            return out
        # plain lists then one numpy conversion: transformers' return_tensors="pt"/"np" conversion walks
        # every token in Python and took 3x longer than tokenizing itself
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_attention_mask=self.return_attention_mask)
        out = {"input_ids": torch.from_numpy(np.asarray(encoded["input_ids"], dtype=np.int64))}
        if self.return_attention_mask:
            out["attention_mask"] = torch.from_numpy(np.asarray(encoded["attention_mask"], dtype=np.int64))
        return out


def normalize_pixel_values(batch: dict[str, Any], dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Turn a ``normalize_on_device`` batch's ``uint8`` ``pixel_values`` into float pixel values where they are (call
    it once the batch is on the device): ``pixel_values * scale + offset`` per channel in float32, bit for bit the
    values the collator makes without the option, then cast to ``dtype`` (the model's; a float32 model gets them as
    they are). Removes ``pixel_normalization`` from ``batch``; a batch without it (float pixel values, cached
    ``image_embeds``) is returned as it is, so calling it twice is harmless."""
    normalization = batch.pop(PIXEL_NORMALIZATION, None)
    pixels = batch.get("pixel_values")
    if normalization is not None and pixels is not None and pixels.dtype == torch.uint8:
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        batch["pixel_values"] = normalize_uint8(pixels, normalization[:, 0], normalization[:, 1], dtype)
    return batch


def collator_epoch_callback(collator: SiglipDataCollator):
    """A ``transformers.TrainerCallback`` that calls ``collator.set_epoch`` at each epoch start.

    ``Trainer`` fires ``on_epoch_begin`` before it iterates that epoch's DataLoader, so non-persistent
    workers (the default) copy the collator with the new epoch. With ``dataloader_persistent_workers``
    the workers keep the epoch they started with: sample captions with ``add_sampled_captions`` instead.
    """
    from transformers import TrainerCallback

    class CollatorEpochCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            collator.set_epoch(int(state.epoch or 0))

    return CollatorEpochCallback()
