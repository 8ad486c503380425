"""NaN and infinity are never reported as numbers (decision 12 in docs/ARCHITECTURE.md; issue 20 item 2).

A diverging run (a learning rate of 1e20: the weights overflow after one step) stops with one line naming the
step, or with `on_nonfinite: skip` skips and counts the steps; corrupt weights (random bytes written over part of
`model.safetensors` after its header) are refused by every loader, naming the file and tensor; metrics files are
valid JSON. Runs go through `hf-siglip` in a subprocess, as a user would run them.
"""

import json
import math
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import hf_siglip as hs
from cli_helpers import REPO, TINY, cli_env, flags, launcher_binary, run_train
from conftest import tiny_training_setup
from hf_siglip import cli
from hf_siglip.evaluation import to_json
from hf_siglip.training.finite import NonFiniteError, nonfinite_in_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "nonfinite_tiny.py"
# constant 1e20 from the first step: step 1's update throws every weight to ~1e20, the next forward overflows
DIVERGING = {**TINY, "learning_rate": 1e20, "lr_scheduler_type": "constant", "warmup_steps": 0, "max_steps": 4,
             "logit_scale_max": 100,  # t stays finite (a weight: a non-finite t stops even with on_nonfinite skip)
             "disable_tqdm": "true"}
MESSAGE = re.compile(r"^hf-siglip train: error: training diverged at step (\d+): loss is nan, gradient norm is nan "
                     r"\(t=\S+, b=\S+\); the step was not applied: lower --learning_rate \(now 1e\+20\)")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"hf-siglip \w+: error: ", line)]


def logged_steps(stdout: str) -> int:
    """Training logs printed (logging_steps=1: one per applied optimizer step)."""
    return sum(1 for line in stdout.splitlines() if line.startswith("{'loss'"))


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in load_file(str(path)).values())


# --- a diverging run ---------------------------------------------------------------------------------------------


def test_diverging_run_stops_with_one_line_naming_the_step(tmp_path):
    out = tmp_path / "out"
    run = run_train({**DIVERGING, "output_dir": out})  # the demo's held-out split is evaluated at the end
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and MESSAGE.match(lines[0]), run.stderr[-3000:]
    assert run.stderr.rstrip().splitlines()[-1] == lines[0]  # the last thing the user reads
    step = int(MESSAGE.match(lines[0]).group(1))
    assert step == logged_steps(run.stdout) + 1 >= 2  # the steps before it were logged with finite losses
    assert "--on_nonfinite skip" in lines[0]
    # nothing claims anything: no weights, no card, no metrics
    for name in ("README.md", "eval_results.json", "model.safetensors", "trainer_state.json"):
        assert not (out / name).exists(), name


