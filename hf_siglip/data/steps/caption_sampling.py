"""Step ``caption_sampling``: FFF's k captions per image, drawn afresh each epoch by the collator from the caption
columns (weighted per column; see :class:`hf_siglip.data.CaptionSampler`). A batch step: the dataset is unchanged."""

from dataclasses import dataclass

from ..captions import CaptionSampler
from . import register_data_step


@dataclass
class CaptionSamplingConfig:
    k: int = 1
    columns: list[str] | dict[str, float] | None = None  # default: caption, plus pseudo_captions when present

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")


@register_data_step("caption_sampling", CaptionSamplingConfig, kind="batch", hands_collator=("caption_sampler",))
def apply(dataset, config: CaptionSamplingConfig, context):
    names = dataset.column_names or []
    columns = config.columns or ["caption"] + [c for c in ("pseudo_captions",) if c in names]
    missing = [c for c in columns if names and c not in names]
    if missing:
        raise KeyError(f"caption_sampling: column(s) {missing} not in the dataset's columns {names}")
    context.collator_options["caption_sampler"] = CaptionSampler(columns=columns, k=config.k, seed=context.seed)
    context.record("caption_sampling", {"k": config.k})
    return dataset
