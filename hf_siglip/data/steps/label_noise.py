"""Step ``label_noise``: SigLIP section 4.10's corruptions at independent rates (see :mod:`hf_siglip.data.noise`)."""

from dataclasses import dataclass

from ..noise import corrupt_labels
from . import register_data_step


@dataclass
class LabelNoiseConfig:
    image: float = 0.0  # rate of rows whose image becomes uniform noise
    text: float = 0.0  # rate of rows whose captions become random words
    pairing: float = 0.0  # rate of rows whose captions are permuted among themselves (wrong pairs)
    max_random_words: int = 16
    noise_image_size: int = 64
    window_size: int = 1000  # streams: pairs are permuted within windows of this many rows

    def __post_init__(self):
        for name in ("image", "text", "pairing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction of rows in [0, 1], got {value!r}")
        if self.image == self.text == self.pairing == 0:
            raise ValueError("every rate is 0: set image, text and/or pairing")


@register_data_step("label_noise", LabelNoiseConfig)
def apply(dataset, config: LabelNoiseConfig, context):
    # on every process alike: each draw is a function of (seed, kind, row key), the words of the first window
    # and the pairing permutation of the seed, so no process needs another's result
    dataset, counts = corrupt_labels(dataset, image=config.image, text=config.text, pairing=config.pairing,
                                     seed=context.seed, max_random_words=config.max_random_words,
                                     noise_image_size=config.noise_image_size, window_size=config.window_size)
    context.record("label_noise", counts)
    return dataset