def test_skip_setting_finishes_counts_the_steps_and_leaves_the_weights(tmp_path):
    skip = run_train({**DIVERGING, "on_nonfinite": "skip", "eval_split": "None", "output_dir": tmp_path / "skip"})
    assert skip.returncode == 0, skip.stderr[-3000:]
    out = tmp_path / "skip"
    report = json.loads((out / "eval_results.json").read_text())  # strict JSON below: no bare NaN anywhere
    json.loads((out / "eval_results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    skipped = report["data"]["train/nonfinite_steps_skipped"]
    applied = DIVERGING["max_steps"] - skipped
    assert skipped >= 1 and applied >= 1
    warnings = [line for line in skip.stderr.splitlines() if "skipped, no weight update" in line]
    assert len(warnings) == skipped and all("loss is nan" in line for line in warnings)
    logs = [entry for entry in history(out) if "loss" in entry]
    assert len(logs) == DIVERGING["max_steps"]
    for entry in logs:  # a skipped step's loss shows as nan (transformers' filter would have logged 0.0)
        assert math.isnan(entry["loss"]) == (entry["step"] > applied), entry
        assert entry.get("nonfinite_steps_skipped", 0) == max(0, entry["step"] - applied)
    assert f"| train/nonfinite_steps_skipped | {skipped} |" in (out / "README.md").read_text()
    assert all_finite(out / "model.safetensors")

    # skipped steps change nothing: the weights are those of a run that stopped after the applied steps
    short = run_train({**DIVERGING, "max_steps": applied, "eval_split": "None", "output_dir": tmp_path / "short"})
    assert short.returncode == 0, short.stderr[-3000:]
    skipped_weights, short_weights = load_file(str(out / "model.safetensors")), \
        load_file(str(tmp_path / "short" / "model.safetensors"))
    assert skipped_weights.keys() == short_weights.keys()
    for name, tensor in skipped_weights.items():
        assert torch.equal(tensor, short_weights[name]), name


def test_skip_setting_does_not_evaluate_a_model_with_nan_embeddings(tmp_path):
    """Skipping leaves the weights finite but ~1e20 here: the towers' outputs overflow, and the evaluation refuses."""
    out = tmp_path / "out"
    run = run_train({**DIVERGING, "on_nonfinite": "skip", "output_dir": out})
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1, lines
    assert re.match(r"hf-siglip train: error: \d+ of \d+ image embeds are not finite", lines[0]), lines
    assert not (out / "README.md").exists() and not (out / "eval_results.json").exists()


# --- corrupt weights ---------------------------------------------------------------------------------------------


def write_garbage_after_header(path: Path, size: int = 4096) -> set[str]:
    """Overwrite `size` bytes in the middle of the tensor data of a safetensors file with random bytes (the header
    stays intact, so the file still loads). Returns the tensors that now hold NaN or infinity, found independently."""
    original = path.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    start = header_end + (len(original) - header_end - size) // 2
    assert start > header_end
    for seed in range(10):  # random float32 bytes are non-finite 1 time in 256: the first seeds give some
        data = bytearray(original)
        data[start:start + size] = random.Random(seed).randbytes(size)
        path.write_bytes(bytes(data))
        bad = {name for name, tensor in load_file(str(path)).items()
               if tensor.is_floating_point() and not torch.isfinite(tensor).all()}
        if bad:
            return bad
    raise AssertionError("no seed gave a non-finite value")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by `hf-siglip train`, with a checkpoint of its last step."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run = run_train({**TINY, "eval_split": "None", "save_strategy": "steps", "save_steps": 2, "disable_tqdm": "true",
                     "output_dir": out})
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture
def corrupt(trained, tmp_path):
    """(a copy of the trained folder with garbage in model.safetensors, the tensors the garbage made non-finite)."""
    folder = tmp_path / "corrupt"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    return folder, write_garbage_after_header(folder / "model.safetensors")


def assert_names_the_file(stderr: str, path: Path, bad_tensors: set[str], consequence: str) -> None:
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    match = re.match(rf"hf-siglip \w+: error: {re.escape(str(path))} holds NaN or infinite values in (\d+) "
                     r"tensor\(s\), first "
                     r"(\S+) \((\d+) of \d+ values\): the file is corrupt or was saved from a diverged run; (.*)$",
                     lines[0])
    assert match, lines[0]
    assert int(match.group(1)) == len(bad_tensors) and match.group(2) in bad_tensors
    assert match.group(4) == consequence


def test_hf_siglip_eval_refuses_corrupt_weights_naming_the_file(corrupt):
    folder, bad = corrupt
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "eval", "--checkpoint", str(folder)], env=cli_env(),
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 1, run.stderr[-3000:]
    assert_names_the_file(run.stderr, folder / "model.safetensors", bad, "not evaluated")
    assert "recall" not in run.stdout


