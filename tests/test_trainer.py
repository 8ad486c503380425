"""SiglipTrainer: one vs two real processes, accumulation, parameter groups, locking, resume."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_siglip as hs
from conftest import tiny_training_setup
from hf_siglip.data.embedding import add_image_embeddings

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=4, optim="sgd",
        learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True, max_grad_norm=0.0,
    )
    values.update(overrides)
    return hs.SiglipTrainingArguments(**values)


def losses_of(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def flat_parameters(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """Two gloo processes (accelerate launch, DDP) vs one process: same global batch, same training."""
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    runs = [
        [sys.executable, str(SCRIPT), str(single), "16", "3"],
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29631", str(SCRIPT), str(double), "16", "3"],
    ]
    for command in runs:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())

    assert len(one["losses"]) == len(two["losses"]) == 3
    assert one["losses"][0] == pytest.approx(two["losses"][0], abs=1e-5)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)  # fp32 summation order differs
    # the loss reports positives over the global batch on every process, the same as one process sees
    assert one["positives_per_image"] == pytest.approx(two["positives_per_image"]) == [2.0] * 3
    for name, start in one["initial"].items():
        # first step with SGD: (initial - after) / lr is the gradient of the global loss
        grad_one = (torch.tensor(start) - torch.tensor(one["after_step"][0][name])) / one["lr"]
        grad_two = (torch.tensor(start) - torch.tensor(two["after_step"][0][name])) / two["lr"]
        assert torch.allclose(grad_one, grad_two, atol=1e-5, rtol=1e-4), name
        assert torch.allclose(torch.tensor(one["after_step"][-1][name]), torch.tensor(two["after_step"][-1][name]),
                              atol=1e-5), name


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    params = []
    for batch_size, accumulation in ((32, 1), (16, 2), (8, 4)):
        model, _, collator, dataset = tiny_training_setup()
        args = training_args(tmp_path / f"acc{accumulation}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=2)
        trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
        trainer.train()
        params.append(flat_parameters(model))
        if accumulation == 1:
            reference_losses = losses_of(trainer)
        else:
            assert losses_of(trainer) == pytest.approx(reference_losses, abs=1e-5)
    assert torch.allclose(params[0], params[1], atol=1e-5)
    assert torch.allclose(params[0], params[2], atol=1e-5)


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    model, _, collator, dataset = tiny_training_setup()
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=3e-3, max_steps=24, logging_steps=4)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"],
                               eval_dataset=dataset["test"])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    losses = losses_of(trainer)
    assert losses[-1] < losses[0] * 0.8 and after["eval_loss"] < before
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {"t", "b", "positives_per_image", "logit_positive_mean", "logit_negative_mean"} <= set(logged)
    assert logged["positives_per_image"] == pytest.approx(2.0)  # two captions per image
    assert {"eval_i2t_recall@1", "eval_t2i_recall@10"} <= set(after)


def test_logged_positives_include_mined_pairs_once_mining_starts(tmp_path):
    """positives_per_image is what the loss saw: a mining threshold every pair passes makes every text of the
    global batch a positive of every image (the ids alone give 2), from mining_start_step on."""
    model, _, collator, dataset = tiny_training_setup()
    args = training_args(tmp_path, max_steps=2, loss_config={"mine_image_text": -1.0, "mining_start_step": 1})
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
    trainer.train()
    before, after = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert (before["positives_per_image"], before["mined_positives_per_image"]) == (2.0, 0.0)
    assert after["positives_per_image"] == pytest.approx(32.0)  # 16 images, 2 captions each
    assert after["mined_positives_per_image"] == pytest.approx(30.0)
    assert "logit_negative_mean" in before and "logit_negative_mean" not in after  # no pair is a negative


def test_hard_masking_matching_pairs_seen_sees_as_many_pairs(tmp_path):
    """SigLIP 4.8 'hard, matching total pairs seen': one kept negative per positive leaves 4 of the 32 pairs of a row
    (2 captions per image, 16 images per step), so the run trains 8x longer and sees the unmasked run's pairs."""
    model, _, collator, dataset = tiny_training_setup()
    loss_config = {"negative_ratio": 1, "negative_selection": "hard", "match_pairs_seen": True}
    args = training_args(tmp_path, max_steps=2, loss_config=loss_config)
    assert args.max_steps == 16
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["pairs_per_image"] for entry in logged] == [4.0] * 16
    assert sum(entry["pairs_per_image"] * 16 for entry in logged) == 2 * 16 * 32  # unmasked: 2 steps, 32 per row


