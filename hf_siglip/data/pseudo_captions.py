"""Pseudo-captions (FFF batch text augmentation, BLIP's CapFilt): sample captions with a transformers captioner.

:func:`add_pseudo_captions` runs an image-to-text model (BLIP, BLIP-2, GIT, ...: anything whose
``generate(**processor(images=...))`` returns token ids), or a captioner trained by this package (the captioning
objective's ``captioner/`` folder, loaded as :class:`hf_siglip.captioner.TrainedCaptioner`, which generates exactly
as ``hf-siglip caption`` does: BLIP's bootstrapping, where the model's own captioner writes the synthetic captions),
on batches of images, sampling ``num_captions`` captions per image (nucleus sampling, ``top_p=0.9``, as BLIP) into a
list column. Batches run on the model's device -- by
default CUDA when available (the model is moved there). Sampling is seeded per batch from
``(seed, first row index)``, so a given row gets the same captions on a rerun with the same batching.

Resuming over a large dataset: with ``output_dir``, a ``Dataset`` is processed in ``num_shards``
contiguous shards, each saved with ``save_to_disk`` as it finishes; a rerun loads the finished shards
and computes only the missing ones (progress bar over shards, plus ``datasets``' per-shard map bar).
Without ``output_dir`` the usual ``datasets`` cache applies. Only the image column is read and only
the new column written (images are not copied). One process writes ``output_dir``: on several, the
``pseudo_captions`` data step lets the main process caption and the others read its result.

Policies: an image that does not decode gets an empty caption list and a logged warning (counted in
the ``report`` returned alongside); generated captions that are empty after stripping are dropped. The report
counts ``rows``, the ``captions`` written and those two policies.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

import datasets
import torch

from ._maps import map_new_columns, with_encoded_images
from .images import ImageDecodeError, decode_image

logger = logging.getLogger(__name__)


def load_captioner(path: str, device: Optional[str] = None):
    """Load ``(model, processor)`` for an image-to-text checkpoint saved locally or on the hub; for a folder trained
    with the captioning objective (its ``captioner/``, or that folder itself) ``(TrainedCaptioner, None)``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..captioner import TrainedCaptioner, captioner_folder

    folder = captioner_folder(path, required=False)
    if folder is not None:
        captioner = TrainedCaptioner(folder)
        return (captioner.to(device) if device else captioner), None

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model.to(device) if device else model, AutoProcessor.from_pretrained(path)


def add_pseudo_captions(dataset, model, processor, num_captions: int = 3, output_column: str = "pseudo_captions",
                        image_column: str = "image", batch_size: int = 16, seed: int = 0,
                        generate_kwargs: Optional[dict] = None, prompt: Optional[str] = None,
                        device: Optional[str] = None, output_dir: Optional[str] = None, num_shards: int = 16):
    """Add ``output_column`` with ``num_captions`` sampled captions per image; return ``(dataset, report)``.

    Args:
        model / processor: a loaded captioner and its processor (see :func:`load_captioner`); a
            ``TrainedCaptioner`` needs no processor.
        generate_kwargs: overrides for ``generate`` (default: nucleus sampling, ``top_p=0.9``,
            ``max_new_tokens=30``; a ``TrainedCaptioner`` writes at most its training length by default).
        prompt: optional text prompt passed to the processor (BLIP-2 / conditional captioning).
        device: where to run; default CUDA if available, else the model's current device.
        output_dir / num_shards: resumable sharded processing for a ``Dataset`` (module docstring).
    """
    from ..captioner import TrainedCaptioner

    ours = isinstance(model, TrainedCaptioner)
    if ours and prompt:
        raise ValueError("prompt: a captioner trained by hf_siglip starts every caption from nothing, it takes none")
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        model = model.to(device)
    model_device = None if ours else next(model.parameters()).device
    # a trained captioner's decoder has positions for its training length only: its generation config says it
    generation = {"do_sample": True, "top_p": 0.9, **({} if ours else {"max_new_tokens": 30}),
                  **(generate_kwargs or {})}
    report = Counter()

    @torch.no_grad()
    def caption_batch(images, indices):
        pil, rows = [], []
        for row, image in enumerate(images):
            try:
                pil.append(decode_image(image))
                rows.append(row)
            except ImageDecodeError as error:
                report["undecodable_images"] += 1
                logger.warning("row %d: image does not decode (%s); no pseudo-captions", indices[row], error)
        captions = [[] for _ in images]
        if pil:
            torch.manual_seed(seed * 1_000_003 + int(indices[0]))
            if ours:  # the generation path of `hf-siglip caption`
                texts = model.generate(pil, batch_size=len(pil), num_return_sequences=num_captions, **generation)
            else:
                inputs = processor(images=pil, text=[prompt] * len(pil) if prompt else None, return_tensors="pt")
                inputs = {k: v.to(model_device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                generated = model.generate(**inputs, num_return_sequences=num_captions, **generation)
                texts = processor.batch_decode(generated, skip_special_tokens=True)
            for j, row in enumerate(rows):
                kept = []
                for text in texts[j * num_captions:(j + 1) * num_captions]:
                    text = " ".join(text.split())
                    if prompt and text.lower().startswith(prompt.lower()):  # echoed prompt
                        text = text[len(prompt):].strip()
                    if text:
                        kept.append(text)
                    else:
                        report["empty_generations"] += 1
                captions[row] = kept
                report["captions"] += len(kept)
        report["rows"] += len(images)
        return {output_column: captions}

    features = datasets.Features({output_column: datasets.List(datasets.Value("string"))})

    def caption_all(reader):
        if not isinstance(reader, datasets.Dataset):
            return map_new_columns(reader, caption_batch, [image_column], [output_column], batch_size=batch_size,
                                   with_indices=True, features=features)
        if output_dir is None:
            return map_new_columns(reader, caption_batch, [image_column], [output_column], batch_size=batch_size,
                                   with_indices=True, desc="pseudo-captions", features=features,
                                   load_from_cache_file=False)
        from tqdm.auto import tqdm

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        parts = []
        for shard in tqdm(range(num_shards), desc="pseudo-caption shards"):
            target = out / f"shard-{shard:05d}-of-{num_shards:05d}"
            if (target / "state.json").exists():
                parts.append(datasets.load_from_disk(str(target)))
                report["shards_resumed"] += 1
                continue
            part = reader.select_columns([image_column]).shard(num_shards, shard, contiguous=True)
            offset = sum(len(reader) // num_shards + (i < len(reader) % num_shards) for i in range(shard))
            computed = part.map(lambda images, indices: caption_batch(images, [offset + i for i in indices]),
                                input_columns=[image_column], batched=True, batch_size=batch_size,
                                with_indices=True, remove_columns=[image_column], features=features,
                                load_from_cache_file=False, desc=f"shard {shard}")
            tmp = out / (target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this shard
            computed.save_to_disk(str(tmp))
            tmp.rename(target)  # a shard counts as done only once fully written
            parts.append(datasets.load_from_disk(str(target)))
        base = reader.remove_columns([output_column]) if output_column in reader.column_names else reader
        return datasets.concatenate_datasets([base, datasets.concatenate_datasets(parts)], axis=1)

    return with_encoded_images(dataset, image_column, caption_all), report
