"""ALBEF momentum distillation in SiglipTrainer: the teacher is the EMA of the model, its targets change the loss
(ramped in by the warm-up), and it is saved with checkpoints so a resumed run goes on with the same teacher."""

import pytest
import torch
from transformers import TrainerCallback

import hf_siglip as hs
from conftest import tiny_training_setup
from hf_siglip.objectives.momentum_teacher import WEIGHTS_NAME


def training_args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 16, "max_steps": 2, "optim": "sgd",
        "learning_rate": 0.5, "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1,
        "report_to": [], "save_strategy": "no", "use_cpu": True, "seed": 0, "dataloader_drop_last": True,
        "max_grad_norm": 0.0,
    }
    values.update(overrides)
    return hs.SiglipTrainingArguments(**values)


class RecordParameters(TrainerCallback):
    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({name: p.detach().clone() for name, p in model.named_parameters()})


def train(tmp_path, **overrides):
    model, _, collator, dataset = tiny_training_setup()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = RecordParameters()
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path, **overrides), data_collator=collator,
                               train_dataset=dataset["train"], callbacks=[recorder])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, initial, recorder.after_step, losses


def test_teacher_is_the_moving_average_of_the_model(tmp_path):
    trainer, initial, after_step, _ = train(tmp_path, teacher_momentum=0.5)
    teacher = dict(trainer.objective("momentum_teacher").model.named_parameters())
    moved = 0
    for name, start in initial.items():
        # two updates with m = 0.5: 0.25 initial + 0.25 after step 1 + 0.5 after step 2
        want = 0.25 * start + 0.25 * after_step[0][name] + 0.5 * after_step[1][name]
        assert torch.allclose(teacher[name], want, atol=1e-6), name
        moved += not torch.equal(teacher[name], start)
    assert moved > len(initial) // 2  # the teacher's weights moved after the optimizer steps
    assert not any(p.requires_grad for p in teacher.values())


def test_teacher_targets_change_the_loss_after_the_warm_up(tmp_path):
    _, _, _, plain = train(tmp_path / "plain")
    _, _, _, weightless = train(tmp_path / "weightless", teacher_momentum=0.9, loss_config={"teacher_weight": 0.0})
    _, _, _, distilled = train(tmp_path / "distilled", teacher_momentum=0.9, loss_config={"teacher_weight": 0.6})
    _, _, _, ramped = train(tmp_path / "ramped", teacher_momentum=0.9, teacher_warmup_steps=2,
                            loss_config={"teacher_weight": 0.6})
    assert weightless == pytest.approx(plain, rel=1e-6)  # with weight 0 the targets are the ids' alone
    assert distilled[0] != pytest.approx(plain[0], abs=1e-3)  # soft targets from the teacher change the loss
    assert ramped[0] == pytest.approx(plain[0], rel=1e-6)  # step 0 of the ramp: weight 0
    assert ramped[1] != pytest.approx(distilled[1], abs=1e-4)  # step 1: weight 0.3, not 0.6


