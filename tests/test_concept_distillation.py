"""DiHT concept distillation: a frozen teacher's outputs (the concept_targets data step) learnt by a linear head on the
image embedding. The loss terms against hand-written formulas, the term's weight in the training loss, the loss going
down, saving (native model, head in checkpoints, resume), gradient accumulation, and the errors."""

import importlib.util
import json
import subprocess

import datasets
import pytest
import torch
from transformers import AutoModel

import hf_siglip as hs
from cli_helpers import REPO, cli_env, launcher_binary
from conftest import tiny_training_setup
from data_fixtures import save_tiny_vit_teacher
from hf_siglip.cli.arguments import SiglipModelArguments, SiglipScriptArguments, validate_arguments
from hf_siglip.data.steps import DataContext, parse_data_steps, run_data_steps
from hf_siglip.objectives.concept_distillation import WEIGHTS_NAME, distillation_losses

SCRIPT = REPO / "tests" / "scripts" / "train_concept_tiny.py"
N_CLASSES = 10


@pytest.fixture(scope="module")
def classifier_teacher(tmp_path_factory):
    return save_tiny_vit_teacher(tmp_path_factory.mktemp("vit_classifier"), num_labels=N_CLASSES)


@pytest.fixture(scope="module")
def feature_teacher(tmp_path_factory):
    return save_tiny_vit_teacher(tmp_path_factory.mktemp("vit_features"), classifier=False, seed=1)


def with_targets(dataset, teacher, **settings):
    context = DataContext()
    steps = parse_data_steps([{"concept_targets": {"model": teacher, **settings}}])
    return run_data_steps(dataset, steps, context), context.report


def training_args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 16, "max_steps": 2, "optim": "sgd",
        "learning_rate": 0.5, "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1,
        "report_to": [], "save_strategy": "no", "use_cpu": True, "seed": 0, "dataloader_drop_last": True,
        "max_grad_norm": 0.0, "concept_distillation_weight": 1.0, "concept_distillation_loss": "kl",
    }
    values.update(overrides)
    return hs.SiglipTrainingArguments(**values)


def train(tmp_path, teacher, resume_from=None, **overrides):
    model, _, collator, dataset = tiny_training_setup()
    train_rows, report = with_targets(dataset["train"], teacher)
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path, **overrides), data_collator=collator,
                               train_dataset=train_rows)
    trainer.data_steps_report = report
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def test_loss_terms_match_hand_written_formulas():
    predictions = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    targets = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 4.0]])
    for temperature in (1.0, 2.5):
        p = torch.exp(targets / temperature) / torch.exp(targets / temperature).sum(-1, keepdim=True)
        q = torch.exp(predictions / temperature) / torch.exp(predictions / temperature).sum(-1, keepdim=True)
        want = (p * (p.log() - q.log())).sum(-1) * temperature ** 2  # KL(teacher || student), Hinton's T^2
        got = distillation_losses(predictions, targets, "kl", temperature)
        assert torch.allclose(got, want, atol=1e-6), temperature
    cosine = (predictions * targets).sum(-1) / (predictions.norm(dim=-1) * targets.norm(dim=-1))
    assert torch.allclose(distillation_losses(predictions, targets, "cosine"), 1.0 - cosine, atol=1e-6)
    assert torch.allclose(distillation_losses(targets, targets, "kl"), torch.zeros(2), atol=1e-6)
    assert torch.allclose(distillation_losses(3 * targets, targets, "cosine"), torch.zeros(2), atol=1e-6)


def test_the_term_joins_the_training_loss_with_its_weight(tmp_path, classifier_teacher):
    """Step 1 (before any update): loss = plain sigmoid loss + weight * mean concept loss of the batch's images."""
    plain = logged(train(tmp_path / "plain", classifier_teacher, max_steps=1, concept_distillation_weight=0.0), "loss")
    distilled = train(tmp_path / "distilled", classifier_teacher, max_steps=1, concept_distillation_weight=0.7)
    concept = logged(distilled, "concept_distillation_loss")
    assert concept[0] > 0.1
    assert logged(distilled, "loss")[0] == pytest.approx(plain[0] + 0.7 * concept[0], abs=1e-5)
    assert logged(train(tmp_path / "plain2", classifier_teacher, max_steps=1, concept_distillation_weight=0.0),
                  "concept_distillation_loss") == []  # off: no head, nothing logged


