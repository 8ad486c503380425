"""Bad tar shards through `hf-siglip train`, as they come: a tar cut mid-file, a 0-byte tar, a non-UTF-8 caption, a
tar cut on a member boundary (short: only its stats file tells). With --bad_shards skip each is named, skipped and
counted once in the data report (1 or 2 processes alike, and a resumed run does not stop at it); with
--bad_shards fail the run ends in one line naming the shard, on every process. A folder mixing .jpg and .png
round-trips through `hf-siglip shards` (also through datasets' own webdataset loader) and trains.
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cli_helpers import REPO, cli_env, flags, launcher_binary, logged_losses, run_train
from hf_siglip.data import load_image_text_dataset
from hf_siglip.data.shards import (
    ShardError,
    clear_shard_faults,
    expected_rows,
    load_webdataset_shards,
    shard_fault_report,
    shard_faults,
)
from test_shards import SHARD_TRAINING, make_shards

ERROR = "hf-siglip train: error: "


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


def cut_mid_member(path: Path, sample: int) -> None:
    """Cut inside the image of `sample` (3 members per sample: image, json, txt): the samples before it stay."""
    info = members(path)[3 * sample]
    path.write_bytes(path.read_bytes()[:info.offset_data + info.size // 2])


def cut_on_boundary(path: Path, sample: int) -> None:
    """Cut right before `sample`'s first header: a valid-looking tar that just ends early."""
    path.write_bytes(path.read_bytes()[:members(path)[3 * sample].offset])


def spoil_caption(path: Path, sample: int) -> None:
    """Rewrite the tar with `sample`'s .txt in Latin-1 bytes that are not UTF-8."""
    with tarfile.open(path) as archive:
        contents = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
    with tarfile.open(path, "w") as archive:
        for index, (info, payload) in enumerate(contents):
            if index == 3 * sample + 2:
                assert info.name.endswith(".txt")
                payload = b"caf\xe9 \xff\xfe"
                info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> Path:
    """5 train shards of 8 rows (one good, four bad: 21 rows readable, 18 missing, 1 undecodable) and a test/
    shard with one non-UTF-8 caption."""
    shards = make_shards(tmp_path_factory.mktemp("bad"), n_train=40, n_test=8, rows_per_shard=8)
    train = shards / "train"
    assert [expected_rows(str(train / f"0000{i}.tar")) for i in range(5)] == [8] * 5  # the writer's stats files
    cut_mid_member(train / "00001.tar", sample=1)  # 1 row left, 7 missing
    (train / "00002.tar").write_bytes(b"")  # 8 missing
    spoil_caption(train / "00003.tar", sample=2)  # 7 rows
    cut_on_boundary(train / "00004.tar", sample=5)  # 5 rows, 3 missing
    spoil_caption(shards / "test" / "00000.tar", sample=0)
    return shards


EXPECTED = {"train/shards_unreadable": 2, "train/shards_short": 1, "train/rows_missing_from_shards": 18,
            "train/rows_with_undecodable_member": 1, "evaluation/rows_with_undecodable_member": 1}
BAD_NAMES = ("train/00001.tar", "train/00002.tar", "train/00003.tar", "train/00004.tar", "test/00000.tar")


def shard_counts(output_dir: Path) -> dict:
    report = json.loads((output_dir / "eval_results.json").read_text())["data"]
    return {key: value for key, value in report.items() if "shard" in key or "undecodable_member" in key}


def test_the_reader_skips_names_and_notes_each_fault(bad_shards, caplog):
    clear_shard_faults()
    stream = load_webdataset_shards(bad_shards, split="train")
    with caplog.at_level("WARNING"):
        rows = list(stream)
        assert len(list(stream)) == len(rows) == 8 + 1 + 7 + 5  # read twice: each fault named and noted once
    for name in BAD_NAMES[:4]:
        assert sum(name in record.getMessage() for record in caplog.records) == 1, name
    train_counts = {key: value for key, value in EXPECTED.items() if key.startswith("train/")}
    assert shard_fault_report(shard_faults()) == train_counts
    with pytest.raises(ShardError, match=r"bad shard .*train/00001\.tar: unexpected end of data after 1 row"):
        list(load_webdataset_shards(bad_shards, split="train", bad_shards="fail"))
    # the evaluation split alone: the train shards are not read, nor written to the Arrow cache
    evaluation = load_webdataset_shards(bad_shards, split="test", streaming=False)
    assert len(evaluation) == 7 and evaluation.features["image"].decode is False
    cached = Path(evaluation.cache_files[0]["filename"]).parent.glob("*.arrow")
    assert sum(datasets.Dataset.from_file(str(file)).num_rows for file in cached) == 8  # 7 rows + 1 fault marker
    with pytest.raises(ShardError, match=r"test/00000\.tar: 000000000\.txt is not UTF-8"):  # from the cache too
        load_webdataset_shards(bad_shards, split="test", streaming=False, bad_shards="fail")


