"""Concept targets for DiHT's concept distillation (arXiv 2301.02280, section 3): a frozen teacher's outputs per
image, computed once before training (see :mod:`hf_siglip.objectives.concept_distillation` for the head and loss).

The teacher is any ``AutoModelForImageClassification`` checkpoint (targets: its class logits) or image-feature model
(targets: ``get_image_features`` where the model has it, CLIP / SigLIP; else the ``pooler_output`` of ``AutoModel``,
ViT / DINOv2). Images go through the checkpoint's own image processor (Pillow backend: no torchvision needed). The
vectors land in a fixed-length float column ``concept_targets``; a row whose image does not decode gets ``None``,
which the collator drops and counts.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .embedding import add_image_embeddings, embed_images

OUTPUTS = ("auto", "logits", "features")


class ConceptTeacher:
    """A frozen image model as :func:`embed_images` sees it: ``get_image_features`` gives its concept targets."""

    def __init__(self, model, output: str):
        self.model, self.output = model.eval().requires_grad_(False), output
        self.parameters = model.parameters

    @torch.no_grad()
    def get_image_features(self, **inputs) -> torch.Tensor:
        if self.output == "logits":
            return self.model(**inputs).logits
        if hasattr(self.model, "get_image_features"):
            return self.model.get_image_features(**inputs)
        pooled = self.model(**inputs).pooler_output
        if pooled is None:
            raise ValueError(f"{type(self.model).__name__} gives no pooler_output to use as image features")
        return pooled


def load_concept_teacher(path: str, output: str = "auto", device: str | None = None):
    """``(ConceptTeacher, processor)`` for the checkpoint at ``path`` (a local folder or a Hub id).

    ``output="auto"`` takes the logits of a checkpoint saved as an image classifier (its ``architectures`` name a
    ``...ForImageClassification``) and the features of any other. Weights the checkpoint lacks would make the targets
    random, so they raise (e.g. ``features`` of a ViT classifier, whose pooler was never trained).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "auto":
        architectures = AutoConfig.from_pretrained(path).architectures or []
        output = "logits" if any(name.endswith("ForImageClassification") for name in architectures) else "features"
    model_class = AutoModelForImageClassification if output == "logits" else AutoModel
    model, loading = model_class.from_pretrained(path, output_loading_info=True)
    if loading["missing_keys"]:
        raise ValueError(f"teacher {path}: {model_class.__name__} would initialise {sorted(loading['missing_keys'])} "
                         f"at random, so its {output} would mean nothing (a classifier's logits: output 'logits')")
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        model = model.to(device)
    processor = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"))
    return ConceptTeacher(model, output), processor


def add_concept_targets(dataset, teacher: ConceptTeacher, processor, batch_size: int = 64,
                        column: str = "concept_targets", image_column: str = "image"):
    """``dataset`` with ``column``: the teacher's logits or features for each row's image (``None`` where the image
    does not decode). Works on a ``Dataset`` and a stream; only the image column is read."""
    from PIL import Image

    length = embed_images(teacher, processor, [Image.new("RGB", (32, 32))], normalize=False).shape[-1]  # one probe
    return add_image_embeddings(dataset, teacher, processor, column=column, image_column=image_column,
                                normalize=False, batch_size=batch_size, length=length)


__all__ = ["ConceptTeacher", "add_concept_targets", "load_concept_teacher"]
