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
from PIL import Image

import hf_siglip as hs
from cli_helpers import REPO, cli_env, flags
from data_fixtures import PHOTO_CLASSES, make_processor, write_photo_folder
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


def _run(command: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_siglip", *command], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=cli_env())


def _evaluate(checkpoint: Path, output: Path, *extra) -> tuple[str, dict]:
    done = _run(["eval", "--checkpoint", str(checkpoint), "--output_file", str(output), *extra])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[0], json.loads(output.read_text())


def _evaluate_here(capsys, checkpoint: Path, output: Path, *extra) -> tuple[str, dict]:
    from hf_siglip.cli.main import main as cli_main

    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--output_file", str(output), *extra]) == 0
    return capsys.readouterr().out.splitlines()[0], json.loads(output.read_text())


def _expected_hit(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Probability that a positive is among the k best when tied scores come in a random order (counted here)."""
    best = scores[positive].max()
    above = int(((scores > best) & ~positive).sum())
    tied_negatives, tied_positives = int(((scores == best) & ~positive).sum()), int(((scores == best) & positive).sum())
    places = k - above
    if places <= 0:
        return 0.0
    if places > tied_negatives:
        return 1.0
    return 1.0 - math.comb(tied_negatives, places) / math.comb(tied_negatives + tied_positives, places)


def independent_metrics(checkpoint: Path, test_folder: Path, classes, templates) -> dict:
    """Recall@k and zero-shot top-1 from plain transformers: `SiglipModel`, the saved image processor and tokenizer,
    every file opened by PIL in full; each distinct caption embedded once (so duplicates tie exactly)."""
    from transformers import AutoTokenizer, SiglipImageProcessorPil, SiglipModel

    model = SiglipModel.from_pretrained(checkpoint).eval()
    image_processor = SiglipImageProcessorPil.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = [json.loads(line) for line in (test_folder / "metadata.jsonl").read_text().splitlines()]

    def texts(strings):
        tokens = tokenizer(strings, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="pt")
        with torch.no_grad():
            output = model.get_text_features(input_ids=tokens["input_ids"])
        return torch.nn.functional.normalize(getattr(output, "pooler_output", output), dim=-1).numpy()

    pixels = image_processor(images=[Image.open(test_folder / row["file_name"]).convert("RGB") for row in rows],
                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels)
    images = torch.nn.functional.normalize(getattr(output, "pooler_output", output), dim=-1).numpy()
    captions = [(index, caption) for index, row in enumerate(rows) for caption in row["caption"]]
    distinct = sorted({caption for _, caption in captions})
    caption_embeds = texts(distinct)[[distinct.index(caption) for _, caption in captions]]
    scores = images.astype(np.float64) @ caption_embeds.astype(np.float64).T
    matches = np.array([[owner == index for owner, _ in captions] for index in range(len(rows))])
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"i2t_recall@{k}"] = np.mean([_expected_hit(scores[i], matches[i], k) for i in range(len(rows))])
        metrics[f"t2i_recall@{k}"] = np.mean([_expected_hit(scores[:, j], matches[:, j], k)
                                              for j in range(len(captions))])
    prompts = texts([template.format(name) for name in classes for template in templates])
    classifier = prompts.reshape(len(classes), len(templates), -1).mean(axis=1)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    predicted = (images @ classifier.T).argmax(axis=1)
    metrics["zero_shot_top1"] = float(np.mean(predicted == np.array([row["label"] for row in rows])))
    return metrics


def test_hf_siglip_eval_of_a_trained_folder_repeats_the_trainings_evaluation(photos, tmp_path, capsys):
    """Trained on an imagefolder of real photos with zero-shot classes: `hf-siglip eval --checkpoint out`, no data
    flag, evaluates on the recorded dataset, split, classes and templates and gives the training's numbers; so does
    an independent evaluator; flags override the record; checkpoints carry it too."""
    out = tmp_path / "out"
    trained = _run(["train", "--dataset", str(photos), "--output_dir", str(out), "--save_strategy", "steps",
                    "--save_steps", "3", *flags(TINY_PHOTO_RUN), *ZERO_SHOT])
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((out / "hf_siglip_eval.json").read_text())
    assert record["dataset"] == str(photos) and record["eval_split"] == "test" and record["max_length"] == 12
    assert record["zero_shot_classes"] == PHOTO_CLASSES
    assert record["zero_shot_templates"] == ["a photo of the {}", "a {}"]
    assert json.loads((out / "checkpoint-3" / "hf_siglip_eval.json").read_text()) == record

    first_line, evaluated = _evaluate(out, tmp_path / "eval.json")
    assert first_line.startswith(f"Evaluated {out} on {photos}, split 'test': 20 images, 40 captions, 4 zero-shot "
                                 "classes"), first_line
    training = json.loads((out / "eval_results.json").read_text())["metrics"]
    compared = [name for name in evaluated if f"eval_{name}" in training]
    assert {"i2t_recall@5", "t2i_recall@10", "zero_shot_top1", "images", "texts"} <= set(compared)
    for name in compared:
        assert evaluated[name] == pytest.approx(training[f"eval_{name}"], abs=1e-6), name

    independent = independent_metrics(out, photos / "test", PHOTO_CLASSES, ["a photo of the {}", "a {}"])
    for name, value in independent.items():
        assert evaluated[name] == pytest.approx(value, abs=1e-6), name

    # flags override the record one by one; the checkpoint folder has its own copy (in-process: quicker)
    first_line, on_train = _evaluate_here(capsys, out / "checkpoint-3", tmp_path / "train.json", "--eval_split",
                                          "train", "--zero_shot_templates", "{}")
    assert f"on {photos}, split 'train': 24 images, 48 captions, 4 zero-shot classes" in first_line
    assert "flags for eval_split, zero_shot_templates" in first_line
    assert on_train["images"] == 24 and on_train["zero_shot_classes"] == 4


def test_a_checkpoint_without_the_record_asks_for_a_dataset(photos, tmp_path, capsys):
    from data_fixtures import make_tiny_siglip
    from hf_siglip.cli.main import main as cli_main

    processor = make_processor(image_size=32, words=CAPTION_WORDS)
    processor.tokenizer.model_max_length = 12
    make_tiny_siglip(len(processor.tokenizer), image_size=32).save_pretrained(tmp_path / "native")
    processor.save_pretrained(tmp_path / "native")
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "native")]) == 2  # a usage error
    output = capsys.readouterr()
    assert output.out == "" and len(output.err.splitlines()) == 1  # one line, no traceback
    assert output.err.startswith(f"hf-siglip eval: error: {tmp_path / 'native'} holds no hf_siglip_eval.json")
    assert "--dataset" in output.err

    first_line, metrics = _evaluate_here(capsys, tmp_path / "native", tmp_path / "m.json", "--dataset", str(photos))
    assert first_line.startswith(f"Evaluated {tmp_path / 'native'} on {photos}, split 'test': 20 images, 40 captions, "
                                 "no zero-shot classes (settings from flags)"), first_line
    assert metrics["zero_shot_classes"] == 0 and "zero_shot_top1" not in metrics


def test_a_demo_checkpoint_evaluates_on_the_demo_it_was_trained_on(tmp_path, capsys):
    from cli_helpers import TINY
    from hf_siglip.cli.main import main as cli_main

    assert cli_main(["train", *flags({**TINY, "demo_test_size": 24, "output_dir": tmp_path / "demo"})]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "demo"), "--output_file", str(tmp_path / "m.json")]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"Evaluated {tmp_path / 'demo'} on demo, split 'test': 24 images, "), first_line
    assert "30 zero-shot classes" in first_line
    evaluated = json.loads((tmp_path / "m.json").read_text())
    training = json.loads((tmp_path / "demo" / "eval_results.json").read_text())["metrics"]
    for name in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@5", "zero_shot_top1", "zero_shot_top5", "images"):
        assert evaluated[name] == pytest.approx(training[f"eval_{name}"], abs=1e-6), name
