"""A fast stand-in for fixed-size image processors: resize to (H, W), rescale, normalise, in a few vectorised steps.

``FixedSizeImagePreprocessing.from_image_processor(image_processor)`` reads a ``transformers`` image processor and
returns a pipeline that gives the same ``pixel_values`` (see below for how close), or ``None`` when it does not
understand the processor. It understands a processor only when both hold:

* its code is ``transformers``' generic PIL pipeline: an instance of ``PilBackend`` that overrides none of the
  methods the pipeline runs (``SiglipImageProcessorPil``, ``BlipImageProcessorPil``...; not the NaFlex
  ``Siglip2ImageProcessorPil``, whose ``preprocess`` returns patches and ``spatial_shapes``);
* its settings make that pipeline "resize to a fixed (H, W), rescale, normalise": ``do_resize`` with
  ``size = {"height", "width"}`` (not ``shortest_edge``/``longest_edge``/``max_height``), no ``do_center_crop``
  (CLIP's shortest-edge resize + crop is refused), no ``do_pad``, ``do_convert_rgb`` on (``ViTImageProcessorPil``
  leaves it unset: refused), a PIL ``resample`` filter,
  and a scalar or 3-channel ``image_mean``/``image_std``.

The work per image is one resize straight to (H, W) with the processor's filter (none when the image already has
that size), kept as ``uint8``; the batch then gets one float conversion in which rescale and normalise are folded
into a single multiply-add per channel (``x * rescale / std - mean / std``). :meth:`uint8_batch` stops before that
step (a ``uint8`` batch, 4x fewer bytes to hand from a DataLoader worker and to copy to a GPU) and
:func:`normalize_uint8` does it later, on the device, to the same float32 values bit for bit (a multiply then an add,
each rounded to float32, as numpy does here).

``resize="torch"`` resizes bilinear and bicubic with ``torch.nn.functional.interpolate(antialias=True)`` on
``uint8`` (the AVX kernel ported from Pillow-SIMD; ~7x faster than Pillow's own resize on one core). It passes over
the two axes in the order Pillow does (Pillow 13: vertical first when the height shrinks more than twice as much as
the width; found out once with a probe, as Pillow versions differ), and differs from Pillow by fixed-point rounding
only: at most 2 of 255 levels (0.016 in SigLIP's [-1, 1] inputs), on a small fraction of the pixels, on photo-like
images and on high-contrast noise patterns alike (``tests/test_data_fast_images.py``). Other filters (nearest, box,
hamming, lanczos) use Pillow. ``resize="pil"`` uses Pillow for every filter and matches the processor to float
rounding (< 1e-6).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import to_rgb

RESIZE_BACKENDS = ("torch", "pil")
_TORCH_MODES = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}
# the methods of transformers' generic pipeline (BaseImageProcessor.preprocess -> PilBackend); a processor that
# overrides any of them does something else
_PIPELINE_METHODS = ("__call__", "preprocess", "_standardize_kwargs", "_preprocess_image_like_inputs",
                     "_prepare_image_like_inputs", "_prepare_images_structure", "process_image", "convert_to_rgb",
                     "_preprocess", "resize", "rescale", "normalize")


def _channel_values(name: str, value) -> np.ndarray:
    if isinstance(value, numbers.Real):
        return np.full(3, float(value))
    values = np.asarray(value, dtype=np.float64)
    if values.shape != (3,):
        raise ValueError(f"{name} has {values.size} values, the fast path needs 1 or 3")
    return values


def _pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as ``(h, w, C)`` uint8, C >= 3: Pillow's Arrow export when it can (a view of Pillow's
    own RGBX rows, no copy), else ``np.asarray`` (a packed copy)."""
    if hasattr(image, "__arrow_c_array__"):
        try:
            import pyarrow

            array = pyarrow.array(image)  # fixed_size_list<uint8>[4] for RGB: Pillow keeps a padding byte
            channels = array.type.list_size
            pixels = np.frombuffer(array.buffers()[-1], dtype=np.uint8, count=image.height * image.width * channels)
            return pixels.reshape(image.height, image.width, channels)
        except (ImportError, AttributeError, ValueError, TypeError):  # e.g. an image Pillow keeps in several blocks
            pass
    return np.asarray(image)


