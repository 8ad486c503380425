"""Fine-tuning that does not forget (issue 23 item 5): `--anchor_dataset` and the WiSE-FT sweep through
`hf-siglip train`.

A tiny random SigLIP checkpoint (the start) is fine-tuned on scikit-learn's digits with the demo as the anchor set.
What is checked against things the sweep did not compute itself: the mixes' end points against `hf-siglip eval` of
the start checkpoint and of the kept fine-tuned end point, the saved weights against the formula applied to the two
weight files, the chosen mix against the rule applied to the table, and the card's table and curve.
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import REPO, TINY, cli_env, train_command
from hf_siglip.training.wise_ft import choose, interpolate, parse_alphas

ALPHA = 0.5  # a fixed rule: the saved weights are then a true mix, not an end point
ANCHOR = dict(anchor_dataset="demo", demo_test_size=24, demo_image_size=16)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny random checkpoint (the start) and a small digits set saved to disk."""
    from data_fixtures import make_processor, make_tiny_siglip
    from hf_siglip.data import make_digits_dataset

    root = tmp_path_factory.mktemp("wise_ft")
    processor = make_processor(image_size=16)
    make_tiny_siglip(len(processor.tokenizer), image_size=16).save_pretrained(root / "start")
    processor.save_pretrained(root / "start")
    digits = make_digits_dataset(n_captions=2, image_size=16, seed=0)
    digits["train"] = digits["train"].select(range(48))
    digits["test"] = digits["test"].select(range(24))
    digits.save_to_disk(root / "digits")
    return root