def test_parameter_groups_follow_the_papers(tmp_path, native_checkpoint):
    model = hs.SiglipBottleneckModel.from_pretrained(native_checkpoint)
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=1e-3, weight_decay=0.1)
    _, _, collator, dataset = tiny_training_setup()
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
    optimizer = trainer.create_optimizer()
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    parameters = dict(model.named_parameters())

    def group(name):
        return group_of[id(parameters[name])]

    # pretrained towers: no weight decay, learning rate x 0.1
    tower_weight = group("text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert (tower_weight["lr"], tower_weight["weight_decay"]) == (pytest.approx(1e-4), 0.0)
    # never decayed, whatever their origin
    for name in ("logit_scale", "logit_bias", "vision_model.head.probe", "text_model.final_layer_norm.weight",
                 "vision_model.embeddings.position_embedding.weight", "text_model.head.bias"):
        assert group(name)["weight_decay"] == 0.0, name
    assert group("logit_scale")["lr"] == pytest.approx(1e-3)  # the heads are new: full learning rate

    fresh, _, _, _ = tiny_training_setup()
    trainer = hs.SiglipTrainer(model=fresh, args=training_args(tmp_path, optim="adamw_torch", learning_rate=1e-3,
                                                                 weight_decay=0.1),
                               data_collator=collator, train_dataset=dataset["train"])
    optimizer = trainer.create_optimizer()
    fresh_parameters = dict(fresh.named_parameters())
    fresh_group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    decayed = fresh_group[id(fresh_parameters["vision_model.encoder.layers.0.mlp.fc1.weight"])]
    assert (decayed["lr"], decayed["weight_decay"]) == (pytest.approx(1e-3), 0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(fresh_parameters)


def test_locked_vision_tower_is_bit_identical_and_in_eval_mode(tmp_path):
    model, _, collator, dataset = tiny_training_setup()
    vision_before = {name: p.clone() for name, p in model.vision_model.named_parameters()}
    text_before = flat_parameters(model.text_model)
    modes = []
    model.vision_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path, lock_vision_tower=True),
                               data_collator=collator, train_dataset=dataset["train"])
    trainer.train()
    for name, parameter in model.vision_model.named_parameters():
        assert torch.equal(parameter, vision_before[name]), name
    assert not torch.equal(flat_parameters(model.text_model), text_before)
    assert modes and not any(modes)
    assert all(p.requires_grad is False for p in model.vision_model.parameters())


def test_siglit_with_cached_image_embeddings_never_runs_the_vision_tower(tmp_path):
    model, processor, collator, dataset = tiny_training_setup()
    cached = add_image_embeddings(dataset["train"], model, processor, batch_size=32)
    assert len(cached[0]["image_embeds"]) == 32
    calls = []
    model.vision_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path, lock_vision_tower=True),
                               data_collator=collator, train_dataset=cached.remove_columns("image"))
    trainer.train()
    assert not calls
    assert all(math.isfinite(loss) for loss in losses_of(trainer))


def test_siglit_cached_and_uncached_runs_train_the_same_parameters(tmp_path):
    """A foreign (ViT) backbone gets a new visual_projection. With the tower locked it trains whether the images
    are embedded on the fly or read from the cache, and the two runs end with the same weights."""
    from transformers import ViTConfig

    _, processor, collator, dataset = tiny_training_setup()
    template, _, _, _ = tiny_training_setup()
    config = hs.SiglipBottleneckConfig(
        text_config=template.config.text_config.to_dict(),
        vision_config=ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=30,
                                image_size=16, patch_size=8))
    torch.manual_seed(0)
    initial = hs.SiglipBottleneckModel(config).state_dict()
    trained = {}
    for name, train_dataset in (("uncached", dataset["train"]), ("cached", None)):
        model = hs.SiglipBottleneckModel(config)
        model.load_state_dict(initial)
        if train_dataset is None:
            train_dataset = add_image_embeddings(dataset["train"], model.eval(), processor).remove_columns("image")
            assert len(train_dataset[0]["image_embeds"]) == 24  # the backbone's width: before the projection
        trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path / name, lock_vision_tower=True),
                                   data_collator=collator, train_dataset=train_dataset)
        trainer.train()
        trained[name] = {key: value.detach().clone() for key, value in model.state_dict().items()}
    assert not torch.equal(trained["cached"]["visual_projection.weight"], initial["visual_projection.weight"])
    for key, value in trained["uncached"].items():
        assert torch.allclose(trained["cached"][key], value, atol=1e-5), key


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = dict(optim="adamw_torch", learning_rate=3e-3, max_steps=6, save_strategy="steps", save_steps=3,
                  lr_scheduler_type="linear")
    model, _, collator, dataset = tiny_training_setup()
    full = hs.SiglipTrainer(model=model, args=training_args(tmp_path / "full", **common), data_collator=collator,
                            train_dataset=dataset["train"])
    full.train()
    expected = losses_of(full)

    model, _, collator, dataset = tiny_training_setup()
    resumed = hs.SiglipTrainer(model=model, args=training_args(tmp_path / "full", **common),
                               data_collator=collator, train_dataset=dataset["train"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert losses_of(resumed)[-3:] == pytest.approx(expected[3:], abs=1e-5)
    assert resumed.model.logit_scale.item() == pytest.approx(full.model.logit_scale.item(), abs=1e-6)


def test_plain_training_arguments_are_accepted(tmp_path):
    from transformers import TrainingArguments

    model, _, collator, dataset = tiny_training_setup()
    trainer = hs.SiglipTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                               data_collator=collator, train_dataset=dataset["train"])
    assert isinstance(trainer.args, hs.SiglipTrainingArguments) and trainer.args.adam_beta2 == 0.999


def test_evaluation_uses_every_row_even_with_drop_last(tmp_path):
    model, _, collator, dataset = tiny_training_setup(n_test=24)
    args = training_args(tmp_path, per_device_eval_batch_size=16, dataloader_drop_last=True)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, eval_dataset=dataset["test"])
    # 24 images = one batch of 16 + a partial batch of 8: both are embedded and ranked
    embedded = []
    model.vision_model.register_forward_hook(lambda module, inputs, output: embedded.append(len(output.pooler_output)))
    metrics = trainer.evaluate()
    assert sum(embedded) == 24 and metrics["eval_i2t_unmatched"] == 0
    with pytest.raises(ValueError, match="evaluation set is empty"):
        trainer.evaluate(eval_dataset=dataset["test"].select([]))
