"""Turning whatever a dataset row holds in its image column into one RGB ``PIL.Image``.

Policies (tested in ``tests/test_data_images.py`` with real files):

* grey-scale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``: **converted** to RGB.
* ``RGBA`` / ``LA`` / palette with transparency: **converted** by compositing on a white background
  (PIL's plain ``convert("RGB")`` would expose whatever colour the transparent pixels happen to hold).
* 16-bit and 32-bit integer images (``I;16*``, ``I``) and float images (``F``): **converted** by
  rescaling the full integer range to 0..255 (PIL's own ``convert`` clips 16-bit values at 255, which
  turns most 16-bit photos white).
* a file that cannot be decoded (garbage bytes, truncated JPEG/PNG, missing file): ``decode_image``
  raises :class:`ImageDecodeError`; callers (the collator, the map functions) **skip the row with a
  counted warning**. PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone on purpose: a
  half-grey truncated image is silently wrong data.
* ``None`` in the image column: :class:`ImageDecodeError` as well (skipped, counted).
* an EXIF orientation tag (phone photos): the image is **rotated upright**, as ``datasets``' own
  ``Image`` feature does, so decoding here and decoding in ``datasets`` give the same pixels.

Accepted values: ``PIL.Image.Image``; the ``{"bytes": ..., "path": ...}`` dicts that ``datasets``
produces for an ``Image(decode=False)`` column; a path string; raw ``bytes``; an ``HxW`` / ``HxWxC``
numpy array (uint8, uint16 or float in [0, 1]).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps


class ImageDecodeError(ValueError):
    """An image column value that cannot be turned into an RGB image."""


_INTEGER_MODES_MAX = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def _open(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if value is None:
        raise ImageDecodeError("image is None")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ImageDecodeError("image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, np.ndarray):
        return _array_to_image(value)
    raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.integer):
        data = (array.astype(np.float64) * (255.0 / np.iinfo(array.dtype).max)).round().astype(np.uint8)
    else:
        data = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return Image.fromarray(data)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB following the module's policies (alpha over white, 16-bit rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _INTEGER_MODES_MAX or mode in ("I", "F"):
        array = np.asarray(image)
        if mode == "I":
            # 16-bit PNGs often open as mode "I"; treat values above 255 as a 16-bit range.
            scale = 65535.0 if array.max(initial=0) > 255 else 255.0
            array = np.clip(array.astype(np.float64), 0, scale) * (255.0 / scale)
        elif mode == "F":
            scale = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
            array = np.clip(array.astype(np.float64), 0, scale) * (255.0 / scale)
        else:
            array = array.astype(np.float64) * (255.0 / _INTEGER_MODES_MAX[mode])
        return Image.fromarray(array.round().astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image column value into a fully loaded RGB image.

    ``min_size`` (height, width): the size the caller will resize to. A JPEG is then decoded straight to the
    smallest of 1/1, 1/2, 1/4, 1/8 of its size that still covers ``min_size`` on both sides (libjpeg's DCT
    scaling, PIL's ``draft``), which skips most of the decoding work for web images much larger than the model's
    input; other formats decode in full. Raises :class:`ImageDecodeError` (with the underlying reason) when it
    cannot be decoded.
    """
    try:
        image = _open(value)
        if min_size is not None and image.format == "JPEG" and not image.getexif().get(ExifTags.Base.Orientation):
            # draft keeps each side >= the requested one; a rotated (EXIF) photo swaps sides, so it decodes in full
            image.draft("RGB", (int(min_size[1]), int(min_size[0])))
        image.load()  # force decoding now: a truncated file fails here, not later in the processor
        if image.getexif().get(ExifTags.Base.Orientation) is not None:
            image = ImageOps.exif_transpose(image)  # as datasets' Image feature does when it decodes
        return to_rgb(image)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error


def decode_decodable(values) -> tuple[list[Image.Image], list[int]]:
    """The values that decode, as RGB images, and their positions; the caller counts or marks the rest."""
    images, positions = [], []
    for position, value in enumerate(values):
        try:
            images.append(decode_image(value))
        except ImageDecodeError:
            continue
        positions.append(position)
    return images, positions