@functools.cache
def _pillow_resizes_vertically_first() -> bool:
    """Whether this Pillow runs the vertical pass first when the height shrinks more than twice as much as the width
    (Pillow 13 does; its Resample.c once always began with the horizontal one): a 9 x 64 probe that tells them apart."""
    probe = Image.fromarray((np.random.default_rng(0).integers(0, 2, (64, 9)) * 255).astype(np.uint8))
    resized = np.asarray(probe.resize((8, 8), Image.Resampling.BICUBIC))
    vertical_first = probe.resize((9, 8), Image.Resampling.BICUBIC).resize((8, 8), Image.Resampling.BICUBIC)
    return np.array_equal(resized, np.asarray(vertical_first))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor. In a DataLoader worker it is made in shared memory, as ``default_collate``
    does: sending it to the main process then copies nothing (else ~90 ms per 256 images at 224 px). In-process,
    numpy allocates it: numpy asks Linux for huge pages, and page faults made first writes to a ``torch.empty``
    batch 4x slower (0.25 against 0.06 ms per 224 px image)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).resize_(shape)


def normalize_uint8(pixels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, 3, H, W)`` ``uint8`` pixels to ``pixels * scale + offset`` in float32 (then ``dtype``), on their device:
    the values :meth:`FixedSizeImagePreprocessing.pixel_values` makes, bit for bit. ``scale`` and ``offset`` are
    ``(3,)`` or per image ``(B, 3)`` float32."""
    view = (-1, 3, 1, 1) if scale.dim() == 2 else (3, 1, 1)
    out = pixels.to(torch.float32)
    # two rounded steps, not a fused multiply-add: numpy's `row *= scale; row += offset` rounds after each
    out.mul_(scale.to(out.device, torch.float32).reshape(view))
    out.add_(offset.to(out.device, torch.float32).reshape(view))
    return out.to(dtype)


def unsupported_reason(image_processor) -> str | None:
    """Why ``image_processor`` is not a plain "fixed-size resize, rescale, normalise" PIL pipeline, or None if it is."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # an older transformers: its processors are not the ones checked here
        return "transformers has no PilBackend"
    if not isinstance(image_processor, PilBackend):
        return f"{type(image_processor).__name__} is not a transformers PIL-backend image processor"
    overridden = [name for name in _PIPELINE_METHODS
                  if getattr(type(image_processor), name, None) is not getattr(PilBackend, name, None)]
    if overridden:
        return f"{type(image_processor).__name__} overrides {', '.join(overridden)}"
    settings = image_processor
    size = getattr(settings, "size", None)
    if not getattr(settings, "do_resize", False) or size is None:
        return "do_resize is off (images would keep their own sizes)"
    if any(getattr(size, key, None) for key in ("shortest_edge", "longest_edge", "max_height", "max_width")) \
            or not (getattr(size, "height", None) and getattr(size, "width", None)):
        return f"size {dict(size)} is not a fixed height and width"
    for flag in ("do_center_crop", "do_pad"):
        if getattr(settings, flag, False):
            return f"{flag} is on"
    if not getattr(settings, "do_convert_rgb", False):
        return "do_convert_rgb is off (grey-scale inputs would keep one channel)"
    resample = getattr(settings, "resample", None)
    if resample is not None and not isinstance(resample, numbers.Integral):
        return f"resample {resample!r} is not a PIL filter"
    try:
        if getattr(settings, "do_normalize", False):
            _channel_values("image_mean", settings.image_mean), _channel_values("image_std", settings.image_std)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


