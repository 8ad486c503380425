"""Data side of hf_siglip: loading, caption augmentation, filters, positive groups, label noise,
the collator and the embedded demo dataset. Each module's docstring states its bad-input policies.

Flow: ``load_image_text_dataset`` -> ``canonical_columns`` / ``add_image_ids`` -> the data steps of a recipe
(:mod:`hf_siglip.data.steps`: pseudo-captions, CAT, CapFilt, positive groups, label noise, the SigLiT embedding
cache; caption sampling and image augmentation configure the collator) -> ``SiglipDataCollator`` -> model and loss.
Each step's functional core is here too (``add_pseudo_captions``, ``cat_filter``, ``corrupt_labels``...).
"""

from .augmentation import ImageAugmentation
from .captions import CaptionSampler, add_sampled_captions
from .collator import SiglipDataCollator, collator_epoch_callback
from .concept_targets import add_concept_targets, load_concept_teacher
from .demo import (
                   DEMO_CLASSES,
                   DEMO_TEMPLATES,
                   DIGITS_CLASSES,
                   DIGITS_TEMPLATES,
                   demo_vocabulary,
                   make_demo_dataset,
                   make_digits_dataset,
)
from .embedding import add_image_embeddings, embed_images, embed_texts
from .filters import capfilt, caption_complexity_and_action, cat_filter, load_spacy, ocr_words
from .groups import UnionFind, assign_positive_groups, group_size_stats, nearest_neighbours
from .images import ImageDecodeError, decode_image, to_rgb
from .loading import add_image_ids, canonical_columns, check_columns, load_image_text_dataset
from .noise import corrupt_labels
from .pseudo_captions import add_pseudo_captions, load_captioner
from .text import normalize_captions

__all__ = [
    "CaptionSampler",
    "DEMO_CLASSES",
    "DEMO_TEMPLATES",
    "DIGITS_CLASSES",
    "DIGITS_TEMPLATES",
    "ImageAugmentation",
    "ImageDecodeError",
    "SiglipDataCollator",
    "UnionFind",
    "add_concept_targets",
    "add_image_embeddings",
    "add_image_ids",
    "add_pseudo_captions",
    "add_sampled_captions",
    "assign_positive_groups",
    "capfilt",
    "canonical_columns",
    "caption_complexity_and_action",
    "cat_filter",
    "check_columns",
    "collator_epoch_callback",
    "corrupt_labels",
    "decode_image",
    "demo_vocabulary",
    "embed_images",
    "embed_texts",
    "group_size_stats",
    "load_captioner",
    "load_concept_teacher",
    "load_image_text_dataset",
    "load_spacy",
    "make_demo_dataset",
    "make_digits_dataset",
    "nearest_neighbours",
    "normalize_captions",
    "ocr_words",
    "to_rgb",
]