def test_training_from_corrupt_weights_is_refused_naming_the_file(corrupt, tmp_path):
    folder, bad = corrupt
    run = run_train({**TINY, "model_name_or_path": folder, "eval_split": "None", "output_dir": tmp_path / "out"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert_names_the_file(run.stderr, folder / "model.safetensors", bad, "not loaded")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_resume_from_a_corrupt_checkpoint_is_refused_naming_the_file(trained, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(trained / "checkpoint-2", checkpoint)
    bad = write_garbage_after_header(checkpoint / "model.safetensors")
    run = run_train({**TINY, "max_steps": 3, "eval_split": "None", "resume_from_checkpoint": checkpoint,
                     "output_dir": tmp_path / "out"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert_names_the_file(run.stderr, checkpoint / "model.safetensors", bad, "not resumed")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_push_refuses_corrupt_weights_before_creating_the_repository(corrupt, monkeypatch, capsys):
    from huggingface_hub import HfApi

    import hf_siglip.hub

    folder, bad = corrupt
    calls = []
    monkeypatch.setattr(hf_siglip.hub, "check_hub_access", lambda token=None: None)  # as if logged in
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append("create_repo"))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, *a, **k: calls.append("create_commit"))
    assert cli.main(["push", str(folder), "you/siglip"]) == 1
    assert_names_the_file(capsys.readouterr().err, folder / "model.safetensors", bad, "not loaded")
    assert calls == []


def test_a_sharded_checkpoint_names_the_shard_and_tensor(tmp_path):
    model, _, _, _ = tiny_training_setup()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    victim = tmp_path / shards[1]
    bad = write_garbage_after_header(victim)
    assert {(Path(path).name, name) for path, name, _, _ in nonfinite_in_checkpoint(tmp_path)} == \
        {(victim.name, name) for name in bad}  # the other shards are clean
    with pytest.raises(NonFiniteError, match=rf"^{re.escape(str(victim))} holds NaN or infinite values in "
                                             rf"{len(bad)} tensor\(s\), first (\S+) ") as error:
        hs.load_dual_encoder(str(tmp_path))
    assert re.search(r"first (\S+) ", str(error.value)).group(1) in bad


def test_a_model_with_nan_weights_gets_no_card_and_no_push(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    import hf_siglip.hub

    model, processor, collator, dataset = tiny_training_setup()
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path), data_collator=collator,
                               train_dataset=dataset["train"])
    with torch.no_grad():
        model.text_model.final_layer_norm.weight[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"text_model\.final_layer_norm\.weight \(1 of 32 values\).*no model "
                                             r"card is written for it$"):
        trainer.create_model_card()
    assert not (tmp_path / "out" / "README.md").exists()
    calls = []
    monkeypatch.setattr(hf_siglip.hub, "check_hub_access", lambda token=None: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append("create_repo"))
    with pytest.raises(NonFiniteError, match="not pushed$"):
        hf_siglip.hub.push_to_hub(model, "you/siglip", processor)
    assert calls == []


# --- the trainer, in process: what a skipped step leaves -----------------------------------------------------------


@dataclass
class PoisonedCollator(hs.SiglipDataCollator):
    """The real collator; batch number `poisoned_call` (1-based) gets NaN images, as a broken decoder might give."""

    poisoned_call: int = 0
    calls: int = 0
    normalize_on_device: bool | None = False  # float pixels, which can hold the NaN (uint8 cannot)

    def __call__(self, rows):
        batch = super().__call__(rows)
        self.calls += 1
        if self.calls == self.poisoned_call:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch


class RecordParameters(TrainerCallback):
    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))


def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=4, optim="adamw_torch",
                  learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.1, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True)
    values.update(overrides)
    return hs.SiglipTrainingArguments(**values)


# (batch, accumulation): the plain step and GradCache's (accumulation by embedding cache); the 2nd step is poisoned
PATHS = {"plain": (16, 1), "gradcache": (8, 2)}


@pytest.mark.parametrize("path", PATHS)
def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were(tmp_path, path):
    batch, accumulation = PATHS[path]
    model, processor, _, dataset = tiny_training_setup()
    collator = PoisonedCollator(processor=processor, max_length=12, caption_column="caption",
                                poisoned_call=accumulation + 1)  # the first micro-batch of step 2
    recorder = RecordParameters()
    trainer = hs.SiglipTrainer(
        model=model, args=training_args(tmp_path, per_device_train_batch_size=batch,
                                        gradient_accumulation_steps=accumulation, on_nonfinite="skip"),
        data_collator=collator, train_dataset=dataset["train"], callbacks=[recorder])
    trainer.train()
    after = recorder.after_step
    assert len(after) == 4
    assert torch.equal(after[1], after[0])  # step 2: no update at all (AdamW's decay included)
    assert not torch.equal(after[2], after[1]) and not torch.equal(after[3], after[2])  # training went on
    assert torch.isfinite(after[3]).all()
    state = trainer.optimizer.state[model.logit_scale]
    assert int(state["step"]) == 3  # Adam's moments and step count skipped step 2 too
    assert trainer.nonfinite_steps_skipped == 1
    assert trainer.data_report()["train/nonfinite_steps_skipped"] == 1
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [math.isnan(entry["loss"]) for entry in logs] == [False, True, False, False]  # nan, not 0.0
    assert [entry.get("nonfinite_steps_skipped", 0) for entry in logs] == [0, 1, 1, 1]
    final = trainer.state.log_history[-1]
    assert math.isfinite(final["train_loss"]) and final["nonfinite_steps_skipped"] == 1
    assert final["train_loss"] == pytest.approx(sum(logs[i]["loss"] for i in (0, 2, 3)) / 3)


