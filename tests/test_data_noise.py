"""SigLIP 4.10 label noise on real images: rates, determinism, what each kind changes."""

import datasets
import numpy as np
import pytest

from data_fixtures import jpeg_bytes, make_tokenizer, random_rgb
from hf_siglip.data import corrupt_labels, decode_image


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    n = 400
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": jpeg_bytes(random_rgb(rng, 8)), "path": None} for _ in range(n)],
        "caption": [[f"caption {i} a", f"caption {i} b"] for i in range(n)],
        "image_id": list(range(n)),
    }, features=features)


WORDS = ["red", "green", "cat", "dog", "runs"]


@pytest.mark.parametrize("kind", ["image", "text", "image_text", "pairing"])
def test_each_kind_changes_exactly_what_it_says(dataset, kind):
    out = corrupt_labels(dataset, p=0.3, kind=kind, seed=1, vocabulary=WORDS, noise_image_size=8, batch_size=100)
    noise = np.asarray(out["noise"])
    rate = (noise == kind).mean()
    assert 0.22 < rate < 0.38, rate
    assert set(noise) == {"", kind}
    raw = out.cast_column("image", datasets.Image(decode=False))
    original = dataset.cast_column("image", datasets.Image(decode=False))
    for i in range(len(dataset)):
        image_changed = raw[i]["image"]["bytes"] != original[i]["image"]["bytes"]
        caption_changed = out[i]["caption"] != dataset[i]["caption"]
        assert image_changed == (noise[i] in ("image", "image_text"))
        assert caption_changed == (noise[i] in ("text", "image_text", "pairing"))
        assert len(out[i]["caption"]) == 2
        if noise[i] in ("text", "image_text"):
            assert all(set(c.split()) <= set(WORDS) for c in out[i]["caption"])
        if noise[i] == "pairing":
            assert out[i]["caption"][0].startswith("caption ")  # a real caption of another row
    assert out[0]["image"].mode == "RGB"  # decoded feature restored


def test_seeded_and_independent_of_num_proc(dataset):
    a = corrupt_labels(dataset, p=0.5, seed=3, tokenizer=make_tokenizer(), noise_image_size=8)
    b = corrupt_labels(dataset, p=0.5, seed=3, tokenizer=make_tokenizer(), noise_image_size=8, num_proc=2)
    c = corrupt_labels(dataset, p=0.5, seed=4, tokenizer=make_tokenizer(), noise_image_size=8)
    # everything but the pairing shuffle (batch-local by design) is independent of num_proc
    same = [i for i in range(len(dataset)) if a[i]["noise"] != "pairing" and b[i]["noise"] != "pairing"]
    assert len(same) > 250
    assert [a[i]["noise"] for i in same] == [b[i]["noise"] for i in same]
    assert [a[i]["caption"] for i in same] == [b[i]["caption"] for i in same]
    assert list(a["noise"]) != list(c["noise"])
    assert set(a["noise"]) == {"", "image", "text", "image_text", "pairing"}
    noisy = [i for i, k in enumerate(a["noise"]) if k == "image"][0]
    assert np.asarray(decode_image(a[noisy]["image"])).std() > 50  # uniform noise


def test_streaming_and_p_bounds(dataset):
    stream = corrupt_labels(dataset.to_iterable_dataset(), p=1.0, kind="text", vocabulary=WORDS)
    assert all(r["noise"] == "text" for r in stream)
    assert list(corrupt_labels(dataset, p=0.0, kind="image")["noise"]) == [""] * len(dataset)
    with pytest.raises(ValueError):
        corrupt_labels(dataset, p=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        corrupt_labels(dataset, p=0.1, kind="text")
