"""Step ``capfilt``: BLIP's CapFilt with a SigLIP-like model as the filter.

The candidates are the usable captions of ``caption`` and ``pseudo_captions`` (when present, e.g. after the
``pseudo_captions`` step); the kept ones become the row's ``caption`` (the judged pseudo-caption column is
consumed) and rows left with none are dropped. ``model: null`` filters with the model being trained (useful when
fine-tuning a pretrained one); BLIP filters with a separately fine-tuned model: give its path.
"""

from dataclasses import dataclass

from ..filters import capfilt
from . import register_data_step


@dataclass
class CapFiltConfig:
    model: str | None = None
    caption_columns: list[str] | None = None  # default: caption, plus pseudo_captions when present
    threshold: float | None = None  # keep captions with cosine >= threshold; None: keep the best top_k
    top_k: int = 1
    min_keep: int = 1
    batch_size: int = 64

    def __post_init__(self):
        if self.top_k < 1 or self.min_keep < 0:
            raise ValueError(f"top_k must be >= 1 and min_keep >= 0, got {self.top_k}, {self.min_keep}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")


@register_data_step("capfilt", CapFiltConfig, reads_images=True)
def apply(dataset, config: CapFiltConfig, context):
    def compute(data):
        names = data.column_names or []
        columns = config.caption_columns or ["caption"] + [c for c in ("pseudo_captions",) if c in names]
        model, processor = context.model(data, config.model)
        data, counts = capfilt(data, model, processor, caption_columns=columns, threshold=config.threshold,
                               top_k=config.top_k, min_keep=config.min_keep, output_column="caption",
                               batch_size=config.batch_size, max_length=context.max_length, keep_scores=False)
        consumed = [c for c in columns if c != "caption" and c in (data.column_names or [])]
        context.record("capfilt", counts)
        return data.remove_columns(consumed) if consumed else data

    return context.computed_once("capfilt", dataset, compute, ["caption"])  # the filter model runs once
