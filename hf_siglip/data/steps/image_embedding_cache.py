"""Step ``image_embedding_cache``: SigLiT (SigLIP sections 4.1, 4.4). The locked image tower of the model being
trained embeds every image once; rows then carry ``image_embeds`` (the image column is dropped) and the collator
passes the vectors instead of pixels. Needs ``lock_vision_tower``; a row whose image does not decode is dropped
later by the collator, counted (``undecodable_images`` here)."""

from dataclasses import dataclass

import datasets

from ..embedding import add_image_embeddings
from . import register_data_step


@dataclass
class ImageEmbeddingCacheConfig:
    batch_size: int = 64


@register_data_step("image_embedding_cache", ImageEmbeddingCacheConfig, reads_images=True)
def apply(dataset, config: ImageEmbeddingCacheConfig, context):
    def compute(data):
        model, processor = context.model(data, None)
        data = add_image_embeddings(data, model, processor, batch_size=config.batch_size)
        counts = context.record("image_embedding_cache", {})
        if isinstance(data, datasets.Dataset):
            # Arrow's null count: no pass over the vectors in Python
            counts["undecodable_images"] = data.data.column("image_embeds").null_count
        return data.remove_columns("image")

    return context.computed_once("image_embedding_cache", dataset, compute, ["image_embeds"])  # the tower runs once
