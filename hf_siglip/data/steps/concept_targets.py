"""Step ``concept_targets``: DiHT's concept distillation (section 3). A frozen teacher (an image classifier, or any
image-feature model) sees every image once; rows then carry its logits or features in ``concept_targets``, which the
trainer's head learns with ``concept_distillation_weight`` (see :mod:`hf_siglip.data.concept_targets`). Counted:
``undecodable_images`` (their rows get no targets; the collator drops them, counted again per batch). ``output``
records what the targets are, so ``concept_distillation_loss: auto`` picks kl (logits) or cosine (features)."""

from dataclasses import dataclass

import datasets

from ..concept_targets import OUTPUTS, add_concept_targets, load_concept_teacher
from . import register_data_step


@dataclass
class ConceptTargetsConfig:
    model: str = ""  # the teacher: an image classifier or image-feature checkpoint (path or Hub id)
    batch_size: int = 64
    output: str = "auto"  # "logits", "features", or "auto" (logits of a ...ForImageClassification checkpoint)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required: a teacher image model's checkpoint path or Hub id")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")


@register_data_step("concept_targets", ConceptTargetsConfig, reads_images=True)
def apply(dataset, config: ConceptTargetsConfig, context):
    def compute(data):
        teacher, processor = load_concept_teacher(config.model, config.output)
        data = add_concept_targets(data, teacher, processor, batch_size=config.batch_size)
        counts = context.record("concept_targets", {"output": teacher.output})
        if isinstance(data, datasets.Dataset):
            counts["undecodable_images"] = data.data.column("concept_targets").null_count  # Arrow's count, no pass
        return data

    return context.computed_once("concept_targets", dataset, compute, ["concept_targets"])  # the teacher runs once