@dataclass
class FixedSizeImagePreprocessing:
    """Resize RGB images to ``(height, width)`` and map ``uint8`` values ``x`` to ``x * scale + offset`` per channel.

    Build it with :meth:`from_image_processor` (see the module docstring).
    """

    height: int
    width: int
    resample: int
    scale: np.ndarray  # (3, 1, 1) float32: rescale_factor / std
    offset: np.ndarray  # (3, 1, 1) float32: -mean / std
    resize_backend: str = "torch"

    @classmethod
    def from_image_processor(cls, image_processor, resize: str = "torch") -> FixedSizeImagePreprocessing | None:
        """The fast equivalent of ``image_processor``, or None if it is not a pipeline this class reproduces."""
        if resize not in RESIZE_BACKENDS:
            raise ValueError(f"resize must be one of {RESIZE_BACKENDS}, got {resize!r}")
        if unsupported_reason(image_processor) is not None:
            return None
        p = image_processor
        # PilBackend.resize's default filter when resample is unset
        resample = int(p.resample) if p.resample is not None else int(Image.Resampling.BILINEAR)
        scale, offset = np.ones(3), np.zeros(3)
        if p.do_rescale:
            scale = scale * float(p.rescale_factor)
        if p.do_normalize:
            mean, std = _channel_values("image_mean", p.image_mean), _channel_values("image_std", p.image_std)
            scale, offset = scale / std, -mean / std
        return cls(height=int(p.size.height), width=int(p.size.width), resample=resample,
                   scale=scale.astype(np.float32).reshape(3, 1, 1), offset=offset.astype(np.float32).reshape(3, 1, 1),
                   resize_backend=resize)

    def resize(self, image: Image.Image) -> np.ndarray:
        """``image`` (any PIL mode; converted as :func:`~hf_siglip.data.images.to_rgb` does) as a ``(3, H, W)``
        ``uint8`` array."""
        image = to_rgb(image)
        target = (self.width, self.height)
        mode = _TORCH_MODES.get(self.resample) if self.resize_backend == "torch" else None
        if image.size != target and mode is None:
            image = image.resize(target, self.resample)
        if image.size == target:
            return np.ascontiguousarray(_pixels(image)[..., :3].transpose(2, 0, 1))
        with warnings.catch_warnings():  # a read-only view of the decoded pixels: interpolate only reads it
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(_pixels(image)).permute(2, 0, 1)[None]  # channels-last (1, C, h, w)
        width, height = image.size
        if height - self.height > 0 and height - self.height > 2 * (width - self.width) \
                and _pillow_resizes_vertically_first():
            # Pillow's order matters: it clips to 0..255 between the passes
            pixels = torch.nn.functional.interpolate(pixels, size=(self.height, width), mode=mode, antialias=True)
        pixels = torch.nn.functional.interpolate(pixels, size=(self.height, self.width), mode=mode, antialias=True)
        return np.ascontiguousarray(pixels[0, :3].numpy())

    def pixel_values(self, resized: list[np.ndarray]) -> torch.Tensor:
        """Stack ``(3, H, W)`` ``uint8`` arrays from :meth:`resize` into ``(B, 3, H, W)`` float32 pixel values."""
        out = _batch_tensor((len(resized), 3, self.height, self.width))
        for row, pixels in zip(out.numpy(), resized):
            # per image, so the uint8 source and float row stay in cache between the copy and the multiply-add
            np.copyto(row, pixels, casting="unsafe")
            row *= self.scale
            row += self.offset
        return out

    def uint8_batch(self, resized: list[np.ndarray]) -> torch.Tensor:
        """Stack ``(3, H, W)`` ``uint8`` arrays from :meth:`resize` into a ``(B, 3, H, W)`` ``uint8`` batch, left for
        :func:`normalize_uint8` (with :attr:`scale` and :attr:`offset`) to turn into the pixel values."""
        out = _batch_tensor((len(resized), 3, self.height, self.width), torch.uint8)
        if resized:
            np.stack(resized, out=out.numpy())
        return out

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return self.pixel_values([self.resize(image) for image in images])


__all__ = ["RESIZE_BACKENDS", "FixedSizeImagePreprocessing", "normalize_uint8", "unsupported_reason"]
