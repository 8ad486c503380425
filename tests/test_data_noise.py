"""SigLIP 4.10 label noise on real images: independent rates per side, dataset-wide pair shuffling, determinism."""

import datasets
import numpy as np
import pytest

from data_fixtures import jpeg_bytes, make_tokenizer, random_rgb
from hf_siglip.data import corrupt_labels, decode_image

N = 2000


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": jpeg_bytes(random_rgb(rng, 8)), "path": None} for _ in range(N)],
        "caption": [[f"caption {i} a", f"caption {i} b"] for i in range(N)],
        "image_id": list(range(N)),
    }, features=features)


WORDS = ["red", "green", "cat", "dog", "runs"]


def changes(out, dataset):
    """Per row: (image changed, caption changed, caption now belongs to another row)."""
    raw = out.cast_column("image", datasets.Image(decode=False))["image"]
    original = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    image = np.array([a["bytes"] != b["bytes"] for a, b in zip(raw, original)])
    text = np.array([a != b for a, b in zip(out["caption"], dataset["caption"])])
    owners = {tuple(c): i for i, c in enumerate(dataset["caption"])}
    moved = np.array([owners.get(tuple(c), -1) not in (-1, i) for i, c in enumerate(out["caption"])])
    return image, text, moved


def test_the_three_kinds_are_drawn_independently_at_their_rates(dataset):
    out, report = corrupt_labels(dataset, image=0.3, text=0.2, pairing=0.25, seed=1, vocabulary=WORDS,
                                 noise_image_size=8)
    image, text, moved = changes(out, dataset)
    random_words = np.array([all(set(c.split()) <= set(WORDS) for c in caps) for caps in out["caption"]])
    tolerance = 4 * np.sqrt(0.25 * 0.75 / N)  # four standard errors
    assert abs(image.mean() - 0.3) < tolerance and abs(random_words.mean() - 0.2) < tolerance
    assert abs(moved.mean() - 0.25 * (1 - 0.2)) < tolerance  # shuffled rows, less those whose text was replaced
    # independence: both sides corrupted on one row at the product of the rates (the paper's "image & text")
    assert abs((image & random_words).mean() - 0.3 * 0.2) < 4 * np.sqrt(0.06 * 0.94 / N)
    noise = np.asarray(out["noise"])
    assert (np.char.find(noise, "image") >= 0).tolist() == image.tolist()
    assert (np.char.find(noise, "text") >= 0).tolist() == random_words.tolist()
    assert ((np.char.find(noise, "pairing") >= 0) & ~random_words).tolist() == moved.tolist()
    assert report["rows_image_noise"] == image.sum() and report["rows_text_noise"] == random_words.sum()
    assert report["rows_pairing_shuffled"] == sum("pairing" in n for n in noise)
    assert all(len(c) == 2 for c in out["caption"])  # a caption cell keeps its shape
    assert out[0]["image"].mode == "RGB"  # the decoded feature is restored
    noisy = int(np.flatnonzero(image)[0])
    assert np.asarray(decode_image(out[noisy]["image"])).std() > 50  # uniform noise


def test_pairs_are_shuffled_across_the_whole_dataset(dataset):
    out, report = corrupt_labels(dataset, pairing=0.1, seed=2)
    _, _, moved = changes(out, dataset)
    owners = {tuple(c): i for i, c in enumerate(dataset["caption"])}
    rows = np.flatnonzero(moved)
    sources = np.array([owners[tuple(out["caption"][i])] for i in rows])
    assert set(sources) == set(rows)  # a permutation of the chosen rows' captions, none keeping its own
    assert np.abs(sources - rows).max() > 1000  # rows far apart in the dataset swap: not one map batch
    assert report["rows_pairing_shuffled"] == len(rows) and abs(len(rows) / N - 0.1) < 0.03
    image, text, _ = changes(out, dataset)
    assert not image.any() and (text == moved).all()  # pairing touches nothing else


def test_seeded_independent_of_num_proc_and_text_from_the_captions_own_words(dataset):
    a, _ = corrupt_labels(dataset, text=0.5, image=0.1, seed=3, noise_image_size=8)
    b, _ = corrupt_labels(dataset, text=0.5, image=0.1, seed=3, noise_image_size=8, num_proc=2)
    c, _ = corrupt_labels(dataset, text=0.5, image=0.1, seed=4, noise_image_size=8)
    assert a["noise"] == b["noise"] and a["caption"] == b["caption"]
    assert a["noise"] != c["noise"]
    vocabulary = {w for caps in dataset["caption"] for c in caps for w in c.split()}
    replaced = [caps for caps, n in zip(a["caption"], a["noise"]) if "text" in n]
    assert replaced and all(set(c.split()) <= vocabulary for caps in replaced for c in caps)
    with_tokenizer, _ = corrupt_labels(dataset.select(range(50)), text=1.0, tokenizer=make_tokenizer())
    assert all(n == "text" for n in with_tokenizer["noise"])


def test_streams_and_bounds(dataset):
    stream, report = corrupt_labels(dataset.to_iterable_dataset(), text=1.0, pairing=0.5, vocabulary=WORDS,
                                    window_size=100)
    rows = list(stream)
    assert all("text" in r["noise"] for r in rows) and report["rows"] == N
    assert abs(report["rows_pairing_shuffled"] / N - 0.5) < 0.05
    assert all(r["noise"] == "" for r in corrupt_labels(dataset, image=0.0, text=0.0)[0])
    with pytest.raises(ValueError, match="image must be in"):
        corrupt_labels(dataset, image=1.5)