def test_resumed_run_goes_on_with_the_saved_teacher(tmp_path):
    common = {"teacher_momentum": 0.8, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full, _, _, full_losses = train(tmp_path, **common)
    assert (tmp_path / "out" / "checkpoint-2" / WEIGHTS_NAME).exists()
    model, _, collator, dataset = tiny_training_setup()
    resumed = hs.SiglipTrainer(model=model, args=training_args(tmp_path, **common), data_collator=collator,
                               train_dataset=dataset["train"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    losses = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert losses[-2:] == pytest.approx(full_losses[2:], abs=1e-5)
    teacher = resumed.objective("momentum_teacher").model.state_dict()
    want = full.objective("momentum_teacher").model.state_dict()
    for name, value in want.items():
        assert torch.allclose(teacher[name], value, atol=1e-5), name


def test_accumulated_batches_get_the_teacher_targets_of_the_large_batch(tmp_path):
    """8 x 2 accumulated with the embedding cache = 16 at once: the teacher embeds each micro-batch of the window."""
    runs = {}
    for batch_size, accumulation in ((16, 1), (8, 2)):
        trainer, _, _, losses = train(tmp_path / f"acc{accumulation}", teacher_momentum=0.7, max_steps=3,
                                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                      learning_rate=0.1, loss_config={"teacher_weight": 0.5})
        runs[accumulation] = (losses, dict(trainer.model.named_parameters()),
                              dict(trainer.objective("momentum_teacher").model.named_parameters()))
    (losses, student, teacher), (acc_losses, acc_student, acc_teacher) = runs[1], runs[2]
    assert acc_losses == pytest.approx(losses, rel=1e-5)
    assert losses[2] != pytest.approx(losses[0], rel=1e-3)  # the steps changed the model
    for name, value in student.items():
        assert torch.allclose(acc_student[name], value, atol=1e-5), name
        assert torch.allclose(acc_teacher[name], teacher[name], atol=1e-5), name


class RecordStatistics(TrainerCallback):
    def __init__(self, trainer_box):
        self.trainer_box, self.mined = trainer_box, []

    def on_step_end(self, args, state, control, **kwargs):
        self.mined.append(self.trainer_box[0]._loss_statistics.mined_positives_per_image)


def test_mining_with_the_teacher_uses_the_teachers_similarities(tmp_path):
    """mine_with='teacher': the mined pairs are those the teacher's embeddings put above the threshold. A teacher
    (momentum ~1: it stays as set) that maps every image to one vector mines every pair by image-image similarity,
    while the student's own similarities mine (almost) none: the statistics tell which one decided."""
    model, _, collator, dataset = tiny_training_setup()
    args = training_args(tmp_path, teacher_momentum=0.999999, max_steps=2,
                         loss_config={"teacher_weight": 0.0, "mine_with": "teacher", "mine_image_image": 0.99})
    box = []
    recorder = RecordStatistics(box)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"],
                               callbacks=[recorder])
    box.append(trainer)
    teacher = trainer.objective("momentum_teacher")
    with torch.no_grad():  # a teacher that maps every image and every text to (almost) one direction
        for name, parameter in teacher.model.named_parameters():
            if name.endswith(("post_layernorm.weight", "final_layer_norm.weight")):
                parameter.zero_()
            if name.endswith(("post_layernorm.bias", "final_layer_norm.bias")):
                parameter.fill_(1.0)
    trainer.train()
    n_texts = 2 * 16  # two captions per image, 16 images per batch
    assert recorder.mined[0] == pytest.approx(n_texts - 2)  # every text of the batch, less the two by ids
    plain = train(tmp_path / "own", max_steps=1, loss_config={"mine_image_image": 0.99})[0]
    assert plain._loss_statistics.mined_positives_per_image < 1  # the student's own similarities: (almost) none


@pytest.mark.parametrize("overrides, message", [
    ({"teacher_momentum": 1.0}, "teacher_momentum must be in"),
    ({"loss_config": {"mine_with": "teacher", "mine_text_text": 0.9}}, "set teacher_momentum"),
    ({"loss_config": {"mine_with": "student"}}, "mine_with must be one of"),
])
def test_bad_teacher_settings_fail_when_the_arguments_are_built(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, **overrides)


def test_command_line_teacher_mining_on_two_processes_with_accumulation_equals_one_process(tmp_path):
    """`hf-siglip train` with the momentum teacher distilling and mining (mined pairs ignored), 2 torchrun processes
    x 4 images x 2 accumulated micro-batches against 1 process x 16 images: the same global batch, so the same
    losses, mined-pair counts and weights (the teacher's text embeddings travel the ring with the student's)."""
    import json

    from safetensors.torch import load_file

    from cli_helpers import TINY, launcher_binary, run_train

    settings = {**TINY, "use_cpu": "false", "max_steps": 3, "eval_split": "None", "disable_tqdm": "true",
                "teacher_momentum": 0.5, "loss_config": json.dumps({
                    "teacher_weight": 0.3, "mine_with": "teacher", "mine_text_text": 0.999, "mined_pairs": "ignore"})}
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29651"]
    two = run_train({**settings, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                     "output_dir": tmp_path / "two"}, torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_train({**settings, "per_device_train_batch_size": 16, "output_dir": tmp_path / "one"})
    assert one.returncode == 0, one.stderr[-3000:]

    def logged(run, key):
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        return [entry[key] for entry in history if key in entry and "train_loss" not in entry]

    assert logged("two", "loss") == pytest.approx(logged("one", "loss"), rel=1e-4)
    mined = logged("one", "mined_positives_per_image")
    assert logged("two", "mined_positives_per_image") == pytest.approx(mined, rel=1e-5)
    assert max(mined) > 0  # the teacher found pairs to leave out
    two_weights, one_weights = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("two", "one"))
    assert max((two_weights[k] - one_weights[k]).abs().max().item() for k in one_weights) < 2e-3
