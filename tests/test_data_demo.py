"""The embedded demo dataset: shape, determinism, repeated concepts, held-out split, speed."""

import time

import numpy as np

from data_fixtures import make_processor
from hf_siglip.data import DEMO_CLASSES, DEMO_TEMPLATES, SiglipDataCollator, make_demo_dataset


def test_demo_dataset_structure_and_determinism():
    start = time.perf_counter()
    demo = make_demo_dataset(n_train=2000, n_test=500, seed=1)
    assert time.perf_counter() - start < 20
    assert set(demo) == {"train", "test"} and len(demo["train"]) == 2000 and len(demo["test"]) == 500
    row = demo["train"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    assert len(row["caption"]) == 4 and all(isinstance(c, str) and c for c in row["caption"])
    assert demo["train"].features["label"].names == DEMO_CLASSES
    assert all("{}" in t for t in DEMO_TEMPLATES)
    # label names the colour and shape the captions talk about
    for r in demo["test"].select(range(50)):
        colour, shape = DEMO_CLASSES[r["label"]].split()
        assert (r["colour"], r["shape"]) == (colour, shape)
        assert all(shape in c or colour in c for c in r["caption"])
    # ids unique across splits, concepts repeat (false negatives exist)
    ids = list(demo["train"]["image_id"]) + list(demo["test"]["image_id"])
    assert len(set(ids)) == len(ids)
    concepts = np.asarray(demo["train"]["concept_id"])
    assert len(np.unique(concepts)) < len(concepts) / 2
    assert len(set(c for caps in demo["train"]["caption"] for c in caps)) < 4 * 2000 / 2
    # deterministic per seed, different across seeds, test images differ from train images
    again = make_demo_dataset(n_train=50, n_test=10, seed=1)
    assert list(again["train"]["caption"]) == list(demo["train"].select(range(50))["caption"])
    assert np.array_equal(np.asarray(again["train"][3]["image"]), np.asarray(demo["train"][3]["image"]))
    other = make_demo_dataset(n_train=50, n_test=10, seed=2)
    assert list(other["train"]["caption"]) != list(again["train"]["caption"])
    train_pixels = {np.asarray(r["image"]).tobytes() for r in demo["train"]}
    assert not any(np.asarray(r["image"]).tobytes() in train_pixels for r in demo["test"])


def test_demo_labels_are_recoverable_from_pixels():
    """The images carry the label: 1-nearest-neighbour on raw 16x16 pixels beats chance (1/30) fivefold."""
    demo = make_demo_dataset(n_train=1500, n_test=300, seed=0)
    def features(split):
        x = np.stack([np.asarray(im.resize((16, 16)), dtype=np.float32).ravel() for im in demo[split]["image"]])
        return x, np.asarray(demo[split]["label"])
    from sklearn.neighbors import KNeighborsClassifier
    x_train, y_train = features("train")
    x_test, y_test = features("test")
    accuracy = KNeighborsClassifier(n_neighbors=1).fit(x_train, y_train).score(x_test, y_test)
    assert accuracy > 5 / len(DEMO_CLASSES), accuracy


def test_demo_rows_collate():
    demo = make_demo_dataset(n_train=8, n_test=2)
    batch = SiglipDataCollator(processor=make_processor())(list(demo["train"]))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["input_ids"].shape == (32, 64)
    assert (batch["input_ids"] == 1).sum() == 0  # every demo word is in the test vocabulary (no <unk>)
    assert batch["text_ids"].tolist() == [i for i in range(8) for _ in range(4)]


def test_first_caption_names_every_attribute():
    demo = make_demo_dataset(n_train=30, n_test=5, n_captions=3)
    for row in demo["train"]:
        assert len(row["caption"]) == 3
        full = row["caption"][0]
        assert all(row[key] in full for key in ("shape", "colour", "size", "background"))


def test_digits_dataset_from_sklearn():
    from hf_siglip.data import DIGITS_CLASSES, DIGITS_TEMPLATES, make_digits_dataset
    digits = make_digits_dataset(seed=0)
    assert len(digits["train"]) + len(digits["test"]) == 1797 and 340 < len(digits["test"]) < 380
    assert not set(digits["train"]["image_id"]) & set(digits["test"]["image_id"])
    row = digits["test"][0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    name = DIGITS_CLASSES[row["label"]]
    assert len(row["caption"]) == 3 and all(name in c for c in row["caption"][:1])
    assert row["colour"] in row["caption"][0] and all("{}" in t for t in DIGITS_TEMPLATES)
    again = make_digits_dataset(seed=0)
    assert list(again["test"]["caption"]) == list(digits["test"]["caption"])
    # every word is in the test vocabulary, and the labels are recoverable from the pixels
    batch = SiglipDataCollator(processor=make_processor())(list(digits["test"].select(range(20))))
    assert (batch["input_ids"] == 1).sum() == 0
    from sklearn.neighbors import KNeighborsClassifier
    def features(split):
        return np.stack([np.asarray(im.convert("L"), dtype=np.float32).ravel() for im in digits[split]["image"]])
    accuracy = KNeighborsClassifier(3).fit(features("train"), digits["train"]["label"]).score(
        features("test"), digits["test"]["label"])
    assert accuracy > 0.5, accuracy
