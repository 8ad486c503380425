"""Webdataset tar shards (img2dataset's layout): written by `hf-siglip shards`, streamed by `hf-siglip train`.

Real JPEG files go in; two gloo processes train over the shards, each reading its own, and every row is trained
on exactly once per epoch; a resumed stream continues mid-epoch exactly where the uninterrupted run was.
"""

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from cli_helpers import REPO, TINY, cli_env, flags, launcher_binary, logged_losses, run_train
from hf_siglip.data import load_image_text_dataset, make_demo_dataset
from hf_siglip.data.shards import image_id_of_key, is_shard_source, load_webdataset_shards
from test_cli_runs import assert_same_weights

RECORDER = REPO / "tests" / "scripts" / "train_recording_rows.py"
SHARD_TRAINING = {key: value for key, value in TINY.items() if not key.startswith("demo_")}


def write_jpeg_folder(root: Path, n_train: int, n_test: int) -> Path:
    """The demo's shapes as real JPEG files in train/ and test/ folders with metadata.jsonl (captions, label)."""
    splits = make_demo_dataset(n_train=n_train, n_test=n_test, image_size=16, seed=0)
    for split, rows in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as handle:
            for index, row in enumerate(rows):
                row["image"].convert("RGB").save(folder / f"{index:04d}.jpg", quality=90)
                handle.write(json.dumps({"file_name": f"{index:04d}.jpg", "caption": row["caption"],
                                         "label": row["label"]}) + "\n")
    return root


def make_shards(tmp_path: Path, n_train: int, n_test: int, rows_per_shard: int) -> Path:
    folder = write_jpeg_folder(tmp_path / "folder", n_train, n_test)
    written = subprocess.run([sys.executable, "-m", "hf_siglip", "shards", str(folder), str(tmp_path / "shards"),
                              "--rows-per-shard", str(rows_per_shard)], capture_output=True, text=True,
                             env=cli_env(), timeout=300, cwd=REPO)
    assert written.returncode == 0, written.stderr[-3000:]
    assert f"train: {n_train} rows" in written.stdout
    return tmp_path / "shards"


def recorded(rows_file: Path) -> list[dict]:
    return [json.loads(line) for line in rows_file.read_text().splitlines()]


