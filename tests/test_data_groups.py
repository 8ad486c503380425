"""Positive groups: neighbour search (faiss vs torch), union-find, ids written back, real images."""

import datasets
import numpy as np
import pytest
import torch

from data_fixtures import jpeg_bytes, make_processor, make_tiny_siglip, random_rgb
from hf_siglip.data import SiglipDataCollator, assign_positive_groups, group_size_stats, nearest_neighbours
from hf_siglip.data.groups import UnionFind


def test_faiss_and_torch_neighbours_agree():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    keys = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(500, 16)), dtype=torch.float32), dim=1)
    queries = keys[:50] + 0.01
    s_faiss, i_faiss = nearest_neighbours(queries, keys, 5, backend="faiss")
    s_torch, i_torch = nearest_neighbours(queries, keys, 5, backend="torch", chunk_size=7)
    assert np.array_equal(i_faiss, i_torch)
    np.testing.assert_allclose(s_faiss, s_torch, atol=1e-5)
    assert (i_torch[:, 0] == np.arange(50)).all()


def test_union_find_merges_chains():
    uf = UnionFind(6)
    uf.union(0, 1), uf.union(1, 2), uf.union(4, 5)
    roots = uf.roots()
    assert roots[0] == roots[1] == roots[2] and roots[4] == roots[5] and len(set(roots)) == 3
    stats = group_size_stats([0, 0, 0, 3, 4, 4])
    assert stats["groups"] == 3 and stats["max_group_size"] == 3 and stats["group_size_histogram"] == {1: 1, 2: 1, 3: 1}
    assert stats["rows_in_multi_row_groups"] == 5


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_precomputed_embeddings_give_the_hand_computed_groups(backend):
    # rows 0,1,2 form a chain (0~1, 1~2 but 0 and 2 far apart); 3 alone; 4~5
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.1), np.sin(0.1), 0.0])
    c = np.array([np.cos(0.2), np.sin(0.2), 0.0])
    embeds = [a, b, c, [0, 0, 1.0], [0, 1.0, 0], [0, 0.999, 0.01]]
    dataset = datasets.Dataset.from_dict({"image_embeds": [list(map(float, e)) for e in embeds],
                                          "caption": [f"c{i}" for i in range(6)]})
    out, stats = assign_positive_groups(dataset, image_threshold=0.995, text_threshold=None, k=2, backend=backend,
                                        id_offset=100)
    assert list(out["image_id"]) == [100, 101, 102, 103, 104, 105]
    assert list(out["group_id"]) == [100, 100, 100, 103, 104, 104]
    assert np.cos(0.2) < 0.995  # 0 and 2 are linked only through 1
    assert stats["groups"] == 3 and stats["max_group_size"] == 3 and stats["image_image_links"] == 3


@pytest.fixture(scope="module")
def model_and_processor():
    processor = make_processor(image_size=32)
    return make_tiny_siglip(len(processor.tokenizer)), processor


def _duplicates_dataset():
    rng = np.random.default_rng(0)
    originals = [random_rgb(rng, 32) for _ in range(12)]
    images = [jpeg_bytes(im) for im in originals] + [jpeg_bytes(originals[0]), jpeg_bytes(originals[5])]
    words = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "cross",
             "diamond", "white"]
    captions = [[f"a {w} cat"] for w in words] + [["a dog"], ["the red man"]]
    captions[3] = ["the red man", "a woman"]  # text duplicate of row 13
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "caption": captions},
                                      features=features)


def test_real_image_and_caption_duplicates_are_grouped(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = _duplicates_dataset()
    out, stats = assign_positive_groups(dataset, model, processor, image_threshold=0.9999, text_threshold=1 - 1e-6)
    groups = list(out["group_id"])
    assert groups[12] == groups[0] == 0          # same image bytes
    assert groups[13] == groups[5] == groups[3] == 3  # same image as 5, same caption as 3
    assert len(set(groups)) == 11 and stats["rows_in_multi_row_groups"] == 5
    # the collator now treats the group as one positive id; image_id stays per row
    batch = SiglipDataCollator(processor=processor)(list(out.select([0, 12, 1])))
    assert batch["image_ids"].tolist() == [0, 0, 1]
    # streaming and save_to_disk give the same ids
    stream_out, _ = assign_positive_groups(dataset.to_iterable_dataset(), model, processor,
                                           image_threshold=0.9999, text_threshold=1 - 1e-6)
    assert [r["group_id"] for r in stream_out] == groups
    # with image ids, each row keeps its group when the stream is then shuffled (as training does) or split
    with_ids = dataset.add_column("image_id", list(range(100, 100 + len(dataset))))
    shuffled, _ = assign_positive_groups(with_ids.to_iterable_dataset(num_shards=7), model, processor,
                                         image_threshold=0.9999, text_threshold=1 - 1e-6)
    rows = list(shuffled.shuffle(seed=1, buffer_size=4))
    assert [r["image_id"] for r in rows] != sorted(r["image_id"] for r in rows)
    assert {r["image_id"]: r["group_id"] for r in rows} == {100 + i: 100 + g for i, g in enumerate(groups)}
    dataset.save_to_disk(str(tmp_path / "disk"))
    disk_out, _ = assign_positive_groups(datasets.load_from_disk(str(tmp_path / "disk")), model, processor,
                                         image_threshold=0.9999, text_threshold=1 - 1e-6)
    assert list(disk_out["group_id"]) == groups


def test_undecodable_image_is_counted_and_grouped_by_caption(model_and_processor):
    model, processor = model_and_processor
    dataset = _duplicates_dataset().cast_column("image", datasets.Image(decode=False))
    rows = dataset.to_list()
    rows[13]["image"] = {"bytes": b"garbage", "path": None}
    broken = datasets.Dataset.from_list(rows, features=dataset.features)
    out, stats = assign_positive_groups(broken, model, processor, image_threshold=0.9999, text_threshold=1 - 1e-6)
    assert stats["undecodable_images"] == 1
    assert out[13]["group_id"] == 3 and out[5]["group_id"] == 5  # linked by caption only now
