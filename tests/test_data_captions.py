"""CaptionSampler: weighted, per-epoch deterministic, same result across num_proc / streaming."""

import datasets
import numpy as np
import pytest

from hf_siglip.data import CaptionSampler, add_sampled_captions


def _dataset(n=200):
    rng = np.random.default_rng(0)
    captions = [[f"orig {i} {j}" for j in range(rng.integers(0, 4))] for i in range(n)]
    pseudo = [[f"pseudo {i} {j}" for j in range(5)] for i in range(n)]
    if n > 7:
        captions[5] = [None, "  ", "orig 5 kept"]
        pseudo[7] = None
        captions[7] = ["orig 7 a", "orig 7 b"]
    return datasets.Dataset.from_dict({"caption": captions, "pseudo": pseudo, "image_id": list(range(1000, 1000 + n))})


def test_deterministic_fresh_per_epoch_and_independent_of_num_proc_and_streaming():
    dataset = _dataset()
    sampler = CaptionSampler({"caption": 1.0, "pseudo": 1.0}, k=3, seed=7)
    epoch0 = list(add_sampled_captions(dataset, sampler, epoch=0, batch_size=17)["sampled_captions"])
    assert epoch0 == list(add_sampled_captions(dataset, sampler, epoch=0, num_proc=2)["sampled_captions"])
    stream = add_sampled_captions(dataset.to_iterable_dataset(num_shards=2), sampler, epoch=0)
    assert [r["sampled_captions"] for r in stream] == epoch0
    epoch1 = list(add_sampled_captions(dataset, sampler, epoch=1)["sampled_captions"])
    assert epoch1 != epoch0 and sum(a != b for a, b in zip(epoch0, epoch1)) > 100
    for i, chosen in enumerate(epoch0):
        assert len(chosen) == len(set(chosen)) == (2 if i == 7 else 3)  # row 7 has only two usable captions
        assert all(c.startswith((f"orig {i} ", f"pseudo {i} ")) or c == "orig 5 kept" for c in chosen)
    assert "orig 5 kept" not in epoch0[7]


def test_id_column_is_the_key_not_the_position():
    dataset = _dataset(50)
    sampler = CaptionSampler(["caption", "pseudo"], k=2, seed=1)
    forward = list(add_sampled_captions(dataset, sampler)["sampled_captions"])
    backward = list(add_sampled_captions(dataset.select(range(49, -1, -1)), sampler)["sampled_captions"])
    assert backward[::-1] == forward


def test_column_weights_follow_the_configured_mass():
    rows = 4000
    dataset = datasets.Dataset.from_dict({"caption": [["o"]] * rows, "pseudo": [["p1", "p2", "p3", "p4"]] * rows})
    sampler = CaptionSampler({"caption": 3.0, "pseudo": 1.0}, k=1, seed=0)
    chosen = [c[0] for c in add_sampled_captions(dataset, sampler)["sampled_captions"]]
    share = chosen.count("o") / rows
    assert abs(share - 0.75) < 0.03, share
    # zero weight never drawn
    sampler = CaptionSampler({"caption": 0.0, "pseudo": 1.0}, k=2, seed=0)
    assert all("o" not in c for c in add_sampled_captions(dataset.select(range(100)), sampler)["sampled_captions"])


def test_rows_with_fewer_captions_yield_all_usable_ones_and_images_are_not_read():
    dataset = datasets.Dataset.from_dict({"caption": [["a"], [], None, ["  ", "b", "c"]],
                                          "image": [b"not decoded"] * 4})
    sampler = CaptionSampler(["caption"], k=3)
    out = add_sampled_captions(dataset, sampler)
    assert list(out["sampled_captions"]) == [["a"], [], [], ["b", "c"]]
    assert list(out["image"]) == [b"not decoded"] * 4


def test_bad_configuration_raises():
    with pytest.raises(KeyError, match="missing_column"):
        add_sampled_captions(_dataset(3), CaptionSampler(["missing_column"], k=1))
    with pytest.raises(ValueError):
        CaptionSampler([], k=1)
    with pytest.raises(ValueError):
        CaptionSampler(["caption"], k=0)
