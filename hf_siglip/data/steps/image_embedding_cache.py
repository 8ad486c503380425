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


@register_data_step("image_embedding_cache", ImageEmbeddingCacheConfig)
def apply(dataset, config: ImageEmbeddingCacheConfig, context):
    model, processor = context.model(dataset, None)
    with context.main_process_first(desc="caching image embeddings"):
        dataset = add_image_embeddings(dataset, model, processor, batch_size=config.batch_size)
    counts = context.record("image_embedding_cache", {})
    if isinstance(dataset, datasets.Dataset):
        # Arrow's null count: no pass over the vectors in Python
        counts["undecodable_images"] = dataset.data.column("image_embeds").null_count
    return dataset.remove_columns("image")