def _fine_tune(root, out, lists: dict | None = None, **extra) -> dict:
    """`hf-siglip train` from the start checkpoint on digits; `lists`: flags with several values."""
    values = {**TINY, "model_name_or_path": root / "start", "dataset": root / "digits", **ANCHOR,
              "max_steps": 3, "learning_rate": 1e-2, "warmup_steps": 0, "output_dir": out, **extra}
    for name in ("image_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "patch_size"):
        values.pop(name)  # the checkpoint's
    command = train_command(values) + [item for name, items in (lists or {}).items() for item in (f"--{name}", *items)]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def run(start):
    out = start / "out"
    results = _fine_tune(start, out, eval_strategy="steps", eval_steps=2, wise_ft_alphas="0,1", wise_ft_rule=ALPHA)
    return start, out, results


def _evaluate(capsys, checkpoint, output, *extra) -> dict:
    from hf_siglip.cli.main import main as cli_main

    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--output_file", str(output), *extra]) == 0
    capsys.readouterr()
    return json.loads(output.read_text())


def test_anchor_accuracy_is_logged_before_during_and_after_training(run):
    _, out, results = run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = sorted({entry["step"] for entry in history if "eval_anchor_zero_shot_top1" in entry})
    assert steps == [0, 2, 3]  # eval_on_start, eval_steps 2, the final evaluation
    assert 0.0 <= results["metrics"]["eval_anchor_zero_shot_top1"] <= 1.0
    assert results["metrics"]["eval_anchor_zero_shot_classes"] == 30  # the demo's classes
    # the final target metrics sit beside it, in the same evaluation
    assert "eval_i2t_recall@1" in results["metrics"]


def test_the_sweeps_end_points_are_the_start_and_the_fine_tuned_models_own_evaluations(run, tmp_path, capsys):
    root, out, results = run
    rows = {row["alpha"]: row["metrics"] for row in results["wise_ft"]["rows"]}
    assert sorted(rows) == [0.0, ALPHA, 1.0]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    at_start = {key[len("eval_"):]: value for entry in history if entry["step"] == 0 for key, value in entry.items()
                if key.startswith("eval_")}
    for name in ("i2t_recall@1", "t2i_recall@1", "loss", "anchor_zero_shot_top1"):
        assert rows[0.0][name] == at_start[name], name  # alpha 0: the starting weights, exactly
    for row in results["wise_ft"]["rows"]:  # the default target: the mean of the two recall@1 values
        assert row["target"] == (row["metrics"]["i2t_recall@1"] + row["metrics"]["t2i_recall@1"]) / 2
    # against `hf-siglip eval` of each end point (the start checkpoint has no record: data named here)
    demo = ["--anchor_dataset", "demo", "--demo_test_size", "24", "--demo_image_size", "16"]
    start = _evaluate(capsys, root / "start", tmp_path / "a.json", "--dataset", str(root / "digits"),
                      "--max_length", "12", *demo)
    tuned = _evaluate(capsys, out / "finetuned", tmp_path / "b.json", *demo)  # its record: digits, length 12
    for alpha, evaluated in ((0.0, start), (1.0, tuned)):
        for name in ("i2t_recall@1", "t2i_recall@1", "anchor_zero_shot_top1"):
            assert rows[alpha][name] == pytest.approx(evaluated[name], abs=1e-9), (alpha, name)
    # the anchor's accuracy is the demo's own zero-shot evaluation (`hf-siglip eval --dataset demo`)
    on_demo = _evaluate(capsys, root / "start", tmp_path / "c.json", "--dataset", "demo", "--max_length", "12",
                        *demo[2:])
    assert start["anchor_zero_shot_top1"] == on_demo["zero_shot_top1"]
    # training changed the weights, so the end points are two models
    assert rows[0.0]["loss"] != rows[1.0]["loss"]


def test_the_saved_model_is_the_chosen_mix_of_the_two_weight_files(run):
    from transformers import AutoModel

    root, out, results = run
    sweep = results["wise_ft"]
    assert sweep["alpha"] == ALPHA and sweep["rows"][sweep["chosen"]]["alpha"] == ALPHA
    start, tuned, saved = (load_file(folder / "model.safetensors") for folder in (root / "start", out / "finetuned",
                                                                                  out))
    assert set(saved) == set(tuned) == set(start)
    moved = 0
    for name, value in saved.items():
        expected = (1 - ALPHA) * start[name].double() + ALPHA * tuned[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(start[name], tuned[name])
    assert moved > 10  # most tensors trained: the mix is not trivially equal to either end
    AutoModel.from_pretrained(out)  # saved natively: plain transformers loads it
    # the final evaluation (eval_results.json's metrics, the card's) is the chosen mix's row
    row = sweep["rows"][sweep["chosen"]]["metrics"]
    for name in ("i2t_recall@1", "t2i_recall@1", "anchor_zero_shot_top1"):
        assert results["metrics"][f"eval_{name}"] == row[name], name


def test_the_card_has_the_trade_off_curve_and_the_table_of_mixes(run):
    _, out, results = run
    card = (out / "README.md").read_text()
    assert "![WiSE-FT trade-off" in card and "(wise_ft.png)" in card
    assert (out / "wise_ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`finetuned/`" in card
    for row in results["wise_ft"]["rows"]:
        line = f"| {row['alpha']:g} | {row['target']:.4f} | {row['anchor']:.4f} |"
        assert line in card, line
    assert card.count("**saved here**") == 1 and f"| {ALPHA:g} |" in card.split("**saved here**")[0].splitlines()[-1]


def test_rules_choose_from_the_table():
    rows = [dict(alpha=0.0, target=0.20, anchor=0.50), dict(alpha=0.5, target=0.40, anchor=0.495),
            dict(alpha=0.75, target=0.45, anchor=0.30), dict(alpha=1.0, target=0.45, anchor=0.10)]
    assert choose(rows, "anchor_drop", 0.01) == 1  # 0.75 and 1 lose more than a point on the anchor
    assert choose(rows, "anchor_drop", 0.0) == 0
    assert choose(rows, "target", 0.01) == 2  # 0.75 ties with 1: the smaller alpha
    assert choose(rows, "mean", 0.01) == 1  # 0.4475 against 0.35, 0.375, 0.275
    assert choose(rows, "0.75", 0.01) == 2
    assert parse_alphas("0.5, 0.25") == [0.0, 0.25, 0.5, 1.0]
    start, end = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor([3])}, {"w": torch.tensor([3.0, 2.0]),
                                                                           "n": torch.tensor([3])}
    assert torch.equal(interpolate(start, end, 0.0)["w"], start["w"])
    assert torch.equal(interpolate(start, end, 0.25)["w"], torch.tensor([1.5, -1.0]))


def test_settings_are_checked_before_any_data(tmp_path, capsys):
    from cli_helpers import flags
    from hf_siglip.cli.arguments import SiglipScriptArguments
    from hf_siglip.cli.main import main as cli_main
    from hf_siglip.training.wise_ft import wise_ft_problems

    problems = wise_ft_problems(SiglipScriptArguments(wise_ft_alphas="0,1.5", wise_ft_rule="best"))
    assert any("1.5 is outside [0, 1]" in problem for problem in problems)
    assert any("wise_ft_rule is one of" in problem for problem in problems)
    missing = wise_ft_problems(SiglipScriptArguments(wise_ft_alphas="0.5"))
    assert missing == ["wise_ft_alphas needs --anchor_dataset: the mixes are chosen by what they keep on it"]
    assert cli_main(["train", *flags({**TINY, "anchor_dataset": tmp_path / "nowhere", "output_dir": tmp_path})]) == 2
    assert "anchor_dataset" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(tmp_path), "--wise_ft_alphas", "0.5"]) == 2
    assert "wise_ft_alphas is a `hf-siglip train` setting" in capsys.readouterr().err


