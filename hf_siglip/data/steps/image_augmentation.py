"""Step ``image_augmentation``: random resized crop, horizontal flip, colour jitter and Gaussian blur for training
batches (FFF and SigLIP train with crops and flips; FFF's ablations add jitter and blur). A batch step: the
collator augments each training image, seeded per sample from (seed, epoch, row id); evaluation is untouched.
See :mod:`hf_siglip.data.augmentation`."""

from ..augmentation import ImageAugmentation
from . import register_data_step


@register_data_step("image_augmentation", ImageAugmentation, kind="batch", hands_collator=("image_transform",))
def apply(dataset, config: ImageAugmentation, context):
    context.collator_options["image_transform"] = config.seeded(context.seed)
    context.record("image_augmentation", {})
    return dataset
