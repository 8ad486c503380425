"""Pseudo-captions from a tiny random BLIP captioner saved locally (no download)."""

import datasets
import numpy as np
import pytest

from data_fixtures import jpeg_bytes, random_rgb, save_tiny_blip_captioner
from hf_siglip.data import add_pseudo_captions, load_captioner


@pytest.fixture(scope="module")
def captioner_path(tmp_path_factory):
    return save_tiny_blip_captioner(tmp_path_factory.mktemp("blip"))


def _images(n=10):
    rng = np.random.default_rng(0)
    images = [{"bytes": jpeg_bytes(random_rgb(rng, 24)), "path": None} for _ in range(n)]
    images[3] = {"bytes": b"\xff\xd8\xff truncated", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "caption": [f"c{i}" for i in range(n)]}, features=features)


def test_pseudo_captions_sampled_seeded_and_resumable(captioner_path, tmp_path):
    model, processor = load_captioner(captioner_path)
    dataset = _images()
    out, report = add_pseudo_captions(dataset, model, processor, num_captions=3, batch_size=4,
                                      generate_kwargs={"max_new_tokens": 6})
    captions = list(out["pseudo_captions"])
    assert report["undecodable_images"] == 1 and captions[3] == []
    assert all(len(c) == 3 and all(isinstance(t, str) and t for t in c) for i, c in enumerate(captions) if i != 3)
    assert len({t for c in captions for t in c}) > 10  # sampled, not one greedy caption repeated
    assert list(out["caption"]) == list(dataset["caption"]) and out[0]["image"].mode == "RGB"
    again, _ = add_pseudo_captions(dataset, model, processor, num_captions=3, batch_size=4,
                                   generate_kwargs={"max_new_tokens": 6})
    assert list(again["pseudo_captions"]) == captions

    # sharded + resumable: interrupt after some shards by deleting the last one, rerun resumes
    shard_dir = tmp_path / "shards"
    sharded, _ = add_pseudo_captions(dataset, model, processor, num_captions=2, batch_size=2,
                                     generate_kwargs={"max_new_tokens": 6}, output_dir=str(shard_dir), num_shards=3)
    first = list(sharded["pseudo_captions"])
    import shutil
    shards = sorted(shard_dir.iterdir())
    assert len(shards) == 3
    shutil.rmtree(shards[-1])
    stale = shard_dir / (shards[-1].name + ".tmp")  # a run killed while saving that shard left half of it
    stale.mkdir()
    (stale / "left-over.arrow").write_bytes(b"cut short")
    resumed, resumed_report = add_pseudo_captions(dataset, model, processor, num_captions=2, batch_size=2,
                                                  generate_kwargs={"max_new_tokens": 6}, output_dir=str(shard_dir),
                                                  num_shards=3)
    assert resumed_report["shards_resumed"] == 2 and resumed_report["rows"] == 3  # only the last shard ran
    assert list(resumed["pseudo_captions"]) == first
    assert sorted(path.name for path in shard_dir.iterdir()) == [path.name for path in shards]  # no .tmp left
    assert not (shards[-1] / "left-over.arrow").exists()  # the shard was written afresh


def test_pseudo_captions_on_a_stream(captioner_path):
    model, processor = load_captioner(captioner_path)
    stream, report = add_pseudo_captions(_images(6).to_iterable_dataset(), model, processor, num_captions=2,
                                         batch_size=4, generate_kwargs={"max_new_tokens": 5})
    rows = list(stream)
    assert [len(r["pseudo_captions"]) for r in rows] == [2, 2, 2, 0, 2, 2]
    assert report["undecodable_images"] == 1
