"""Training-time image augmentation: random resized crop, horizontal flip, colour jitter, Gaussian blur.

The transforms are Albumentations' (``pip install 'hf_siglip[augment]'``; torchvision's wheels on PyPI are
built against CUDA torch and do not import beside the CPU build). Each image is augmented with its own seed,
derived from ``(seed, epoch, row id)``: a rerun with the same seed sees the same crops, each epoch sees new
ones, and DataLoader workers never repeat one another. The crop is taken from the image at its own resolution
and resized straight to the model's input size, so the image processor's resize is then a no-op.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ._hashing import hashed_uniform


def _pair(name: str, value, low: float, high: float) -> tuple[float, float]:
    if value is None or len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {value!r}")
    return float(value[0]), float(value[1])


def _probability(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value!r}")
    return float(value)


@dataclass
class ImageAugmentation:
    """Settings of the ``image_augmentation`` data step (each one a recipe key).

    Args:
        crop_scale: random resized crop, area fraction range of the crop (open_clip's default [0.9, 1.0];
            ImageNet-style Inception crops use [0.08, 1.0]).
        crop_ratio: aspect ratio range of the crop.
        horizontal_flip: probability of a left-right flip.
        color_jitter: [brightness, contrast, saturation, hue] strengths, or null for none.
        color_jitter_probability: how often the jitter is applied.
        blur_sigma: [min, max] sigma of a Gaussian blur in pixels, or null for none.
        blur_probability: how often the blur is applied.
        seed: base seed (the data step sets the run's seed).
    """

    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: float = 0.5
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_probability: float = 0.8
    blur_sigma: tuple[float, float] | None = None
    blur_probability: float = 0.5
    seed: int = 0

    def __post_init__(self):
        self.crop_scale = _pair("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[0] <= 0:
            raise ValueError(f"crop_scale must start above 0, got {list(self.crop_scale)}")
        self.crop_ratio = _pair("crop_ratio", self.crop_ratio, 1e-3, 1e3)
        self.horizontal_flip = _probability("horizontal_flip", self.horizontal_flip)
        self.color_jitter_probability = _probability("color_jitter_probability", self.color_jitter_probability)
        self.blur_probability = _probability("blur_probability", self.blur_probability)
        if self.color_jitter is not None:
            if len(self.color_jitter) != 4 or any(v < 0 for v in self.color_jitter) or self.color_jitter[3] > 0.5:
                raise ValueError("color_jitter is [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, "
                                 f"got {self.color_jitter!r}")
            self.color_jitter = tuple(float(v) for v in self.color_jitter)
        if self.blur_sigma is not None:
            self.blur_sigma = _pair("blur_sigma", self.blur_sigma, 1e-6, 1e3)
        self._pipelines = {}

    def seeded(self, seed: int) -> "ImageAugmentation":
        return dataclasses.replace(self, seed=int(seed))

    def __getstate__(self):  # DataLoader workers may pickle the collator: rebuild pipelines there
        return {**self.__dict__, "_pipelines": {}}

    def _pipeline(self, height: int, width: int):
        key = (height, width)
        if key not in self._pipelines:
            os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network on import
            try:
                import albumentations as A
            except ImportError as error:
                raise ImportError("image_augmentation needs Albumentations: pip install 'hf_siglip[augment]'") \
                    from error
            transforms = [A.RandomResizedCrop(size=(height, width), scale=self.crop_scale, ratio=self.crop_ratio,
                                              p=1.0),
                          A.HorizontalFlip(p=self.horizontal_flip)]
            if self.color_jitter is not None:
                brightness, contrast, saturation, hue = self.color_jitter
                transforms.append(A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation,
                                                hue=hue, p=self.color_jitter_probability))
            if self.blur_sigma is not None:
                transforms.append(A.GaussianBlur(sigma_limit=self.blur_sigma, blur_limit=0, p=self.blur_probability))
            self._pipelines[key] = A.Compose(transforms, seed=0)
        return self._pipelines[key]

    def __call__(self, image: Image.Image, size: tuple[int, int], row_id: int, epoch: int) -> Image.Image:
        """``image`` augmented to ``size`` (height, width) with the draws of (seed, epoch, row_id)."""
        pipeline = self._pipeline(*size)
        sample_seed = int(hashed_uniform(self.seed, epoch, row_id) * 2**32)
        pipeline.set_random_seed(sample_seed)
        return Image.fromarray(pipeline(image=np.asarray(image))["image"])


__all__ = ["ImageAugmentation"]