def test_shards_hold_the_folders_jpeg_bytes_and_read_back_as_a_stream(tmp_path):
    shards = make_shards(tmp_path, n_train=20, n_test=6, rows_per_shard=8)
    assert sorted(p.name for p in (shards / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert is_shard_source(shards) and is_shard_source(shards / "train" / "00000.tar")
    assert not is_shard_source(tmp_path / "folder")
    with tarfile.open(shards / "train" / "00001.tar") as archive:
        names = archive.getnames()
        jpeg = archive.extractfile("000000008.jpg").read()
    assert names[:3] == ["000000008.jpg", "000000008.json", "000000008.txt"]
    assert jpeg == (tmp_path / "folder" / "train" / "0008.jpg").read_bytes()  # copied, not re-encoded

    stream = load_image_text_dataset(shards)  # the train split, streamed
    assert stream.n_shards == 3 and stream.column_names[:3] == ["image", "caption", "image_id"]
    rows = list(stream)
    folder = load_image_text_dataset(tmp_path / "folder", split="train")
    assert [row["image_id"] for row in rows] == list(range(20))
    assert [row["caption"] for row in rows] == folder["caption"]
    assert [row["label"] for row in rows] == folder["label"]
    assert rows[8]["image"]["bytes"] == jpeg
    evaluation = load_webdataset_shards(shards, split="test", streaming=False)
    assert len(evaluation) == 6 and evaluation.features["image"].decode is False


def test_keys_become_ids_and_odd_shards_fail_clearly(tmp_path):
    assert image_id_of_key("000000123") == 123
    assert image_id_of_key("cat_photo") == image_id_of_key("cat_photo") != image_id_of_key("dog_photo")
    assert 0 <= image_id_of_key("cat_photo") < 2 ** 63
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:  # captions but no image member
        for name, payload in (("a.txt", b"a cat"), ("b.txt", b"a dog")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with pytest.raises(KeyError, match="no image member"):
        load_webdataset_shards(tmp_path)


def test_shards_without_max_steps_are_refused_before_reading(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")  # never opened: the configuration fails first
    run = run_train({**SHARD_TRAINING, "max_steps": -1, "dataset": tmp_path / "shards",
                     "output_dir": tmp_path / "out"})
    assert run.returncode != 0 and "set max_steps" in run.stderr


def test_two_processes_read_their_own_shards_and_see_every_row_once_per_epoch(tmp_path):
    shards = make_shards(tmp_path, n_train=32, n_test=8, rows_per_shard=8)  # 4 shards, 2 per process
    rows_file = tmp_path / "rows.jsonl"
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29651"]
    values = {**SHARD_TRAINING, "use_cpu": "false", "dataset": shards, "output_dir": tmp_path / "out",
              "per_device_train_batch_size": 4, "max_steps": 8, "dataloader_num_workers": 2,
              "disable_tqdm": "true"}
    run = subprocess.run([*torchrun, str(RECORDER), str(rows_file), *flags(values)], capture_output=True, text=True,
                         env=cli_env(), timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = recorded(rows_file)
    assert len(steps) == 16  # 8 steps x 2 processes: 4 batches of 4 rows each per process and epoch
    for epoch in (0, 1):
        seen = Counter(i for step in steps if step["epoch"] == epoch for i in step["ids"])
        assert sorted(seen) == list(range(32)) and set(seen.values()) == {1}, f"epoch {epoch}: {seen}"
    for rank in (0, 1):  # each process read whole shards of its own (rows 8k..8k+7), in another order per epoch
        mine = [sorted(i for step in steps if step["rank"] == rank and step["epoch"] == e for i in step["ids"])
                for e in (0, 1)]
        assert all(len({i // 8 for i in ids}) == 2 for ids in mine)
    orders = [[i for step in steps if step["epoch"] == e for i in step["ids"]] for e in (0, 1)]
    assert orders[0] != orders[1]  # shard order and the shuffle buffer change per epoch
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["metrics"]["eval_i2t_recall@1"] > 0  # evaluated on the test/ shards (8 images)


def test_unequal_shards_end_each_epoch_together(tmp_path):
    """Shards of 8, 8 and 4 rows on 2 processes: one reads 16 rows, the other 4. The epoch ends for both when the
    shorter runs out (no hang, no row twice in an epoch), and the cut is counted."""
    shards = make_shards(tmp_path, n_train=20, n_test=8, rows_per_shard=8)
    rows_file = tmp_path / "rows.jsonl"
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29652"]
    values = {**SHARD_TRAINING, "use_cpu": "false", "dataset": shards, "output_dir": tmp_path / "out",
              "per_device_train_batch_size": 4, "max_steps": 3, "stream_shuffle_buffer_size": 0,
              "eval_split": "None", "disable_tqdm": "true"}
    run = subprocess.run([*torchrun, str(RECORDER), str(rows_file), *flags(values)], capture_output=True, text=True,
                         env=cli_env(), timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = recorded(rows_file)
    assert [step["epoch"] for step in steps if step["rank"] == 0] == [0, 1, 2]  # one batch each: 4 rows
    for epoch in (0, 1, 2):
        ids = [i for step in steps if step["epoch"] == epoch for i in step["ids"]]
        assert len(ids) == len(set(ids)) == 8
    report = json.loads((tmp_path / "out" / "eval_results.json").read_text())["data"]
    # the longer process held its next batch when epochs 0 and 1 ended (training stops before epoch 2 ends)
    assert report["train/batches_dropped_at_uneven_epoch_end"] == 2


def test_a_resumed_stream_continues_mid_epoch_like_the_uninterrupted_run(tmp_path):
    shards = make_shards(tmp_path, n_train=32, n_test=8, rows_per_shard=8)
    values = {**SHARD_TRAINING, "dataset": shards, "per_device_train_batch_size": 8, "max_steps": 8,
              "save_strategy": "steps", "save_steps": 6, "eval_split": "None", "disable_tqdm": "true", "seed": 5,
              "stream_shuffle_buffer_size": 16,
              "data_steps": '[{"caption_sampling": {"k": 2}}]'}  # sampled captions depend on the stream epoch too
    straight = run_train({**values, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    state = json.loads((tmp_path / "straight" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["StreamPosition"]["attributes"] == {"epoch": 1, "batches": 2}

    resumed = run_train({**values, "output_dir": tmp_path / "resumed",
                         "resume_from_checkpoint": tmp_path / "straight" / "checkpoint-6"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight")


def test_shards_stream_through_concept_distillation_and_teacher_mining(tmp_path):
    """Tar shards streamed through the concept_targets step (computed lazily as rows are read), with the momentum
    teacher mining: the distillation loss and the mined pairs are logged, and the saved model has no head."""
    from safetensors.torch import load_file

    from data_fixtures import save_tiny_vit_teacher

    shards = make_shards(tmp_path, n_train=48, n_test=16, rows_per_shard=16)
    teacher = save_tiny_vit_teacher(tmp_path / "vit")
    run = run_train({**SHARD_TRAINING, "dataset": shards, "max_steps": 3, "output_dir": tmp_path / "out",
                     "data_steps": json.dumps([{"concept_targets": {"model": teacher}}]),
                     "concept_distillation_weight": 1.0, "teacher_momentum": 0.9,
                     "loss_config": json.dumps({"mine_with": "teacher", "mine_text_text": 0.999,
                                                "mined_pairs": "ignore"})})
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry and "train_loss" not in entry]
    assert len(logged) == 3
    assert all(entry["concept_distillation_loss"] > 0 and "mined_positives_per_image" in entry for entry in logged)
    assert not any(name.startswith("concept_head") for name in load_file(str(tmp_path / "out" / "model.safetensors")))
