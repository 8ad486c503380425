"""Runs users can trust from the command line: kill and resume, one seed twice, every launcher.

Each test drives `python -m hf_siglip train` in a subprocess at tiny sizes, as a user would.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_helpers import TINY, cli_env, flags, launcher_binary, logged_losses, run_train, train_command, warning_lines
from data_fixtures import write_image_folder

# 4 epochs of 3 steps, checkpoints every 4 steps (mid-epoch), k=2 of the demo's 4 captions sampled per epoch and
# augmented images: a resume has to restore the weights, optimizer, schedule, data order and the epoch that the
# caption sampler and the augmentation draw from.
RESUMABLE = {**TINY, "demo_train_size": 48, "max_steps": 12, "save_strategy": "steps", "save_steps": 4,
             "data_steps": '[{"caption_sampling": {"k": 2}}, {"image_augmentation": {"crop_scale": [0.5, 1.0], '
                           '"color_jitter": [0.3, 0.3, 0.3, 0.05]}}]',
             "eval_split": "None", "disable_tqdm": "true", "seed": 7}


def weights(output_dir: Path) -> dict:
    return load_file(str(output_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    worst = max((first[name] - second[name]).abs().max().item() for name in first)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_killed_run_resumed_from_the_command_line_matches_the_uninterrupted_run(tmp_path):
    straight = run_train({**RESUMABLE, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(train_command({**RESUMABLE, "output_dir": killed_dir}), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed_dir / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists()  # it really died mid-run
    for later in killed_dir.glob("checkpoint-*"):  # a checkpoint the kill may have cut in half
        if later.name != "checkpoint-4":
            shutil.rmtree(later)

    refused = run_train({**RESUMABLE, "output_dir": killed_dir})  # no resume flag: must not destroy checkpoint-4
    assert refused.returncode != 0
    assert "--resume_from_checkpoint" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    assert (killed_dir / "checkpoint-4" / "trainer_state.json").exists()

    resumed = run_train({**RESUMABLE, "output_dir": killed_dir, "resume_from_checkpoint": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(killed_dir) == logged_losses(tmp_path / "straight")  # bit for bit, all 12 steps
    assert len(logged_losses(killed_dir)) == 12
    assert_same_weights(killed_dir, tmp_path / "straight")


def test_resume_from_an_explicit_checkpoint_path_and_overwrite(tmp_path):
    first = run_train({**RESUMABLE, "max_steps": 4, "save_steps": 2, "output_dir": tmp_path / "a"})
    assert first.returncode == 0, first.stderr[-3000:]
    missing = run_train({**RESUMABLE, "output_dir": tmp_path / "b", "resume_from_checkpoint": tmp_path / "nowhere"})
    assert missing.returncode != 0 and "not a checkpoint folder" in missing.stderr
    nothing = run_train({**RESUMABLE, "output_dir": tmp_path / "c", "resume_from_checkpoint": "true"})
    assert nothing.returncode != 0 and "holds no checkpoint" in nothing.stderr

    resumed = run_train({**RESUMABLE, "max_steps": 4, "save_steps": 2, "output_dir": tmp_path / "b",
                         "resume_from_checkpoint": tmp_path / "a" / "checkpoint-2"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "a", tmp_path / "b")

    # a checkpoint is usable as it is: it carries the processor and the text length `hf-siglip eval` needs
    data = {key: TINY[key] for key in ("demo_train_size", "demo_test_size", "demo_image_size")}
    evaluated = subprocess.run([sys.executable, "-m", "hf_siglip", "eval", "--checkpoint",
                                str(tmp_path / "a" / "checkpoint-2"), *flags(data)], capture_output=True, text=True,
                               timeout=300, env=cli_env())
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "i2t_recall@1" in evaluated.stdout

    again = run_train({**RESUMABLE, "max_steps": 2, "save_strategy": "no", "output_dir": tmp_path / "a",
                       "overwrite_output_dir": "true"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list((tmp_path / "a").glob("checkpoint-*"))  # stale checkpoints gone with the old run


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = {}
    for name, seed in (("one", 3), ("two", 3), ("other", 4)):
        runs[name] = run_train({**TINY, "seed": seed, "output_dir": tmp_path / name, "eval_split": "None"})
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert logged_losses(tmp_path / "one") == logged_losses(tmp_path / "two")
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "one", tmp_path / "other")


TWO_PROCESSES = {**TINY, "use_cpu": "false", "max_steps": 3, "eval_split": "None", "disable_tqdm": "true",
                 "per_device_train_batch_size": 8}


def test_torchrun_trains_the_same_model_as_accelerate_launch(tmp_path):
    accelerate = [launcher_binary("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", "29641"]
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29642"]
    by_accelerate = run_train({**TWO_PROCESSES, "output_dir": tmp_path / "accelerate"}, accelerate,
                              env=cli_env(ACCELERATE_USE_CPU="1"))
    assert by_accelerate.returncode == 0, by_accelerate.stderr[-3000:]
    by_torchrun = run_train({**TWO_PROCESSES, "output_dir": tmp_path / "torchrun"}, torchrun)
    assert by_torchrun.returncode == 0, by_torchrun.stderr[-3000:]
    single = run_train({**TWO_PROCESSES, "per_device_train_batch_size": 16, "output_dir": tmp_path / "single"})
    assert single.returncode == 0, single.stderr[-3000:]

    assert logged_losses(tmp_path / "torchrun") == logged_losses(tmp_path / "accelerate")
    assert_same_weights(tmp_path / "torchrun", tmp_path / "accelerate")
    # and both train the one-process run of the same global batch: fp32 summation order differs, and Adam's
    # normalised step (about the learning rate, 2e-3, per step) can amplify that on near-zero gradients
    for two, one in zip(logged_losses(tmp_path / "torchrun"), logged_losses(tmp_path / "single")):
        assert two == pytest.approx(one, rel=1e-4)
    assert_same_weights(tmp_path / "torchrun", tmp_path / "single", atol=2e-3)


def test_a_world_the_trainer_does_not_know_stops_at_start(tmp_path):
    """torchrun with accelerate told not to use the CPU backend: the trainer would see 1 process of 2."""
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29643"]
    run = run_train({**TWO_PROCESSES, "output_dir": tmp_path / "out"}, torchrun,
                    env=cli_env(ACCELERATE_USE_CPU="false"))
    assert run.returncode != 0
    assert "has 2 processes but the trainer sees 1" in run.stderr and "accelerate launch" in run.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_quiet_run_whose_files_read_like_the_rest(tmp_path):
    run = run_train({**TINY, "output_dir": tmp_path / "out", "max_steps": 2, "save_strategy": "steps",
                     "save_steps": 1})
    assert run.returncode == 0, run.stderr[-3000:]
    assert warning_lines(run.stderr) == []
    report = json.loads((tmp_path / "out" / "eval_results.json").read_text())["data"]
    assert report["tokenizer_training"] == {"captions_dropped": 0}
    assert "Data steps" in (tmp_path / "out" / "README.md").read_text()
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-1"):  # weights as readable as the config
        assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    assert (tmp_path / "out" / "checkpoint-1" / "processor_config.json").exists()


def test_two_processes_skip_empty_batches_together(tmp_path):
    """Most images broken, 2 processes: steps where either process has nothing left are skipped by both (no hang)."""
    rows = [("good", ["a red square", "red"]), ("good", ["a blue circle", "blue"])] + [("garbage", ["broken"])] * 14
    write_image_folder(tmp_path / "data" / "train", rows)
    write_image_folder(tmp_path / "data" / "test", rows[:2] * 2, seed=1)
    accelerate = [launcher_binary("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", "29644"]
    settings = {key: value for key, value in TWO_PROCESSES.items() if not key.startswith("demo_")}
    run = run_train({**settings, "dataset": tmp_path / "data", "per_device_train_batch_size": 2, "max_steps": 8,
                     "eval_split": "test", "output_dir": tmp_path / "out"}, accelerate,
                    env=cli_env(ACCELERATE_USE_CPU="1"), timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "eval_results.json").read_text())["data"]
    assert report["train/rows_with_undecodable_image"] == 28  # both processes' counts, 2 epochs
    assert report["train/empty_batches_skipped"] >= 6
    assert report["train/rows_skipped_with_another_process_empty_batch"] >= 1  # a good batch beside an empty one


def test_run_with_a_momentum_teacher_and_concept_distillation_resumes_bit_for_bit(tmp_path):
    """The training signals that keep state beside the model (the EMA teacher, the concept-distillation head) come
    back from a checkpoint: the uninterrupted run's checkpoint-3 copied to a folder of its own (what a kill after it
    leaves; the kill itself is tested above), resumed from the command line into a fresh output folder, ends as the
    uninterrupted run (losses, the distillation loss, the weights)."""
    from data_fixtures import save_tiny_vit_teacher

    teacher = save_tiny_vit_teacher(tmp_path / "vit")
    settings = {**TINY, "demo_train_size": 48, "max_steps": 6, "save_strategy": "steps", "save_steps": 3,
                "eval_split": "None", "disable_tqdm": "true", "seed": 5, "teacher_momentum": 0.8,
                "concept_distillation_weight": 0.5,
                "data_steps": json.dumps([{"concept_targets": {"model": teacher}}, {"caption_sampling": {"k": 2}}]),
                "loss_config": json.dumps({"teacher_weight": 0.3})}
    straight = run_train({**settings, "output_dir": tmp_path / "straight"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "momentum_teacher.safetensors").exists() and (checkpoint / "concept_head.safetensors").exists()
    shutil.copytree(checkpoint, tmp_path / "moved" / "checkpoint-3")  # outside the resumed run's output_dir

    resumed = run_train({**settings, "output_dir": tmp_path / "resumed",
                         "resume_from_checkpoint": tmp_path / "moved" / "checkpoint-3"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def logged(output_dir, key):
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        return [entry[key] for entry in history if key in entry and "train_loss" not in entry]

    for key in ("loss", "concept_distillation_loss"):
        assert logged(tmp_path / "resumed", key) == logged(tmp_path / "straight", key), key
    assert len(logged(tmp_path / "resumed", "loss")) == 6
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight")
