"""Normalising on the device (issue 25 item 7): the collator's ``normalize_on_device`` hands ``uint8`` pixel_values
with each image's scale and offset; ``normalize_pixel_values`` (what ``SiglipTrainer._prepare_inputs`` calls) must
give the float32 pixel values the collator makes without the option, bit for bit (the fast path's own tolerance
against the processor is in tests/test_data_fast_images.py and is not widened)."""

import io

import numpy as np
import pytest
import torch

from cli_helpers import TINY, logged_losses, run_train
from conftest import tiny_training_setup
from data_fixtures import make_processor, make_tokenizer, photo_like
from hf_siglip.data import SiglipDataCollator
from hf_siglip.data.collator import PIXEL_NORMALIZATION, normalize_pixel_values


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)

    def encoded(image, format, **options):
        buffer = io.BytesIO()
        image.save(buffer, format=format, **options)
        return buffer.getvalue()

    files = [encoded(photo_like(rng, 500, 375), "JPEG", quality=90), encoded(photo_like(rng, 224, 224), "PNG"),
             encoded(photo_like(rng, 400, 300).convert("L"), "JPEG"), encoded(photo_like(rng, 40, 30), "PNG")]
    return [{"image": {"bytes": data, "path": None}, "caption": "a cat", "image_id": i} for i, data in enumerate(files)]


def _image_processors():
    from transformers import BlipImageProcessorPil, SiglipImageProcessorPil

    return {"siglip-224": make_processor(224).image_processor, "siglip-32": make_processor(32).image_processor,
            "blip-per-channel-48x64": BlipImageProcessorPil(size={"height": 48, "width": 64}),
            "no-normalize": SiglipImageProcessorPil(size={"height": 40, "width": 40}, do_normalize=False)}


@pytest.mark.parametrize("fast_path", ["torch", "pil"])
@pytest.mark.parametrize("name", list(_image_processors()))
def test_uint8_batches_normalised_later_equal_the_float_batches_bit_for_bit(name, fast_path):
    image_processor = _image_processors()[name]
    options = dict(image_processor=image_processor, tokenizer=make_tokenizer(), max_length=8, image_fast_path=fast_path)
    rows = _rows()
    expected = SiglipDataCollator(**options)(rows)
    batch = SiglipDataCollator(**options, normalize_on_device=True)(rows)
    assert batch["pixel_values"].dtype == torch.uint8 and batch[PIXEL_NORMALIZATION].shape == (len(rows), 2, 3)
    assert not torch.equal(batch["pixel_values"].float(), expected["pixel_values"])  # not normalised yet
    normalised = normalize_pixel_values(batch)
    assert PIXEL_NORMALIZATION not in normalised and normalised["pixel_values"].dtype == torch.float32
    assert torch.equal(normalised["pixel_values"], expected["pixel_values"])
    assert normalize_pixel_values(normalised) is normalised  # a second call leaves the float batch alone
    assert torch.equal(normalised["pixel_values"], expected["pixel_values"])
    for key in ("input_ids", "image_ids", "text_ids"):
        assert torch.equal(normalised[key], expected[key])


def test_through_dataloader_workers_and_to_the_model_dtype():
    """Two workers hand uint8 batches through shared memory; a bfloat16 model gets the float32 values cast."""
    processor = make_processor(32)
    rows = _rows() * 3
    expected = SiglipDataCollator(processor=processor, max_length=8)(rows)["pixel_values"]
    collator = SiglipDataCollator(processor=processor, max_length=8, normalize_on_device=True)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert all(batch["pixel_values"].dtype == torch.uint8 for batch in batches)
    assert torch.equal(torch.cat([normalize_pixel_values(batch)["pixel_values"] for batch in batches]), expected)
    bf16 = normalize_pixel_values(collator(rows), torch.bfloat16)["pixel_values"]
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, expected.to(torch.bfloat16))
    empty = normalize_pixel_values(collator([]))["pixel_values"]
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == torch.float32


def test_processors_without_the_fast_path_stay_float():
    """CLIP's shortest-edge resize + crop is made by the processor itself: float pixel values, nothing to normalise."""
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    rows = _rows()
    batch = SiglipDataCollator(image_processor=image_processor, tokenizer=make_tokenizer(), max_length=8,
                               normalize_on_device=True)(rows)
    assert batch["pixel_values"].dtype == torch.float32 and PIXEL_NORMALIZATION not in batch
    expected = SiglipDataCollator(image_processor=image_processor, tokenizer=make_tokenizer(), max_length=8)(rows)
    assert torch.equal(normalize_pixel_values(batch)["pixel_values"], expected["pixel_values"])


def test_the_trainer_switches_it_on_and_normalises_in_prepare_inputs(tmp_path):
    import hf_siglip as hs

    model, processor, collator, dataset = tiny_training_setup(n_train=8, n_test=8)
    assert collator.normalize_on_device is None
    args = hs.SiglipTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                      remove_unused_columns=False, per_device_train_batch_size=4)
    trainer = hs.SiglipTrainer(model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
                               data_collator=collator, processing_class=processor)
    assert collator.normalize_on_device is True
    rows = list(dataset["train"])[:4]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].dtype == torch.uint8
    prepared = trainer._prepare_inputs(collator(rows))
    expected = SiglipDataCollator(processor=processor, max_length=12)(rows)["pixel_values"]
    assert PIXEL_NORMALIZATION not in prepared and torch.equal(prepared["pixel_values"], expected)
    # evaluation batches are the processor's float pixel values, as before
    evaluation = next(iter(trainer.get_eval_dataloader()))
    assert evaluation["pixel_values"].dtype == torch.float32 and PIXEL_NORMALIZATION not in evaluation
    # a collator the user set to False keeps float batches
    own = SiglipDataCollator(processor=processor, max_length=12, normalize_on_device=False)
    hs.SiglipTrainer(model=model, args=args, train_dataset=dataset["train"], data_collator=own,
                     processing_class=processor)
    assert own.normalize_on_device is False and own(rows)["pixel_values"].dtype == torch.float32


def test_hf_siglip_train_with_two_workers_trains_as_in_process(tmp_path):
    """`hf-siglip train --dataloader_num_workers 2`: uint8 batches from two worker processes, normalised in the
    trainer, give the losses of the in-process run on the same seed."""
    losses = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        run = run_train({**TINY, "max_steps": 3, "output_dir": out, "dataloader_num_workers": workers,
                         "eval_split": "None", "save_strategy": "no"})
        assert run.returncode == 0, run.stderr[-3000:]
        losses[workers] = logged_losses(out)
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-6, atol=0)