def test_distillation_loss_goes_down(tmp_path, classifier_teacher):
    trainer = train(tmp_path, classifier_teacher, max_steps=16, optim="adamw_torch", learning_rate=1e-2)
    concept = logged(trainer, "concept_distillation_loss")
    assert len(concept) == 16
    assert concept[-1] < 0.5 * concept[0], concept


def test_auto_takes_cosine_for_a_feature_teacher(tmp_path, feature_teacher):
    trainer = train(tmp_path, feature_teacher, max_steps=1, concept_distillation_loss="auto")
    assert trainer.args.concept_distillation_loss == "cosine"  # resolved from the step's report, named in the card
    assert trainer.objective("concept_distillation").head.out_features == 16  # the teacher ViT's width
    assert 0.0 < logged(trainer, "concept_distillation_loss")[0] < 2.0  # 1 - cos lies in [0, 2]
    with pytest.raises(ValueError, match="applies to the kl loss only, and 'auto' chose cosine"):
        train(tmp_path / "hot", feature_teacher, concept_distillation_loss="auto", concept_distillation_temperature=2.0)


def test_saved_model_is_native_and_a_resumed_run_continues_with_the_head(tmp_path, classifier_teacher):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "optim": "adamw_torch",
              "learning_rate": 1e-2}
    full = train(tmp_path, classifier_teacher, **common)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    from safetensors import safe_open

    with safe_open(checkpoint / WEIGHTS_NAME, "pt") as head_file:
        assert set(head_file.keys()) == {"weight", "bias"}
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        assert not any("concept" in key for key in weights.keys())  # the checkpoint's model is native too

    full.save_model(str(tmp_path / "final"))
    model, loading = AutoModel.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert type(model).__name__ == "SiglipModel"
    assert loading["unexpected_keys"] == set() and loading["missing_keys"] == set(), loading
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model_type"] == "siglip"

    resumed = train(tmp_path, classifier_teacher, resume_from=str(checkpoint), **common)
    want = full.objective("concept_distillation").head.state_dict()
    got = resumed.objective("concept_distillation").head.state_dict()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    after_resume = logged(resumed, "concept_distillation_loss")[2:]  # its history starts with the checkpoint's
    assert after_resume == pytest.approx(logged(full, "concept_distillation_loss")[2:], abs=1e-5)


def test_gradient_accumulation_equals_the_large_batch(tmp_path, classifier_teacher):
    """8 images x 2 micro-batches (the embedding-cache step, its re-forward adding each micro-batch's concept loss)
    train the model and the head as 16 images at once."""
    large = train(tmp_path / "large", classifier_teacher)
    accumulated = train(tmp_path / "accumulated", classifier_teacher, per_device_train_batch_size=8,
                        gradient_accumulation_steps=2)
    assert logged(accumulated, "loss") == pytest.approx(logged(large, "loss"), abs=1e-5)
    assert logged(accumulated, "concept_distillation_loss") == pytest.approx(
        logged(large, "concept_distillation_loss"), abs=1e-5)
    want, got = dict(large.model.named_parameters()), dict(accumulated.model.named_parameters())
    assert "concept_head.weight" in want
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-5), name
    untrained = train(tmp_path / "zero", classifier_teacher, max_steps=0).objective("concept_distillation")
    moved = large.objective("concept_distillation").head.weight - untrained.head.weight
    assert moved.abs().max() > 1e-3  # the head trained (so the comparison above is not of two untouched heads)


@pytest.mark.parametrize("overrides, message", [
    ({"concept_distillation_weight": -1.0}, "concept_distillation_weight must be >= 0"),
    ({"concept_distillation_weight": float("nan")}, "concept_distillation_weight must be >= 0"),
    ({"concept_distillation_loss": "mse"}, "concept_distillation_loss must be one of"),
    ({"concept_distillation_temperature": 0.0}, "concept_distillation_temperature must be > 0"),
    ({"concept_distillation_loss": "cosine", "concept_distillation_temperature": 2.0}, "kl loss only"),
])
def test_bad_settings_fail_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        training_args(tmp_path, **overrides)
    assert "\n" not in str(error.value)


