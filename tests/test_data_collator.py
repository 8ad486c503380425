"""SiglipDataCollator on real rows: ids, k captions per image, padding, broken rows, embeddings."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_processor, random_rgb, write_broken_image_folder
from hf_siglip.data import CaptionSampler, SiglipDataCollator, load_image_text_dataset


@pytest.fixture(scope="module")
def processor():
    return make_processor(image_size=32)


def test_k_captions_share_the_image_id_and_shapes(processor):
    rng = np.random.default_rng(0)
    rows = [
        {"image": random_rgb(rng), "caption": ["a red circle", "a circle", "red"], "image_id": 7},
        {"image": random_rgb(rng), "caption": "a blue square", "image_id": 3},
    ]
    batch = SiglipDataCollator(processor=processor, max_length=16)(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert batch["image_ids"].tolist() == [7, 3]
    assert batch["text_ids"].tolist() == [7, 7, 7, 3]
    # padded to max_length with the pad token, text content kept in order
    assert batch["input_ids"][1, 2:].eq(processor.tokenizer.pad_token_id).all()
    assert batch["input_ids"][3, :3].tolist() == processor.tokenizer("a blue square")["input_ids"]


def test_truncates_to_max_length(processor):
    long_caption = " ".join(["red"] * 100)
    batch = SiglipDataCollator(processor=processor, max_length=8)([{"image": Image.new("RGB", (8, 8)),
                                                                     "caption": long_caption}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"].ne(processor.tokenizer.pad_token_id).all()


def test_group_id_wins_over_image_id(processor):
    rows = [{"image": Image.new("RGB", (8, 8)), "caption": "a", "image_id": i, "group_id": 100 + i // 2}
            for i in range(4)]
    batch = SiglipDataCollator(processor=processor)(rows)
    assert batch["image_ids"].tolist() == [100, 100, 101, 101]
    batch = SiglipDataCollator(processor=processor, id_column="image_id")(rows)
    assert batch["image_ids"].tolist() == [0, 1, 2, 3]


def test_fallback_ids_are_unique_and_offset_by_process(processor, monkeypatch):
    rows = [{"image": Image.new("RGB", (8, 8)), "caption": ["a", "b"]} for _ in range(3)]
    collator = SiglipDataCollator(processor=processor)
    first, second = collator(rows), collator(rows)
    ids = first["image_ids"].tolist() + second["image_ids"].tolist()
    assert len(set(ids)) == 6
    assert first["text_ids"].tolist() == [i for i in first["image_ids"].tolist() for _ in range(2)]
    # another process (rank 1) draws from a disjoint range
    import hf_siglip.data.collator as collator_module
    monkeypatch.setattr(collator_module, "_process_index", lambda: 1)
    other = SiglipDataCollator(processor=processor)(rows)["image_ids"].tolist()
    assert not set(other) & set(ids) and min(other) >= 1 << 48


def test_broken_rows_from_real_files_are_dropped_and_counted(processor, tmp_path, caplog):
    outcomes = write_broken_image_folder(tmp_path / "imgs")
    dataset = load_image_text_dataset(str(tmp_path / "imgs"))
    dataset = dataset.add_column("image_id", list(range(len(dataset))))
    names = [r["image"]["path"].split("/")[-1] for r in dataset]
    collator = SiglipDataCollator(processor=processor)
    with caplog.at_level(logging.WARNING):
        batch = collator([dataset[i] for i in range(len(dataset))])
    kept = [i for i, name in enumerate(names) if outcomes[name] == "ok"]
    assert batch["image_ids"].tolist() == kept
    assert batch["pixel_values"].shape[0] == len(kept)
    assert collator.stats["rows_with_undecodable_image"] == 2
    assert collator.stats["rows_without_caption"] == 1
    assert collator.stats["empty_captions_dropped"] == 2  # None and "   " in grey.png's list
    grey = names.index("grey.png")
    assert batch["text_ids"].tolist().count(grey) == 1
    assert "dropped" in caplog.text and "rows_with_undecodable_image" in caplog.text


def test_all_rows_dropped_gives_empty_tensors(processor):
    batch = SiglipDataCollator(processor=processor, max_length=12)([{"image": Image.new("RGB", (8, 8)),
                                                                     "caption": []}])
    assert batch["pixel_values"].shape == (0, 3, 32, 32)
    assert batch["input_ids"].shape == (0, 12)
    assert batch["image_ids"].numel() == 0 and batch["text_ids"].numel() == 0


def test_missing_column_and_bad_caption_type_raise_with_names(processor):
    collator = SiglipDataCollator(processor=processor, caption_column="text")
    with pytest.raises(KeyError, match="'text'.*caption"):
        collator([{"image": Image.new("RGB", (8, 8)), "caption": "a"}])
    with pytest.raises(TypeError, match="row 5"):
        SiglipDataCollator(processor=processor)([{"image": Image.new("RGB", (8, 8)), "caption": 3, "image_id": 5}])


def test_precomputed_image_embeds_replace_pixels(processor):
    rows = [{"image_embeds": [0.5, 1.0, 2.0], "caption": ["x", "y"], "image_id": 1},
            {"image_embeds": [1.5, 0.0, -1.0], "caption": "x", "image_id": 2}]
    batch = SiglipDataCollator(processor=processor)(rows)
    assert "pixel_values" not in batch
    assert batch["image_embeds"].dtype == torch.float32
    assert torch.equal(batch["image_embeds"], torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.0, -1.0]]))
    assert batch["text_ids"].tolist() == [1, 1, 2]


def test_caption_sampler_hook_changes_with_epoch_and_repeats(processor):
    captions = [f"cat {w}" for w in ["red", "blue", "green", "yellow", "purple", "orange"]]
    rows = [{"image": Image.new("RGB", (8, 8)), "caption": captions, "pseudo": ["a dog", "a man"], "image_id": i}
            for i in range(4)]
    sampler = CaptionSampler({"caption": 1.0, "pseudo": 1.0}, k=2, seed=3)
    collator = SiglipDataCollator(processor=processor, caption_sampler=sampler)
    epoch0 = collator(rows)["input_ids"]
    assert epoch0.shape[0] == 8
    assert torch.equal(epoch0, collator(rows)["input_ids"])
    collator.set_epoch(1)
    assert not torch.equal(epoch0, collator(rows)["input_ids"])


def test_collator_works_inside_a_dataloader_with_workers(processor):
    from torch.utils.data import DataLoader
    rng = np.random.default_rng(1)
    rows = [{"image": random_rgb(rng), "caption": "a cat"} for _ in range(8)]
    loader = DataLoader(rows, batch_size=2, num_workers=2, collate_fn=SiglipDataCollator(processor=processor))
    ids = torch.cat([b["image_ids"] for b in loader]).tolist()
    assert len(set(ids)) == 8  # per-worker offsets keep fallback ids apart


def test_batch_feeds_a_siglip_model_and_ids_give_the_positive_mask(processor):
    from data_fixtures import make_tiny_siglip
    from hf_siglip.data import make_demo_dataset
    rows = list(make_demo_dataset(n_train=6, n_test=1, n_captions=3)["train"])
    rows[2]["image_id"] = rows[1]["image_id"]  # a duplicate image id: both rows' texts are positives of both
    batch = SiglipDataCollator(processor=processor, max_length=16)(rows)
    model = make_tiny_siglip(len(processor.tokenizer))
    with torch.no_grad():
        images = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        texts = model.get_text_features(input_ids=batch["input_ids"]).pooler_output
    assert images.shape[0] == 6 and texts.shape[0] == 18
    positives = batch["image_ids"][:, None] == batch["text_ids"][None, :]
    assert positives.sum(1).tolist() == [3, 6, 6, 3, 3, 3]


def test_cached_image_tower_embeddings_feed_the_collator(processor):
    import datasets

    from data_fixtures import jpeg_bytes, make_tiny_siglip
    from hf_siglip.data import add_image_embeddings
    model = make_tiny_siglip(len(processor.tokenizer))
    rng = np.random.default_rng(0)
    images = [{"bytes": jpeg_bytes(random_rgb(rng, 32)), "path": None} for _ in range(4)]
    images[2] = {"bytes": b"garbage", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "image_id": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": images, "caption": ["a", "b", "c", "d"], "image_id": [0, 1, 2, 3]},
                                         features=features)
    cached = add_image_embeddings(dataset, model, processor)
    embeds = list(cached["image_embeds"])  # column access: row 2 would decode its garbage image
    assert embeds[2] is None and len(embeds[0]) == 32
    with torch.no_grad():
        pixels = processor.image_processor(images=[cached[0]["image"]], return_tensors="pt")["pixel_values"]
        expected = model.get_image_features(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(torch.tensor(embeds[0]), expected, atol=1e-5, rtol=1e-5)
    collator = SiglipDataCollator(processor=processor)
    batch = collator(list(cached.remove_columns("image")))
    assert batch["image_embeds"].shape == (3, 32) and batch["image_ids"].tolist() == [0, 1, 3]
    assert collator.stats["rows_with_undecodable_image"] == 1


def test_epoch_callback_drives_fresh_captions_in_a_real_trainer_loop(processor, tmp_path):
    """A real transformers.Trainer over 2 epochs: the callback moves the collator to each epoch."""
    import transformers

    from hf_siglip.data import collator_epoch_callback

    rows = [{"image": Image.new("RGB", (8, 8), (i * 20, 0, 0)), "caption": [f"cat {w}" for w in
             ["red", "blue", "green", "yellow", "purple", "orange"]], "image_id": i} for i in range(4)]
    seen = []

    class Recorder(SiglipDataCollator):
        def __call__(self, batch_rows):
            batch = super().__call__(batch_rows)
            seen.append((self.epoch, batch["input_ids"].clone()))
            return batch

    collator = Recorder(processor=processor, max_length=8, caption_sampler=CaptionSampler(["caption"], k=1, seed=0))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values, input_ids, image_ids, text_ids):
            return {"loss": (self.weight * pixel_values.mean()).sum() + 0 * self.weight.sum()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                                          remove_unused_columns=False, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=rows, data_collator=collator,
                                   callbacks=[collator_epoch_callback(collator)])
    trainer.train()
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert not torch.equal(seen[0][1], seen[1][1])  # different captions sampled in epoch 1


def test_tokenizer_and_image_processor_instead_of_processor(processor):
    collator = SiglipDataCollator(tokenizer=processor.tokenizer, image_processor=processor.image_processor,
                                  image_column="img", caption_column="text", id_column="key", max_length=10)
    batch = collator([{"img": Image.new("L", (5, 9)), "text": "a red circle", "key": 42}])
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["input_ids"].shape == (1, 10)
    assert batch["image_ids"].tolist() == [42] and batch["text_ids"].tolist() == [42]
    with pytest.raises(ValueError, match="tokenizer"):
        SiglipDataCollator(image_processor=processor.image_processor)


def test_large_jpegs_decode_straight_to_about_the_target_size():
    """PIL's draft mode: a 1024 x 768 JPEG for a 224 model decodes at half size (each side still >= 224), and the
    model input differs from the full decode's only by the small change a different resampling path makes."""
    import io

    import numpy as np
    from PIL import Image

    from data_fixtures import make_processor
    from hf_siglip.data import SiglipDataCollator, decode_image

    y, x = np.mgrid[0:768, 0:1024] / 100.0
    photo = np.stack([np.sin(x) * 100 + 128, np.cos(y) * 100 + 128, (x + y) * 10 % 255], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=92)
    jpeg = {"bytes": buffer.getvalue(), "path": None}
    assert decode_image(jpeg).size == (1024, 768)
    assert decode_image(jpeg, min_size=(224, 224)).size == (512, 384)
    assert decode_image(jpeg, min_size=(100, 100)).size == (256, 192)  # 1/8 would leave 96 < 100
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    assert decode_image({"bytes": png.getvalue(), "path": None}, min_size=(224, 224)).size == (1024, 768)

    processor = make_processor(image_size=224)
    drafted = SiglipDataCollator(processor=processor, max_length=8)([{"image": jpeg, "caption": "a", "image_id": 0}])
    full = processor.image_processor(images=[decode_image(jpeg)], return_tensors="pt")["pixel_values"]
    assert drafted["pixel_values"].shape == full.shape
    assert (drafted["pixel_values"] - full).abs().mean() < 0.02  # inputs in [-1, 1]
