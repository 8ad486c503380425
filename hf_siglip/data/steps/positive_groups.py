"""Step ``positive_groups``: rows whose images or captions are near-duplicates share a ``group_id`` (the
collator's positive id), found over the whole dataset with a SigLIP-like model (see
:mod:`hf_siglip.data.groups`). ``model: null`` uses the model being trained: only meaningful for a pretrained
one (from a random init every cosine is ~1)."""

from dataclasses import dataclass

from ..groups import assign_positive_groups
from . import register_data_step


@dataclass
class PositiveGroupsConfig:
    model: str | None = None
    image_threshold: float | None = 0.95
    text_threshold: float | None = 0.95
    image_text_threshold: float | None = None
    k: int = 10
    backend: str = "auto"
    batch_size: int = 64

    def __post_init__(self):
        for name in ("image_threshold", "text_threshold", "image_text_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1] (or null), got {value}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, got {self.backend!r}")


@register_data_step("positive_groups", PositiveGroupsConfig, reads_images=True)
def apply(dataset, config: PositiveGroupsConfig, context):
    def compute(data):
        model, processor = context.model(data, config.model)
        data, stats = assign_positive_groups(
            data, model, processor, image_threshold=config.image_threshold, text_threshold=config.text_threshold,
            image_text_threshold=config.image_text_threshold, k=config.k, backend=config.backend,
            batch_size=config.batch_size, max_length=context.max_length)
        context.record("positive_groups", {key: value for key, value in stats.items() if not isinstance(value, dict)})
        return data

    # the group ids are the loss's positives: found once, by the main process, and read by the others
    return context.computed_once("positive_groups", dataset, compute, ["image_id", "group_id"])
