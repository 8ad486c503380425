"""The training-objective unit (hf_siglip.objectives): a user's objective is one new module and nothing else.

The module below is what docs/ARCHITECTURE.md ("Add an objective") shows: written to a folder of its own, imported by
name (`module:Class`), trained through `hf-siglip train`, its head saved beside each checkpoint and read back when a
run resumes from another folder, its loss logged and its settings in the model card.
"""

import json
import shutil
import sys
import textwrap

import pytest
import torch

import hf_siglip as hs
from cli_helpers import TINY, cli_env, flags, logged_losses, run_train
from conftest import tiny_training_setup
from test_cli_inputs import no_data_read, usage_error  # noqa: F401 (a fixture)
from test_cli_runs import assert_same_weights

OBJECTIVE_MODULE = textwrap.dedent('''
    """A trivial objective: a head scores each image from its embedding, pushed towards a target score."""
    from dataclasses import dataclass, field

    from torch import nn

    from hf_siglip.objectives import register_objective
    from hf_siglip.objectives.base import Objective, ObjectiveConfig, attach_module, full_state, load_into


    @dataclass
    class ImageScoreConfig(ObjectiveConfig):
        target: float = field(default=1.0, metadata={"help": "The score each image is pushed towards."})


    @register_objective
    class ImageScore(Objective):
        name = "image_score"
        config_class = ImageScoreConfig
        side_file = "image_score_head.safetensors"

        def __init__(self, config, model, args, processing_class=None, train_dataset=None):
            super().__init__(config, model, args)
            self.head = attach_module(model, "image_score_head", lambda: nn.Linear(1, 1), seed=args.seed)

        def loss_sum(self, outputs, batch):  # one unit per image (the default count)
            scores = self.head(outputs.image_embeds.mean(-1, keepdim=True)).squeeze(-1)
            return ((scores - self.config.target) ** 2).sum()

        def state_dict(self):
            return full_state(self.head)

        def load_state_dict(self, state):
            load_into(self.head, state)
''')


@pytest.fixture
def objective_module(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "image_score_objective.py").write_text(OBJECTIVE_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("image_score_objective", None)


def _args(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 16, "max_steps": 2, "optim": "sgd",
              "learning_rate": 0.5, "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1,
              "report_to": [], "save_strategy": "no", "use_cpu": True, "seed": 0, "dataloader_drop_last": True,
              "max_grad_norm": 0.0, **overrides}
    return hs.SiglipTrainingArguments(**values)


def _train(tmp_path, n_train=64, **overrides):
    model, _, collator, dataset = tiny_training_setup(n_train=n_train)
    trainer = hs.SiglipTrainer(model=model, args=_args(tmp_path, **overrides), data_collator=collator,
                               train_dataset=dataset["train"])
    trainer.train()
    return trainer


def test_the_term_is_the_weighted_mean_over_images_and_accumulation_equals_the_large_batch(tmp_path, objective_module):
    settings = {"image_score_objective:ImageScore": {"weight": 0.5, "target": 2.0}}
    plain = _train(tmp_path / "plain", max_steps=1, n_train=16)
    with_term = _train(tmp_path / "term", max_steps=1, n_train=16, objectives=settings)
    # step 0, by hand: the pair loss of the same batch (all 16 rows) plus 0.5 * the mean of (score - 2)^2 over images
    model, _, collator, dataset = tiny_training_setup(n_train=16)
    batch = collator([dataset["train"][index] for index in range(16)])
    with torch.no_grad():
        image_embeds = model(**{k: batch[k] for k in ("pixel_values", "input_ids")}).image_embeds
        torch.manual_seed(0)  # the head's initialisation: attach_module under the run's seed
        head = torch.nn.Linear(1, 1)
        scores = head(image_embeds.mean(-1, keepdim=True)).squeeze(-1)
    want = plain.state.log_history[0]["loss"] + 0.5 * ((scores - 2.0) ** 2).mean().item()
    assert with_term.state.log_history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert with_term.state.log_history[0]["image_score_loss"] == pytest.approx(((scores - 2.0) ** 2).mean().item(),
                                                                                  rel=1e-5)
    # GradCache: 2 micro-batches of 8 train as one batch of 16, the head included
    large = _train(tmp_path / "large", max_steps=2, objectives=settings)
    accumulated = _train(tmp_path / "acc", max_steps=2, objectives=settings, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2)
    for key in ("loss", "image_score_loss"):
        assert [e[key] for e in accumulated.state.log_history if key in e] == pytest.approx(
            [e[key] for e in large.state.log_history if key in e], rel=1e-5), key
    want = dict(large.model.named_parameters())
    for name, value in accumulated.model.named_parameters():
        assert torch.allclose(value, want[name], atol=1e-5), name
    assert not torch.equal(large.objective("image_score").head.weight, head.weight)  # the head trained


def test_a_user_objective_trains_resumes_from_another_folder_and_reaches_the_card(tmp_path, objective_module):
    settings = {**TINY, "demo_train_size": 48, "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
                "eval_split": "None", "disable_tqdm": "true", "seed": 3,
                "objectives": json.dumps({"image_score_objective:ImageScore": {"weight": 0.5}})}
    env = cli_env(PYTHONPATH=str(objective_module))
    straight = run_train({**settings, "output_dir": tmp_path / "straight"}, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "image_score_head.safetensors").exists()
    moved = tmp_path / "moved" / "checkpoint-2"
    shutil.copytree(checkpoint, moved)
    resumed = run_train({**settings, "output_dir": tmp_path / "elsewhere", "resume_from_checkpoint": moved}, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_losses(tmp_path / "elsewhere")[-2:] == logged_losses(tmp_path / "straight")[-2:]
    assert_same_weights(tmp_path / "elsewhere", tmp_path / "straight")
    history = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["log_history"]
    assert sum("image_score_loss" in entry for entry in history) == 4
    card = (tmp_path / "straight" / "README.md").read_text()
    assert '"image_score": {"target": 1.0' not in card and "image_score" in card  # named, with its settings
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert not any("image_score" in key for key in json.dumps(saved))  # the saved model stays native


@pytest.mark.parametrize("objectives, message", [
    ('{"no_such_objective": {}}', "unknown objective 'no_such_objective'"),
    ('{"momentum_teacher": {"momentum": 2.0}}', "teacher_momentum must be in [0, 1)"),
    ('{"concept_distillation": {"colour": 1}}', "unknown setting(s) ['colour']"),
    ('{"momentum_teacher": 3}', "settings must be a mapping"),
    ('[1, 2]', "objectives must be a mapping"),
    ('{"image_score_objective:Missing": {}}', "is not an hf_siglip.objectives.Objective subclass"),
])
def test_bad_objective_settings_are_one_line_before_any_data(tmp_path, capsys, no_data_read, objective_module,
                                                              objectives, message):
    report = usage_error(["train", *flags({**TINY, "output_dir": tmp_path / "out", "objectives": objectives})], capsys)
    assert "\n" not in report and message in report, report
    assert not (tmp_path / "out").exists()
