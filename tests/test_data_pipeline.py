"""A recipe chain on real files: load -> pseudo-captions -> caption sampling -> CAT -> groups -> collator.
Also checks that caption-only maps do not copy the image column."""

import json
import os

import datasets
import numpy as np
import pytest

from data_fixtures import make_processor, make_tiny_siglip, save_tiny_blip_captioner
from hf_siglip.data import (
    CaptionSampler,
    SiglipDataCollator,
    add_image_ids,
    add_pseudo_captions,
    add_sampled_captions,
    assign_positive_groups,
    cat_filter,
    load_image_text_dataset,
    make_demo_dataset,
)


def test_chain_on_an_image_folder(tmp_path):
    pytest.importorskip("spacy")
    from hf_siglip.data import load_spacy
    try:
        load_spacy()
    except ImportError as error:
        pytest.skip(str(error))
    captioner_path = save_tiny_blip_captioner(tmp_path / "blip")
    demo = make_demo_dataset(n_train=24, n_test=1, seed=5)["train"]
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, row in enumerate(demo):
            row["image"].save(folder / f"{i}.jpg" if i % 2 else folder / f"{i}.png")
            caption = row["caption"] if i % 3 else row["caption"][0]  # mix strings and lists
            handle.write(json.dumps({"file_name": f"{i}.jpg" if i % 2 else f"{i}.png", "text": caption}) + "\n")
    (folder / "5.jpg").write_bytes((folder / "5.jpg").read_bytes()[:100])  # one truncated file

    dataset = add_image_ids(load_image_text_dataset(str(folder), caption_column="text"))
    from hf_siglip.data import load_captioner
    captioner, captioner_processor = load_captioner(captioner_path)
    dataset, pseudo_report = add_pseudo_captions(dataset, captioner, captioner_processor, num_captions=2,
                                                 batch_size=8, generate_kwargs={"max_new_tokens": 6})
    assert pseudo_report["undecodable_images"] == 1
    sampler = CaptionSampler({"text": 1.0, "pseudo_captions": 0.5}, k=3, seed=0, output_column="caption")
    dataset = add_sampled_captions(dataset, sampler, epoch=0)
    dataset, cat_report = cat_filter(dataset, min_complexity=1, require_action=False, text_spotting=False)
    assert cat_report["rows"] == 24 and cat_report["captions_kept"] > 0
    processor = make_processor(image_size=32)
    model = make_tiny_siglip(len(processor.tokenizer))
    dataset, group_stats = assign_positive_groups(dataset, model, processor, image_threshold=0.9999,
                                                  text_threshold=None)
    assert group_stats["rows"] == len(dataset) and group_stats["undecodable_images"] == 1
    collator = SiglipDataCollator(processor=processor)
    batch = collator(list(dataset))
    assert collator.stats["rows_with_undecodable_image"] == 1
    assert batch["pixel_values"].shape[0] == len(dataset) - 1
    assert set(batch["text_ids"].tolist()) == set(batch["image_ids"].tolist())


def test_caption_maps_do_not_copy_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [{"bytes": rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "path": None} for _ in range(200)]
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "caption": datasets.List(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": images, "caption": [["a", "b", "c"]] * 200}, features=features) \
        .save_to_disk(str(tmp_path / "disk"))
    dataset = datasets.load_from_disk(str(tmp_path / "disk"))
    out = add_sampled_captions(dataset, CaptionSampler(["caption"], k=2))
    source_files = {f["filename"] for f in dataset.cache_files}
    new_files = [f["filename"] for f in out.cache_files if f["filename"] not in source_files]
    assert new_files, out.cache_files
    assert sum(os.path.getsize(f) for f in new_files) < 200_000  # the 4 MB of image bytes were not rewritten
    assert out[7]["image"]["bytes"] == images[7]["bytes"]
