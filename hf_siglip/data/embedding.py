"""Batched, L2-normalised embeddings from any SigLIP-like model.

The model needs ``get_image_features(pixel_values=...)`` and ``get_text_features(input_ids=...)``
returning a tensor or an output with ``.pooler_output`` (transformers 5 ``SiglipModel``); the
processor needs ``.image_processor`` and ``.tokenizer``. Texts are padded to ``max_length`` as in
training. Used by positive-group mining (:mod:`hf_siglip.data.groups`) and CapFilt
(:mod:`hf_siglip.data.filters`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .images import decode_image


def _features(output) -> torch.Tensor:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def embed_images(model, processor, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """``(N, D)`` unit-norm image embeddings; ``images`` are anything :func:`decode_image` accepts
    (an undecodable image raises :class:`~hf_siglip.data.images.ImageDecodeError`)."""
    device, chunks = _device(model), []
    for start in range(0, len(images), batch_size):
        pil = [decode_image(image) for image in images[start:start + batch_size]]
        pixels = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(device)
        chunks.append(_features(model.get_image_features(pixel_values=pixels)).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


@torch.no_grad()
def embed_texts(model, processor, texts: Sequence[str], batch_size: int = 256, max_length: int = 64) -> torch.Tensor:
    """``(M, D)`` unit-norm text embeddings (padded to ``max_length``, truncated)."""
    device, chunks = _device(model), []
    for start in range(0, len(texts), batch_size):
        tokens = processor.tokenizer(list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                                     max_length=max_length, return_tensors="pt")
        chunks.append(_features(model.get_text_features(input_ids=tokens["input_ids"].to(device))).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
