"""Step ``cat_filter``: DiHT's CAT filter (caption Complexity, Action, Text-spotting), section 3.1.

Keeps the captions that pass every enabled criterion in ``caption`` and drops rows left with none; the counts
say how many captions and rows each criterion removed (see :func:`hf_siglip.data.filters.cat_filter`).
"""

from dataclasses import dataclass

from ..filters import cat_filter
from . import register_data_step


@dataclass
class CatFilterConfig:
    min_complexity: int | None = 2  # DiHT's CAT-2; None switches the criterion off
    require_action: bool = True
    text_spotting: bool = True
    min_ocr_word_length: int = 3
    spacy_model: str | None = None
    batch_size: int = 256

    def __post_init__(self):
        if self.min_complexity is not None and self.min_complexity < 0:
            raise ValueError(f"min_complexity must be >= 0 or null, got {self.min_complexity}")


@register_data_step("cat_filter", CatFilterConfig, reads_images=True)
def apply(dataset, config: CatFilterConfig, context):
    def compute(data):
        data, counts = cat_filter(data, min_complexity=config.min_complexity,
                                  require_action=config.require_action, text_spotting=config.text_spotting,
                                  min_ocr_word_length=config.min_ocr_word_length, spacy_model=config.spacy_model,
                                  batch_size=config.batch_size, keep_scores=False)
        context.record("cat_filter", counts)
        return data

    return context.computed_once("cat_filter", dataset, compute, ["caption"])  # spaCy and OCR run once