def test_missing_targets_and_unresolved_auto_fail_clearly(tmp_path, classifier_teacher):
    model, _, collator, dataset = tiny_training_setup()
    with pytest.raises(ValueError, match="add the concept_targets data step") as error:
        hs.SiglipTrainer(model=model, args=training_args(tmp_path), data_collator=collator,
                         train_dataset=dataset["train"])  # checked when the trainer is built, before any batch
    assert "\n" not in str(error.value)

    train_rows, _ = with_targets(dataset["train"], classifier_teacher)
    trainer = hs.SiglipTrainer(model=model, args=training_args(tmp_path, concept_distillation_loss="auto"),
                               data_collator=collator, train_dataset=train_rows)
    with pytest.raises(ValueError, match="set it to 'kl'"):  # the Trainer API without the step's report
        trainer.train()

    script_args = SiglipScriptArguments(dataset="demo")
    with pytest.raises(ValueError, match="needs the concept_targets data step"):  # the command line, before any data
        validate_arguments(script_args, SiglipModelArguments(), training_args(tmp_path))
    for settings, message in (({}, "model is required"), ({"model": "x", "output": "probs"}, "output must be one of")):
        with pytest.raises(ValueError, match=message):
            parse_data_steps([{"concept_targets": settings}])


def test_data_step_counts_broken_images_and_the_collator_passes_targets(classifier_teacher, feature_teacher):
    _, _, collator, dataset = tiny_training_setup(n_train=8)
    # encoded images (as shards and image folders give them): the broken one fails only where it is decoded
    rows = dataset["train"].cast_column("image", datasets.Image(decode=False))
    broken = rows.select([0]).map(lambda row: {"image": {"bytes": b"not an image", "path": None}})
    rows = datasets.concatenate_datasets([rows, broken])

    with_logits, report = with_targets(rows, classifier_teacher)
    assert dict(report["concept_targets"]) == {"output": "logits", "undecodable_images": 1, "rows_in": 9,
                                               "rows_out": 9}
    assert with_logits.features["concept_targets"].length == N_CLASSES
    assert with_logits[8]["concept_targets"] is None

    batch = collator([with_logits[i] for i in range(9)])
    assert batch["concept_targets"].dtype == torch.float32 and batch["concept_targets"].shape == (8, N_CLASSES)
    assert batch["image_ids"].tolist() == with_logits["image_id"][:8]  # one target row per kept image, in order
    assert collator.stats["rows_without_concept_targets"] == 1
    assert torch.allclose(batch["concept_targets"][3], torch.tensor(with_logits[3]["concept_targets"]))

    with_features, report = with_targets(rows, feature_teacher)
    assert report["concept_targets"]["output"] == "features"
    assert with_features.features["concept_targets"].length == 16  # the ViT's width
    with pytest.raises(ValueError, match="at random"):  # a classifier's untrained pooler would give noise
        with_targets(rows, classifier_teacher, output="features")


def test_two_processes_with_accumulation_match_one_process(tmp_path, classifier_teacher):
    """DDP: 2 gloo processes x 2 micro-batches of 4 images train the model and the head as one process with all 16
    (each process's term is scaled by processes / global images, and DDP averages the head's gradients)."""
    spec = importlib.util.spec_from_file_location("train_concept_tiny", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(str(tmp_path / "one.json"), classifier_teacher, 1)
    launch = [launcher_binary("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29691", str(SCRIPT),
              str(tmp_path / "two.json"), classifier_teacher, "2"]
    run = subprocess.run(launch, env=cli_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["concept"] == pytest.approx(one["concept"], rel=1e-5)
    assert "concept_head.weight" in one["parameters"]
    for name, value in one["parameters"].items():
        assert torch.allclose(torch.tensor(two["parameters"][name]), torch.tensor(value), atol=1e-5), name
