"""Data side of hf_siglip: loading, caption augmentation, filters, positive groups, label noise,
the collator and the embedded demo dataset. Each module's docstring states its bad-input policies."""

from .captions import CaptionSampler, add_sampled_captions
from .collator import SiglipDataCollator
from .embedding import embed_images, embed_texts
from .filters import capfilt, cat_filter, caption_complexity_and_action, load_spacy, ocr_words
from .groups import assign_positive_groups, group_size_stats, nearest_neighbours
from .demo import DEMO_CLASSES, DEMO_TEMPLATES, make_demo_dataset
from .images import ImageDecodeError, decode_image, to_rgb
from .loading import add_image_ids, check_columns, load_image_text_dataset
from .noise import corrupt_labels
from .pseudo_captions import add_pseudo_captions, load_captioner
from .text import normalize_captions

__all__ = [
    "CaptionSampler",
    "DEMO_CLASSES",
    "DEMO_TEMPLATES",
    "ImageDecodeError",
    "SiglipDataCollator",
    "add_image_ids",
    "add_pseudo_captions",
    "assign_positive_groups",
    "embed_images",
    "embed_texts",
    "group_size_stats",
    "nearest_neighbours",
    "add_sampled_captions",
    "capfilt",
    "caption_complexity_and_action",
    "cat_filter",
    "check_columns",
    "corrupt_labels",
    "decode_image",
    "load_captioner",
    "load_image_text_dataset",
    "make_demo_dataset",
    "load_spacy",
    "normalize_captions",
    "ocr_words",
    "to_rgb",
]
