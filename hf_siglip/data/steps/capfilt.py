"""Step ``capfilt``: BLIP's CapFilt with a SigLIP-like model as the filter.

The candidates are the usable captions of ``caption`` and ``pseudo_captions`` (when present, e.g. after the
``pseudo_captions`` step); the kept ones become the row's ``caption`` (the judged pseudo-caption column is
consumed) and rows left with none are dropped.

``filter: cosine`` (default) scores each caption by the image-text cosine of a dual encoder: ``model: null`` filters
with the model being trained (useful when fine-tuning a pretrained one), or give a checkpoint's path. ``filter: itm``
scores it by the match probability of an ITM head trained by this package (``model:`` a folder `hf-siglip train`
wrote with the itm objective on: its ``fusion_encoder/``), as BLIP filters with its own ITM head; BLIP's rule keeps
a caption the head calls a match, ``threshold: 0.5``. Its captions are read at the length that model was trained
with. Counts (captions judged, kept, rows dropped) reach the run's log and model card.
"""

import os
from dataclasses import dataclass

from ..filters import capfilt
from . import register_data_step

FILTERS = ("cosine", "itm")


@dataclass
class CapFiltConfig:
    model: str | None = None
    filter: str = "cosine"  # cosine: a dual encoder's cosine; itm: a trained ITM head's match probability
    caption_columns: list[str] | None = None  # default: caption, plus pseudo_captions when present
    threshold: float | None = None  # keep captions scoring >= threshold; None: keep the best top_k
    top_k: int = 1
    min_keep: int = 1
    batch_size: int = 64

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter!r}")
        if self.top_k < 1 or self.min_keep < 0:
            raise ValueError(f"top_k must be >= 1 and min_keep >= 0, got {self.top_k}, {self.min_keep}")
        if self.filter == "itm":
            if not self.model:
                raise ValueError("filter: itm needs model: a folder trained with the itm objective (its "
                                 "fusion_encoder/ holds the ITM head)")
            from ...objectives.fusion import FOLDER, ITM_HEAD_FILE

            if os.path.isdir(self.model) and not os.path.isfile(os.path.join(self.model, FOLDER, ITM_HEAD_FILE)):
                raise ValueError(f"filter: itm: {self.model} has no {FOLDER}/{ITM_HEAD_FILE} (it was not trained "
                                 "with the itm objective)")
            if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold is an ITM match probability in [0, 1], got {self.threshold}")
        elif self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")


@register_data_step("capfilt", CapFiltConfig, reads_images=True)
def apply(dataset, config: CapFiltConfig, context):
    def compute(data):
        names = data.column_names or []
        columns = config.caption_columns or ["caption"] + [c for c in ("pseudo_captions",) if c in names]
        if config.filter == "itm":
            from ...itm_scoring import ItmPairScorer

            model = processor = None
            itm = ItmPairScorer(config.model, batch_size=config.batch_size)
        else:
            (model, processor), itm = context.model(data, config.model), None
        data, counts = capfilt(data, model, processor, caption_columns=columns, threshold=config.threshold,
                               top_k=config.top_k, min_keep=config.min_keep, output_column="caption",
                               batch_size=config.batch_size, max_length=context.max_length, keep_scores=False, itm=itm)
        consumed = [c for c in columns if c != "caption" and c in (data.column_names or [])]
        context.record("capfilt", counts)
        return data.remove_columns(consumed) if consumed else data

    return context.computed_once("capfilt", dataset, compute, ["caption"])  # the filter model runs once
