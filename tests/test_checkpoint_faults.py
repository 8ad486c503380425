"""A checkpoint is complete or absent: kills during saves, damaged files, resuming into another folder.

`hf-siglip train` subprocesses at tiny sizes (tests/test_cli_runs.RESUMABLE: 12 steps, k=2 sampled captions,
augmentation), checkpoints every step so that a kill lands in a save.
"""

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from cli_helpers import cli_env, logged_losses, run_train, train_command
from hf_siglip.training.checkpoint_files import MANIFEST_NAME, checkpoint_problem, last_complete_checkpoint
from test_cli_runs import RESUMABLE, assert_same_weights

EVERY_STEP = {**RESUMABLE, "save_steps": 1}


def _kill_during_a_save(output_dir: Path, rng: random.Random, after: int, resume: bool) -> None:
    """Start the run and SIGKILL it while checkpoint-N (N > after) is being written: as soon as its folder
    appears, after a random delay of 0-30 ms."""
    values = {**EVERY_STEP, "save_total_limit": 3, "output_dir": output_dir,
              **({"resume_from_checkpoint": "true"} if resume else {})}
    process = subprocess.Popen(train_command(values), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    target = output_dir / f"checkpoint-{after + rng.randint(1, 3)}"
    deadline = time.time() + 240
    while not target.exists():
        assert process.poll() is None and time.time() < deadline, f"the run ended before {target.name}"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def test_kills_during_saves_never_block_resuming_and_the_run_ends_bit_for_bit(tmp_path):
    straight = run_train({**EVERY_STEP, "save_total_limit": 3, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    rng, killed = random.Random(0), tmp_path / "killed"
    _kill_during_a_save(killed, rng, after=1, resume=False)
    _kill_during_a_save(killed, rng, after=5, resume=True)  # killed again, after resuming
    resumed = run_train({**EVERY_STEP, "save_total_limit": 3, "output_dir": killed, "resume_from_checkpoint": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(killed) == logged_losses(tmp_path / "straight")
    assert_same_weights(killed, tmp_path / "straight")
    for folder in killed.glob("checkpoint-*"):  # every checkpoint left is complete
        assert checkpoint_problem(folder) is None


def test_incomplete_and_damaged_checkpoints_are_skipped_and_named(tmp_path):
    out = tmp_path / "out"
    first = run_train({**EVERY_STEP, "max_steps": 3, "output_dir": out})
    assert first.returncode == 0, first.stderr[-3000:]
    files = json.loads((out / "checkpoint-3" / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(files)

    # checkpoint-3 lost its manifest (a kill before it was written); checkpoint-2's optimizer was cut short
    (out / "checkpoint-3" / MANIFEST_NAME).unlink()
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    found, skipped = last_complete_checkpoint(out)
    assert found == str(out / "checkpoint-1")
    assert "checkpoint-3 is incomplete" in skipped[0] and "optimizer.pt is damaged: 100 bytes" in skipped[1]

    resumed = run_train({**EVERY_STEP, "max_steps": 3, "output_dir": out, "resume_from_checkpoint": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-3 is incomplete" in resumed.stderr and "optimizer.pt is damaged" in resumed.stderr
    assert len(logged_losses(out)) == 3  # steps 2 and 3 trained again from checkpoint-1

    # checkpoint-2 was rewritten by the resumed run: damage it again and name it
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    explicit = run_train({**EVERY_STEP, "output_dir": tmp_path / "other",
                          "resume_from_checkpoint": out / "checkpoint-2"})
    assert explicit.returncode != 0 and "optimizer.pt is damaged" in explicit.stderr.strip().splitlines()[-1]


def test_momentum_teacher_resumes_from_a_checkpoint_in_another_folder(tmp_path):
    teacher = {**EVERY_STEP, "max_steps": 4, "teacher_momentum": 0.9}
    straight = run_train({**teacher, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "momentum_teacher.safetensors" in json.loads(
        (tmp_path / "straight" / "checkpoint-2" / MANIFEST_NAME).read_text())["files"]
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", moved / "checkpoint-2")
    resumed = run_train({**teacher, "output_dir": tmp_path / "elsewhere",
                         "resume_from_checkpoint": moved / "checkpoint-2"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path / "elsewhere")[-2:] == logged_losses(tmp_path / "straight")[-2:]
    assert_same_weights(tmp_path / "elsewhere", tmp_path / "straight")
