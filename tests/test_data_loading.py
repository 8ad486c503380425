"""Loading real files (imagefolder, parquet, save_to_disk, streaming) and the image decode policies."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from data_fixtures import jpeg_bytes, make_processor, random_rgb, write_broken_image_folder
from hf_siglip.data import ImageDecodeError, SiglipDataCollator, add_image_ids, decode_image, load_image_text_dataset


def _write_folder(root, captions):
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(captions):
            random_rgb(rng).save(root / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")


@pytest.mark.parametrize("captions", [["one", "two", "three"], [["a", "b"], ["c"], ["d", "e", "f"]],
                                      ["plain", ["list", "of two"], None]])
def test_imagefolder_string_list_and_mixed_captions(tmp_path, captions):
    _write_folder(tmp_path / "f", captions)
    dataset = load_image_text_dataset(str(tmp_path / "f"), caption_column="text")
    assert len(dataset) == 3
    got = sorted(map(str, dataset["text"]))
    mixed = any(isinstance(c, list) for c in captions) and any(isinstance(c, str) for c in captions)
    expected = [[c] if mixed and isinstance(c, str) else c for c in captions]
    assert got == sorted(map(str, expected))
    assert isinstance(dataset.features["image"], datasets.Image) and not dataset.features["image"].decode
    assert decode_image(dataset[0]["image"]).size == (16, 16)


def test_missing_column_raises_with_available_names(tmp_path):
    _write_folder(tmp_path / "f", ["a", "b"])
    with pytest.raises(KeyError, match=r"\['caption'\].*text"):
        load_image_text_dataset(str(tmp_path / "f"))


def test_parquet_save_to_disk_and_streaming_agree(tmp_path):
    rng = np.random.default_rng(0)
    data = {"image": [{"bytes": jpeg_bytes(random_rgb(rng)), "path": None} for _ in range(5)],
            "caption": [["a cat", "cat"], ["a dog"], [], ["x"], ["y", "ok"]]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    dataset = datasets.Dataset.from_dict(data, features=features)
    (tmp_path / "pq").mkdir()
    dataset.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    dataset.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "arrow").mkdir()
    arrow_file = next((tmp_path / "disk").glob("*.arrow"))
    (tmp_path / "arrow" / "part.arrow").write_bytes(arrow_file.read_bytes())  # bare Arrow file, no state.json
    processor = make_processor()
    results = []
    for source, streaming in [("pq", False), ("pq", True), ("disk", False), ("disk", True), ("arrow", False),
                              ("pq/part-0.parquet", False)]:
        loaded = load_image_text_dataset(str(tmp_path / source), streaming=streaming)
        assert isinstance(loaded, datasets.IterableDataset) == streaming
        loaded = add_image_ids(loaded)
        batch = SiglipDataCollator(processor=processor)(list(loaded))
        results.append(batch)
    for batch in results[1:]:
        assert batch["image_ids"].tolist() == results[0]["image_ids"].tolist() == [0, 1, 3, 4]
        assert batch["text_ids"].tolist() == [0, 0, 1, 3, 4, 4]
        assert (batch["pixel_values"] - results[0]["pixel_values"]).abs().max() == 0


def test_streaming_imagefolder_with_broken_files(tmp_path):
    outcomes = write_broken_image_folder(tmp_path / "imgs")
    stream = load_image_text_dataset(str(tmp_path / "imgs"), streaming=True)
    rows = list(stream)
    assert len(rows) == len(outcomes)  # broken files do not break iteration
    collator = SiglipDataCollator(processor=make_processor())
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == sum(v == "ok" for v in outcomes.values())
    assert collator.stats["rows_with_undecodable_image"] == 2


def test_decode_policies_on_real_files(tmp_path):
    outcomes = write_broken_image_folder(tmp_path / "imgs")
    for name, outcome in outcomes.items():
        path = str(tmp_path / "imgs" / name)
        if outcome == "undecodable":
            with pytest.raises(ImageDecodeError):
                decode_image(path)
            with pytest.raises(ImageDecodeError):
                decode_image({"bytes": open(path, "rb").read(), "path": None})
        else:
            assert decode_image(path).mode == "RGB"
    # 16-bit: 40000/65535 of full scale, not clipped to white
    assert Image.open(tmp_path / "imgs" / "sixteen_bit.png").mode.startswith("I")
    assert np.asarray(decode_image(str(tmp_path / "imgs" / "sixteen_bit.png")))[0, 0].tolist() == [156] * 3
    # RGBA: transparent pixels become white, opaque ones keep their colour
    rgba = np.zeros((2, 1, 4), dtype=np.uint8)
    rgba[0] = [10, 20, 30, 0]
    rgba[1] = [10, 20, 30, 255]
    out = np.asarray(decode_image(Image.fromarray(rgba, mode="RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 0].tolist() == [10, 20, 30]
    # grey-scale replicated to three channels
    grey = np.asarray(decode_image(str(tmp_path / "imgs" / "grey.png")))
    assert (grey[..., 0] == grey[..., 2]).all()
    with pytest.raises(ImageDecodeError, match="None"):
        decode_image(None)
    assert decode_image(np.full((4, 4), 65535, dtype=np.uint16)).getpixel((0, 0)) == (255, 255, 255)


def test_sklearn_digits_roundtrip_through_collator():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = [(img * (255 / 16)).astype(np.uint8) for img in digits.images[:20]]
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i in images],
                                          "caption": [f"the digit {t}" for t in digits.target[:20]],
                                          "image_id": list(range(20))})
    batch = SiglipDataCollator(processor=make_processor(image_size=32))(list(dataset))
    assert batch["pixel_values"].shape == (20, 3, 32, 32)
    # the processor resized the real 8x8 digit: dark background in the corner, bright stroke somewhere
    assert batch["pixel_values"][:, :, 0, 0].max() < -0.9 and batch["pixel_values"].amax(dim=(1, 2, 3)).min() > 0.5


def test_exif_orientation_matches_datasets_decoding(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    ours = decode_image(str(tmp_path / "rotated.jpg"))
    theirs = datasets.Image().decode_example({"path": str(tmp_path / "rotated.jpg"), "bytes": None})
    assert ours.size == theirs.size == (20, 40)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))