def test_zero_shot_top1_as_the_target_metric(start, tmp_path, capsys):
    """--wise_ft_target_metric zero_shot_top1: the target is each mix's zero-shot top-1 with the target's classes
    (digits' template captions tie, so their retrieval recall says little), in the rows, the rule and the card."""
    from hf_siglip.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES

    out = tmp_path / "out"
    results = _fine_tune(start, out, {"zero_shot_classes": DIGITS_CLASSES, "zero_shot_templates": DIGITS_TEMPLATES},
                         eval_strategy="no", wise_ft_alphas="0.5", wise_ft_rule="target",
                         wise_ft_target_metric="zero_shot_top1")
    sweep = results["wise_ft"]
    assert sweep["target_metric_name"] == "zero_shot_top1"
    for row in sweep["rows"]:
        assert row["target"] == row["metrics"]["zero_shot_top1"] and row["metrics"]["zero_shot_classes"] == 10
    assert sweep["chosen"] == choose(sweep["rows"], "target", 0.01)
    # the fine-tuned end point (alpha 1) against `hf-siglip eval` of the saved folder (its record: digits, classes)
    tuned = _evaluate(capsys, out / "finetuned", tmp_path / "e.json")
    assert sweep["rows"][-1]["target"] == pytest.approx(tuned["zero_shot_top1"], abs=1e-9)
    assert results["metrics"]["eval_zero_shot_top1"] == sweep["rows"][sweep["chosen"]]["target"]
    card = (out / "README.md").read_text()
    assert "| α | target zero-shot top-1" in card and "(wise_ft.png)" in card


def test_target_metric_settings_are_checked_before_any_data(start, tmp_path, capsys):
    from cli_helpers import flags
    from hf_siglip.cli.main import main as cli_main

    values = {**TINY, **ANCHOR, "dataset": start / "digits", "wise_ft_alphas": "0.5", "output_dir": tmp_path}
    assert cli_main(["train", *flags({**values, "wise_ft_target_metric": "zero_shot_top1"})]) == 2
    assert "wise_ft_target_metric zero_shot_top1 needs the target's class names" in capsys.readouterr().err
    assert cli_main(["train", *flags({**values, "wise_ft_target_metric": "accuracy"})]) == 2
    assert "wise_ft_target_metric is one of ('recall@1', 'zero_shot_top1'), got 'accuracy'" in capsys.readouterr().err
    # class names given but no labels in the data: found when the split is read, before training
    import datasets

    datasets.load_from_disk(start / "digits").remove_columns("label").save_to_disk(tmp_path / "unlabelled")
    values.update(dataset=tmp_path / "unlabelled", zero_shot_classes="x", wise_ft_target_metric="zero_shot_top1")
    assert cli_main(["train", *flags(values)]) == 2
    assert "has no label column 'label'" in capsys.readouterr().err
