"""Evaluation on several processes equals evaluation on one, and `hf-siglip eval` on the saved weights.

Data shaped like users' (tests/data_fixtures.write_captioned_splits): 3 captions per row with duplicates across
rows, a label column for zero-shot, mixed .jpg / .png / greyscale, and an evaluation set (40 rows) that does not
divide into 2 processes x 16: the distributed sampler repeats 24 rows to even out the last batch.
"""

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import REPO, TINY, cli_env, launcher_binary
from data_fixtures import write_captioned_splits
from hf_siglip.training.trainer import _count_rows_once

TRAINING = {key: value for key, value in TINY.items() if not key.startswith("demo_")}
USERS_DATA = {**TRAINING, "per_device_train_batch_size": 4, "max_steps": 3, "per_device_eval_batch_size": 16,
              "disable_tqdm": "true", "zero_shot_classes": "circle square star"}
RECALLS = [f"{direction}_recall@{k}" for direction in ("i2t", "t2i") for k in (1, 5, 10)]


def _flags(values):
    return [item for name, value in values.items() for item in (f"--{name}", *str(value).split(" "))]


def _evaluate_saved(checkpoint, dataset, tmp_path):
    output = tmp_path / "metrics.json"
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "eval", "--checkpoint", str(checkpoint), "--dataset",
                          str(dataset), "--zero_shot_classes", "circle", "square", "star", "--output_file",
                          str(output)], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(output.read_text())


def test_two_process_evaluation_equals_one_process_and_hf_siglip_eval(tmp_path):
    data = write_captioned_splits(tmp_path / "data", n_train=32, n_test=40)
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29681"]
    command = [*torchrun, "-m", "hf_siglip", "train",
               *_flags({**USERS_DATA, "dataset": data, "output_dir": tmp_path / "two"})]
    two = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    at_training = json.loads((tmp_path / "two" / "eval_results.json").read_text())["metrics"]
    assert at_training["eval_images"] == 40 and at_training["eval_texts"] == 120  # each row once, not 64 / 192
    assert at_training["eval_i2t_queries_with_ties"] > 0  # "a circle" is many rows' caption

    saved = _evaluate_saved(tmp_path / "two", data, tmp_path)
    for name in RECALLS + ["zero_shot_top1"]:
        assert at_training[f"eval_{name}"] == pytest.approx(saved[name], abs=1e-6), name

    # the same weights evaluated by one process: a step at learning rate 0 leaves them as they are
    one = subprocess.run([sys.executable, "-m", "hf_siglip", "train", *_flags({
        **USERS_DATA, "dataset": data, "output_dir": tmp_path / "one", "model_name_or_path": tmp_path / "two",
        "max_steps": 1, "learning_rate": 0.0})], env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    by_one = json.loads((tmp_path / "one" / "eval_results.json").read_text())["metrics"]
    for name in RECALLS + ["loss", "images", "texts"]:
        assert by_one[f"eval_{name}"] == pytest.approx(at_training[f"eval_{name}"], rel=1e-5), name


def test_rows_repeated_by_the_sampler_count_once_with_their_own_captions():
    # rows 0-2 with 2, 1 and 3 captions; the sampler repeated rows 0 and 1 on another process
    gathered = {"row_index": torch.tensor([0, 1, 2, 0, 1]), "image_ids": torch.tensor([10, 11, 12, 10, 11]),
                "image_embeds": torch.arange(5.0)[:, None],
                "text_row_index": torch.tensor([0, 0, 1, 2, 2, 2, 0, 0, 1]),
                "text_ids": torch.tensor([10, 10, 11, 12, 12, 12, 10, 10, 11]),
                "text_embeds": torch.arange(9.0)[:, None]}
    once = _count_rows_once(gathered)
    assert once["row_index"].tolist() == [0, 1, 2] and once["image_embeds"].flatten().tolist() == [0, 1, 2]
    assert once["text_ids"].tolist() == [10, 10, 11, 12, 12, 12]
    assert once["text_embeds"].flatten().tolist() == [0, 1, 2, 3, 4, 5]
