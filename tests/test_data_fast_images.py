"""The collator's fast image path (hf_siglip.data.image_preprocessing) against the image processor it stands in for.

Real JPEG / PNG files written with PIL; processors built locally (nothing is downloaded). Measured on the images
below with SiglipImageProcessorPil at 224 and 32 (inputs in [-1, 1], where one uint8 level is 2/255 = 0.0078):

* ``image_fast_path="pil"`` against the processor on the same decoded images: max abs difference 1.2e-7
  (float rounding of the folded multiply-add);
* ``"torch"`` (the default) against the same: max 0.0157 = 2 levels (torch's fixed-point antialiased kernel
  against Pillow's), mean 2.5e-5 to 3e-5;
* the default collator against the processor on fully decoded images: max 2 levels for every image the decoder
  does not scale. JPEGs that libjpeg decodes at a DCT scale first (1/2 or 1/8 here) differ by what that decode
  does, not by the fast path: 1024x768 -> 224 (1/2) max 0.055, mean 0.0026; 500x375 -> 32 (1/8, a 63x47 decode)
  max 0.31, mean 0.016.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_processor, make_tokenizer, photo_like
from hf_siglip.data import SiglipDataCollator, decode_image
from hf_siglip.data.image_preprocessing import FixedSizeImagePreprocessing, unsupported_reason

LEVEL = 2 / 255  # one uint8 level after SigLIP's rescale (1/255) and normalise (std 0.5)


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def image_files() -> dict[str, bytes]:
    """Encoded files covering the cases the collator meets: sizes, modes, already at size, EXIF rotation."""
    rng = np.random.default_rng(0)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: the camera was turned, decoders rotate 90 degrees
    rgba = photo_like(rng, 320, 240).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((320, 240)))
    return {
        "jpeg 500x375": _encoded(photo_like(rng, 500, 375), "JPEG", quality=90),
        "jpeg 1024x768": _encoded(photo_like(rng, 1024, 768), "JPEG", quality=90),
        "png 300x200": _encoded(photo_like(rng, 300, 200), "PNG"),
        "grey jpeg 400x300": _encoded(photo_like(rng, 400, 300).convert("L"), "JPEG", quality=90),
        "rgba png 320x240": _encoded(rgba, "PNG"),
        "png already 224x224": _encoded(photo_like(rng, 224, 224), "PNG"),
        "exif-rotated jpeg 500x375": _encoded(photo_like(rng, 500, 375), "JPEG", quality=90, exif=rotated),
        "tall png 300x1000": _encoded(photo_like(rng, 300, 1000), "PNG"),
        "small png 40x30": _encoded(photo_like(rng, 40, 30), "PNG"),
    }


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return image_files()


@pytest.fixture(scope="module", params=[224, 32], ids=lambda size: f"siglip-{size}")
def processor(request):
    return make_processor(image_size=request.param)


def _collate(processor, encoded: list[bytes], **options) -> torch.Tensor:
    rows = [{"image": {"bytes": data, "path": None}, "caption": "a cat", "image_id": i}
            for i, data in enumerate(encoded)]
    return SiglipDataCollator(processor=processor, max_length=8, **options)(rows)["pixel_values"]


def _processed(image_processor, encoded: list[bytes], min_size=None) -> torch.Tensor:
    """What the image processor itself makes of the images, decoded in full or (min_size) as the collator does."""
    decoded = [decode_image({"bytes": data, "path": None}, min_size=min_size) for data in encoded]
    return image_processor(images=decoded, return_tensors="pt")["pixel_values"].float()


def _collator_decode_size(processor):
    return SiglipDataCollator(processor=processor)._decode_size()


def test_the_fast_path_replaces_the_processor_for_siglip(processor, images, monkeypatch):
    from transformers.image_processing_backends import PilBackend

    def called(*args, **kwargs):
        raise AssertionError("the image processor ran")

    monkeypatch.setattr(PilBackend, "_preprocess", called)  # the processor's own work; its class still qualifies
    assert _collate(processor, list(images.values())).shape[0] == len(images)
    with pytest.raises(AssertionError, match="the image processor ran"):
        _collate(processor, list(images.values()), image_fast_path=None)


def test_pil_resize_matches_the_processor_to_float_rounding(processor, images):
    encoded = list(images.values())
    expected = _processed(processor.image_processor, encoded, _collator_decode_size(processor))
    got = _collate(processor, encoded, image_fast_path="pil")
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-6


def test_torch_resize_is_within_two_levels_of_the_processor(processor, images):
    encoded = list(images.values())
    expected = _processed(processor.image_processor, encoded, _collator_decode_size(processor))
    difference = (_collate(processor, encoded) - expected).abs()
    assert difference.max() <= 2 * LEVEL + 1e-6
    assert difference.mean() < 1e-3  # off by a level on a few pixels, not a shift


def test_against_the_processor_on_fully_decoded_images(processor, images):
    """The whole fast route (JPEG draft decoding + fast resize) against the processor on the full-size decode."""
    encoded = list(images.values())
    difference = (_collate(processor, encoded) - _processed(processor.image_processor, encoded)).abs()
    decode_size = _collator_decode_size(processor)
    drafted = [decode_image({"bytes": data, "path": None}, min_size=decode_size).size != decode_image(data).size
               for data in encoded]  # JPEGs large enough for libjpeg to decode at 1/2, 1/4 or 1/8
    assert any(drafted) and not all(drafted)
    assert difference[[not d for d in drafted]].max() <= 2 * LEVEL + 1e-6
    # a DCT-scaled decode is a different downsample (an 8x8 block mean at 1/8), not a shifted image
    assert difference[drafted].mean() < 0.02 and difference[drafted].max() < 0.5


def test_per_channel_mean_std_and_other_filters_match_the_processor(images):
    from transformers import BlipImageProcessorPil, SiglipImageProcessorPil

    encoded = list(images.values())
    for image_processor in (BlipImageProcessorPil(size={"height": 48, "width": 64}),  # CLIP mean/std per channel
                            SiglipImageProcessorPil(size={"height": 40, "width": 40}, resample=Image.LANCZOS),
                            SiglipImageProcessorPil(size={"height": 40, "width": 40}, do_normalize=False)):
        collator = SiglipDataCollator(image_processor=image_processor, tokenizer=make_tokenizer(), max_length=8)
        rows = [{"image": {"bytes": data, "path": None}, "caption": "a cat"} for data in encoded]
        expected = _processed(image_processor, encoded, collator._decode_size())
        two_levels = 2 * image_processor.rescale_factor / (min(image_processor.image_std)
                                                           if image_processor.do_normalize else 1.0)
        # (Lanczos has no torch kernel: both settings resize it with Pillow)
        assert (collator(rows)["pixel_values"] - expected).abs().max() <= two_levels + 1e-6
        collator.image_fast_path = "pil"
        assert (collator(rows)["pixel_values"] - expected).abs().max() < 1e-5


def test_torch_resize_passes_the_axes_in_pillows_order():
    """A tall image that shrinks mostly in height: Pillow resizes vertically first, clipping overshoot in between;
    the other order differs by 12 levels on this high-contrast pattern."""
    from transformers import SiglipImageProcessorPil

    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:421, 0:175]
    pattern = np.stack([np.sin(x / 7) * 100 + 128, np.cos(y / 9) * 100 + 128, x * y % 256], -1)
    image = Image.fromarray((pattern + rng.normal(0, 20, pattern.shape)).clip(0, 255).astype(np.uint8))
    fast = FixedSizeImagePreprocessing.from_image_processor(SiglipImageProcessorPil(size={"height": 256, "width": 192}))
    expected = np.asarray(image.resize((192, 256), Image.BICUBIC)).transpose(2, 0, 1).astype(int)
    assert np.abs(fast.resize(image).astype(int) - expected).max() <= 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_images_in_other_modes_are_converted_as_the_processor_does(mode):
    from transformers import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": 24, "width": 24})
    image = photo_like(np.random.default_rng(2), 50, 40)
    image = image.convert("P") if mode == "P" else image.convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize((50, 40)))
    fast = FixedSizeImagePreprocessing.from_image_processor(image_processor, resize="pil")
    expected = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert (fast([image]) - expected).abs().max() < 1e-6


def _clip_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize("make, reason", [
    (_clip_processor, "not a fixed height and width"),
    (lambda: __import__("transformers").SiglipImageProcessorPil(do_center_crop=True, crop_size=16), "do_center_crop"),
    (lambda: __import__("transformers").SiglipImageProcessorPil(do_resize=False), "do_resize is off"),
    (lambda: __import__("transformers").Siglip2ImageProcessorPil(), "overrides preprocess"),
    (lambda: None, "not a transformers PIL-backend image processor"),
], ids=["clip-shortest-edge-crop", "centre-crop", "no-resize", "siglip2-naflex", "none"])
def test_processors_the_fast_path_does_not_reproduce_are_refused(make, reason):
    image_processor = make()
    assert reason in unsupported_reason(image_processor)
    assert FixedSizeImagePreprocessing.from_image_processor(image_processor) is None


def test_an_unsupported_processor_is_called_as_it_is(images):
    image_processor = _clip_processor()
    collator = SiglipDataCollator(image_processor=image_processor, tokenizer=make_tokenizer(), max_length=8)
    encoded = list(images.values())
    rows = [{"image": {"bytes": data, "path": None}, "caption": "a cat"} for data in encoded]
    expected = _processed(image_processor, encoded, collator._decode_size())
    assert torch.equal(collator(rows)["pixel_values"], expected)


def test_a_wrong_fast_path_name_is_refused():
    with pytest.raises(ValueError, match="image_fast_path"):
        SiglipDataCollator(processor=make_processor(32), image_fast_path="cv2")


def test_dataloader_workers_give_the_same_pixel_values(images):
    """In a worker the batch is written straight into shared memory; it must arrive as the in-process one."""
    processor = make_processor(image_size=32)
    rows = [{"image": {"bytes": data, "path": None}, "caption": "a cat", "image_id": i}
            for i, data in enumerate(images.values())]
    collator = SiglipDataCollator(processor=processor, max_length=8)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=1, collate_fn=collator)
    from_worker = torch.cat([batch["pixel_values"] for batch in loader])
    assert torch.equal(from_worker, collator(rows)["pixel_values"])


def test_pixels_are_read_with_or_without_pillows_arrow_view():
    """Pillow exports an image's pixels to Arrow without a copy unless it keeps them in several memory blocks (over
    16 MB); both ways give the same pixels to resize."""
    from transformers import SiglipImageProcessorPil

    from hf_siglip.data.image_preprocessing import _pixels

    rng = np.random.default_rng(3)
    fast = FixedSizeImagePreprocessing.from_image_processor(SiglipImageProcessorPil(size={"height": 32, "width": 32}))
    for side in (300, 2100):  # 2100 x 2100 RGB is 17.6 MB in Pillow: no Arrow view
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        assert np.array_equal(_pixels(image)[..., :3], np.asarray(image))
        expected = np.asarray(image.resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1).astype(int)
        assert np.abs(fast.resize(image).astype(int) - expected).max() <= 2