def test_bad_shards_are_skipped_counted_and_resumed_past_on_one_process(bad_shards, tmp_path):
    values = {**SHARD_TRAINING, "dataset": bad_shards, "per_device_train_batch_size": 8, "max_steps": 4,
              "save_strategy": "steps", "save_steps": 2, "disable_tqdm": "true", "seed": 3}
    straight = run_train({**values, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in BAD_NAMES:
        assert name in straight.stderr, name
    assert shard_counts(tmp_path / "straight") == EXPECTED
    resumed = run_train({**values, "output_dir": tmp_path / "resumed",
                         "resume_from_checkpoint": tmp_path / "straight" / "checkpoint-2"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")
    assert shard_counts(tmp_path / "resumed") == EXPECTED

    failed = run_train({**values, "output_dir": tmp_path / "failed", "bad_shards": "fail"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith(f"{ERROR}bad shard ")
    assert "test/00000.tar: 000000000.txt is not UTF-8" in failed.stderr  # the evaluation split is read first


def torchrun(values: dict, port: int) -> subprocess.CompletedProcess:
    command = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m", "hf_siglip",
               "train", *flags({**values, "use_cpu": "false", "disable_tqdm": "true"})]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=600, cwd=REPO)


def test_two_processes_skip_and_count_alike_or_both_fail_in_one_line(bad_shards, tmp_path):
    values = {**SHARD_TRAINING, "dataset": bad_shards, "per_device_train_batch_size": 4, "max_steps": 3,
              "dataloader_num_workers": 1}
    run = torchrun({**values, "output_dir": tmp_path / "skip"}, 29661)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in BAD_NAMES:
        assert name in run.stderr, name
    assert shard_counts(tmp_path / "skip") == EXPECTED  # each fault once, whichever process met it

    # a tokenizer of its own: the new model's tokenizer would read every shard on every process before training
    failing = {**values, "eval_split": "None", "bad_shards": "fail", "tokenizer_name_or_path": tmp_path / "skip"}
    run = torchrun({**failing, "output_dir": tmp_path / "fail"}, 29662)
    assert run.returncode != 0
    assert "Connection closed by peer" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 2 and all("bad shard " in line and "train/0000" in line for line in lines), run.stderr[-3000:]


def test_a_folder_of_jpg_and_png_round_trips_through_shards_and_trains(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as handle:
        for index in range(24):
            name = f"{index:03d}.{'png' if index % 3 else 'jpg'}"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
            handle.write(json.dumps({"file_name": name, "caption": f"picture number {index}"}) + "\n")
    written = subprocess.run([sys.executable, "-m", "hf_siglip", "shards", str(folder), str(tmp_path / "shards"),
                              "--rows-per-shard", "8"], capture_output=True, text=True, env=cli_env(), timeout=300,
                             cwd=REPO)
    assert written.returncode == 0, written.stderr[-3000:]
    files = sorted(str(path) for path in (tmp_path / "shards").glob("*.tar"))
    # datasets' own webdataset loader takes them (every sample has the same members)...
    raw = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    assert len(raw) == 24 and isinstance(raw.features["jpg"], datasets.Image)
    assert [image.size for image in raw["jpg"]] == [(16, 16)] * 24
    # ... and every image keeps its own bytes
    rows = list(load_image_text_dataset(tmp_path / "shards"))
    originals = load_image_text_dataset(folder)
    assert [row["image"]["bytes"] for row in rows] == [(folder / Path(image["path"]).name).read_bytes()
                                                       for image in originals["image"]]
    run = run_train({**SHARD_TRAINING, "dataset": tmp_path / "shards", "per_device_train_batch_size": 8,
                     "max_steps": 2, "eval_split": "None", "output_dir": tmp_path / "out"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "eval_results.json").read_text())["data"]
    assert not any("undecodable" in key or "shard" in key for key in report), report