@pytest.mark.parametrize("path", PATHS)
def test_a_nonfinite_step_stops_training_before_the_update(tmp_path, path):
    batch, accumulation = PATHS[path]
    model, processor, _, dataset = tiny_training_setup()
    collator = PoisonedCollator(processor=processor, max_length=12, caption_column="caption",
                                poisoned_call=accumulation + 1)
    recorder = RecordParameters()
    trainer = hs.SiglipTrainer(
        model=model, args=training_args(tmp_path, per_device_train_batch_size=batch,
                                        gradient_accumulation_steps=accumulation),
        data_collator=collator, train_dataset=dataset["train"], callbacks=[recorder])
    with pytest.raises(NonFiniteError, match=r"^training diverged at step 2: loss is nan, gradient norm is nan "
                                             r"\(t=(9\.9|10)\d*\.?\d*, b=-\d+\.?\d*\); the step was not applied"):
        trainer.train()
    assert len(recorder.after_step) == 1
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), recorder.after_step[0])


def test_bad_on_nonfinite_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        training_args(tmp_path, on_nonfinite="ignore")


# --- metrics files -------------------------------------------------------------------------------------------------


def test_to_json_writes_nonfinite_values_as_null(tmp_path):
    metrics = {"i2t_recall@1": float("nan"), "loss": float("inf"), "ok": 0.5, "nested": {"x": [float("-inf"), 1.0]},
               "count": 3}
    text = to_json(metrics, tmp_path / "metrics.json")
    strict = json.loads((tmp_path / "metrics.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict == {"i2t_recall@1": None, "loss": None, "ok": 0.5, "nested": {"x": [None, 1.0]}, "count": 3}
    assert "NaN" not in text and "Infinity" not in text
    assert metrics["i2t_recall@1"] != metrics["i2t_recall@1"]  # the caller's dict is left as it was


# --- several processes ---------------------------------------------------------------------------------------------


def test_two_processes_decide_together_when_one_sees_nan(tmp_path):
    """NaN images on the second process only: both skip the same step (same weights after it), or both stop with the
    same message naming the process; nobody waits for the other."""
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29673"]
    run = subprocess.run([*torchrun, str(SCRIPT), str(tmp_path)], env=cli_env(ACCELERATE_USE_CPU="1"),
                         capture_output=True, text=True, timeout=240)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]  # written before teardown
    assert run.returncode == 0 or all(results), run.stderr[-3000:]
    for result in results:
        skip, stop = result["skip"], result["stop"]
        assert skip["steps_done"] == 3 and skip["skipped"] == 1
        assert skip["report"] == {"train/nonfinite_steps_skipped": 1}  # counted once, not once per process
        assert skip["skipped_step_left_weights"] and skip["later_step_trained"] and skip["finite"]
        assert math.isnan(skip["logged_losses"][1]) and math.isfinite(skip["logged_losses"][2])
        assert stop["steps_done"] == 1
        assert stop["error"].startswith("training diverged at step 2: loss is nan on process 1 of 2, gradient norm "
                                        "is nan (t=")
    assert results[0]["skip"]["checksum"] == results[1]["skip"]["checksum"]
    assert results[0]["stop"]["error"] == results[1]["stop"]["error"]


def test_a_diverging_two_process_run_stops_both_processes(tmp_path):
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29674"]
    out = tmp_path / "out"
    values = {**DIVERGING, "use_cpu": "false", "per_device_train_batch_size": 8, "eval_split": "None",
              "output_dir": out}
    run = subprocess.run([*torchrun, "-m", "hf_siglip", "train", *flags(values)], env=cli_env(ACCELERATE_USE_CPU="1"),
                         capture_output=True, text=True, timeout=240, cwd=REPO)  # a hang fails here
    assert run.returncode != 0
    lines = error_lines(run.stderr)
    assert len(lines) == 2 and lines[0] == lines[1] and MESSAGE.match(lines[0]), run.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
