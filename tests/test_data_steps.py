"""The data-step contract: recipe lists parse with clear errors, one step list runs unchanged on a Dataset, a
save_to_disk folder and a stream, counts are recorded per step, and training augmentation is seeded per sample
while evaluation stays deterministic."""

import datasets
import numpy as np
import pytest
import torch

from conftest import tiny_training_setup
from data_fixtures import write_image_folder
from hf_siglip import SiglipTrainer, SiglipTrainingArguments
from hf_siglip.data import SiglipDataCollator, add_image_ids, decode_image, load_image_text_dataset
from hf_siglip.data.augmentation import ImageAugmentation
from hf_siglip.data.steps import DataContext, parse_data_steps, run_data_steps

STEPS = [{"cat_filter": {"min_complexity": 2, "require_action": False, "text_spotting": False}},
         {"label_noise": {"text": 0.4, "image": 0.3, "noise_image_size": 8}},
         {"caption_sampling": {"k": 2}}]


@pytest.mark.parametrize("spec, message", [
    ([{"cat_filtr": {}}], r"entry 1: unknown step 'cat_filtr'; the steps are \[.*'cat_filter'"),
    ([{"label_noise": {"txt": 0.1}}], r"entry 1 \(label_noise\): unknown setting\(s\) \['txt'\]"),
    ([{"caption_sampling": {"k": 2}}, {"label_noise": {"text": 1.5}}], r"entry 2 \(label_noise\): text is a fraction"),
    ([{"image_augmentation": {"crop_scale": [0.9, 0.5]}}], r"crop_scale must be \[min, max\]"),
    ([{"pseudo_captions": {}}], r"pseudo_captions\): model is required"),
    ("[{not json", r"data_steps: not valid JSON"),
    ([{"capfilt": {}, "cat_filter": {}}], r"entry 1: expected one \{step: settings\} mapping"),
])
def test_bad_step_lists_fail_naming_the_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_data_steps(spec)


def test_a_step_list_works_alike_on_a_dataset_a_saved_folder_and_a_stream(tmp_path):
    captions = ["a red cat on a mat", "dog", "the big green dog on the sofa", "", "a small cat near a red box"] * 8
    folder = write_image_folder(tmp_path / "folder", [("good", c) for c in captions])
    table = add_image_ids(load_image_text_dataset(str(folder)))
    table.save_to_disk(str(tmp_path / "saved"))
    saved = load_image_text_dataset(str(tmp_path / "saved"))
    stream = load_image_text_dataset(str(tmp_path / "saved"), streaming=True)
    assert isinstance(saved, datasets.Dataset) and isinstance(stream, datasets.IterableDataset)

    outputs, reports = [], []
    for data in (table, saved, stream):
        context = DataContext(seed=5)
        result = run_data_steps(data, parse_data_steps(STEPS), context)
        rows = list(result)  # a stream's counts fill in as it is read
        outputs.append([(r["image_id"], r["caption"], r["noise"], np.asarray(decode_image(r["image"])).tobytes())
                        for r in rows])
        reports.append(context.report)
        assert context.collator_options["caption_sampler"].k == 2
    assert outputs[0] == outputs[1] == outputs[2]
    kept = len(outputs[0])
    assert kept == 24  # "dog" (complexity 0) and "" are removed
    for report in reports:
        assert report["cat_filter"]["rows_removed"] == 16 and report["cat_filter"]["empty_captions"] == 8
        assert report["label_noise"]["rows_text_noise"] == sum("text" in row[2] for row in outputs[0])
    assert reports[0]["cat_filter"]["rows_in"] == 40 and reports[0]["cat_filter"]["rows_out"] == kept
    assert reports[0]["label_noise"]["rows_in"] == reports[0]["label_noise"]["rows_out"] == kept


def augmented_collator(processor, seed=0):
    return SiglipDataCollator(processor=processor, max_length=12, image_transform=ImageAugmentation(
        crop_scale=(0.3, 0.6), color_jitter=(0.4, 0.4, 0.4, 0.1), blur_sigma=(0.5, 1.5), seed=seed))


def test_augmentation_changes_with_the_epoch_repeats_with_the_seed_and_spares_evaluation():
    _, processor, plain, dataset = tiny_training_setup(n_train=8, image_size=16)
    rows = [dict(row) for row in dataset["train"]]
    collator = augmented_collator(processor)
    first = collator(rows)["pixel_values"]
    collator.set_epoch(1)
    second = collator(rows)["pixel_values"]
    again = augmented_collator(processor)(rows)["pixel_values"]
    other_seed = augmented_collator(processor, seed=1)(rows)["pixel_values"]
    unaugmented = plain.for_evaluation()(rows)["pixel_values"]  # evaluation: the processor's own pixels
    assert first.shape == unaugmented.shape
    for image in range(len(rows)):  # every image: a new crop each epoch, the same crop for the same seed
        assert not torch.equal(first[image], second[image]) and not torch.equal(first[image], other_seed[image])
    assert torch.equal(first, again)
    assert torch.equal(collator.for_evaluation()(rows)["pixel_values"], unaugmented)

    model = tiny_training_setup(n_train=8, image_size=16)[0]
    args = SiglipTrainingArguments(output_dir="unused", per_device_eval_batch_size=8, report_to="none", use_cpu=True)
    trainer = SiglipTrainer(model=model, args=args, data_collator=augmented_collator(processor),
                            eval_dataset=dataset["train"], processing_class=processor)
    evaluated = next(iter(trainer.get_eval_dataloader()))["pixel_values"]
    assert torch.equal(evaluated, unaugmented)
    assert trainer.data_collator.image_transform is not None  # training keeps its augmentation
