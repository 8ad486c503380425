"""Batched, L2-normalised embeddings from any SigLIP-like model.

The model needs ``get_image_features(pixel_values=...)`` and ``get_text_features(input_ids=...)``
returning a tensor or an output with ``.pooler_output`` (transformers 5 ``SiglipModel``, ``Siglip2Model``,
``CLIPModel``); the processor needs ``.image_processor`` and ``.tokenizer``. Everything the image processor
returns goes to ``get_image_features`` (NaFlex: ``pixel_attention_mask`` and ``spatial_shapes`` too). Texts
are padded to ``max_length`` as in training. Used by positive-group mining (:mod:`hf_siglip.data.groups`)
and CapFilt (:mod:`hf_siglip.data.filters`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .images import decode_image


def _features(output, normalize: bool = True) -> torch.Tensor:
    tensor = (output if isinstance(output, torch.Tensor) else output.pooler_output).float()
    return torch.nn.functional.normalize(tensor, dim=-1) if normalize else tensor


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def embed_images(model, processor, images: Sequence, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
    """``(N, D)`` image embeddings (unit-norm unless ``normalize=False``); ``images`` are anything
    :func:`decode_image` accepts (an undecodable image raises :class:`~hf_siglip.data.images.ImageDecodeError`)."""
    device, chunks = _device(model), []
    for start in range(0, len(images), batch_size):
        pil = [decode_image(image) for image in images[start:start + batch_size]]
        inputs = processor.image_processor(images=pil, return_tensors="pt")
        inputs = {name: value.to(device) for name, value in inputs.items()}
        chunks.append(_features(model.get_image_features(**inputs), normalize).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def text_uses_attention_mask(model) -> bool:
    """Whether `model`'s text tower takes the attention mask: BERT-like towers (`VisionTextDualEncoder`, also as the
    plain transformers class) attend to every position they are given. SigLIP's towers get none: they were trained
    on fixed-length padded texts and pool the last position, which a mask would change; CLIP's causal tower pools
    before the padding."""
    from transformers import VisionTextDualEncoderModel

    return bool(getattr(model, "text_uses_attention_mask", isinstance(model, VisionTextDualEncoderModel)))


@torch.no_grad()
def embed_texts(model, processor, texts: Sequence[str], batch_size: int = 256, max_length: int = 64) -> torch.Tensor:
    """``(M, D)`` unit-norm text embeddings (padded to ``max_length``, truncated; with the attention mask for a
    tower that takes one: `text_uses_attention_mask`)."""
    device, chunks, masked = _device(model), [], text_uses_attention_mask(model)
    for start in range(0, len(texts), batch_size):
        tokens = processor.tokenizer(list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                                     max_length=max_length, return_tensors="pt", return_attention_mask=masked)
        names = ("input_ids", "attention_mask") if masked else ("input_ids",)
        chunks.append(_features(model.get_text_features(**{name: tokens[name].to(device) for name in names})).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


class _LockedImageTower:
    """`model` as the SigLiT cache sees it: `get_image_features` gives what a locked vision tower fixes, which leaves
    out a head that still trains (`get_locked_image_features`: SiglipBottleneckModel's `visual_projection`)."""

    def __init__(self, model):
        self.get_image_features = getattr(model, "get_locked_image_features", model.get_image_features)
        self.parameters = model.parameters


def add_image_embeddings(dataset, model, processor, column: str = "image_embeds", image_column: str = "image",
                         normalize: bool = False, batch_size: int = 64, length: int = -1):
    """Cache a locked image tower's output (SigLiT): add ``column`` with one float vector per row.

    The collator then emits ``image_embeds`` instead of ``pixel_values``. Raw tower outputs are stored
    by default (``normalize=False``) so the model applies its own head/normalisation as in training: for a model
    with ``get_locked_image_features`` the vectors come before its trainable head, so cached and uncached runs
    train the same parameters.
    A row whose image does not decode gets ``None`` (the collator drops it, counted). Only the image
    column is read; the vectors are joined column-wise (images are not copied). ``length`` > 0 declares the
    vectors' length in the column's feature (readable without a row, also for streams).
    """
    import datasets

    from ._maps import map_new_columns, with_encoded_images
    from .images import decode_decodable

    def embed_batch(images):
        decoded, rows = decode_decodable(images)
        vectors = [None] * len(images)
        if decoded:
            embeddings = embed_images(_LockedImageTower(model), processor, decoded, batch_size=batch_size,
                                      normalize=normalize)
            for row, vector in zip(rows, embeddings.numpy()):
                vectors[row] = vector.tolist()
        return {column: vectors}

    return with_encoded_images(dataset, image_column, lambda reader: map_new_columns(
        reader, embed_batch, [image_column], [column], batch_size=batch_size, desc="image embeddings",
        features=datasets.Features({column: datasets.List(datasets.Value("float32"), length=length)})))
