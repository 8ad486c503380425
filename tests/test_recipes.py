"""Every recipe in hf_siglip/recipes/ runs through `hf-siglip train` at a tiny scale (same YAML, sizes overridden)."""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import SiglipModel

from cli_helpers import RECIPES, TINY, flags, warning_lines
from conftest import tiny_training_setup
from data_fixtures import save_tiny_blip_captioner, save_tiny_vit_teacher
from hf_siglip.cli.main import main as cli_main
from hf_siglip.hub import usage_code


@pytest.fixture(scope="module")
def native_tiny_checkpoint(tmp_path_factory):
    """A tiny SigLIP in the native transformers format, with a processor, sized for the tiny demo."""
    path = tmp_path_factory.mktemp("native_tiny")
    model, processor, _, _ = tiny_training_setup(image_size=16)
    model.save_pretrained(path / "ours")
    SiglipModel.from_pretrained(path / "ours").save_pretrained(path / "native")
    processor.save_pretrained(path / "native")
    return path / "native"


def recipe_steps(name: str, **models) -> str:
    """The recipe's own data steps as a --data_steps flag, each step's `model` pointed at a local tiny one
    (`models[step name]`), as a user without network access would run it."""
    steps = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["data_steps"]
    for entry in steps:
        ((step, settings),) = entry.items()
        if step in models:
            settings["model"] = str(models[step])
    return json.dumps(steps)


def data_report(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())["data"]


def logged_data_counts(output_dir: Path) -> dict:
    """The data-step counts the trainer logged (with its first training loss)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {key: value for entry in history for key, value in entry.items() if key.startswith("data/")}


def run_recipe(name, tmp_path, **overrides) -> Path:
    output_dir = tmp_path / name
    assert cli_main(["train", "--config", str(RECIPES / f"{name}.yaml"),
                     *flags({**TINY, "output_dir": output_dir, **overrides})]) == 0
    for artifact in ("model.safetensors", "config.json", "README.md", "eval_results.json", "training_curves.png",
                     "tokenizer.json"):
        assert (output_dir / artifact).exists(), artifact
    card = (output_dir / "README.md").read_text()
    assert f"Recipe: {name}" in card
    assert "\ni2t_recall@1 " in card and "\nzero_shot_top1 " in card  # retrieval and zero-shot both reach the card
    metrics = json.loads((output_dir / "eval_results.json").read_text())["metrics"]
    assert 0.0 <= metrics["eval_i2t_recall@1"] <= 1.0
    check_example_card(name, card)
    return output_dir


EXAMPLE_CARDS = RECIPES.parent.parent / "model_cards" / "examples"


def check_example_card(name: str, card: str) -> None:
    """model_cards/examples/<recipe>.md shows what the recipe's saved card looks like (written by this test at tiny
    scale with HF_SIGLIP_WRITE_EXAMPLE_CARDS=1); it must keep the sections the card has now."""
    example = EXAMPLE_CARDS / f"{name}.md"
    if os.environ.get("HF_SIGLIP_WRITE_EXAMPLE_CARDS"):
        example.write_text(re.sub(r"/[^\s'\"()`]*pytest-\d+/[^\s'\"()`]*", "<local folder>", card))
    assert example.exists(), f"no {example}: HF_SIGLIP_WRITE_EXAMPLE_CARDS=1 pytest tests/test_recipes.py writes it"
    headings = [[line for line in text.splitlines() if line.startswith("#")] for text in (example.read_text(), card)]
    assert headings[0] == headings[1], f"{example} is out of date: regenerate it (HF_SIGLIP_WRITE_EXAMPLE_CARDS=1)"


def test_every_recipe_is_tested_and_documents_its_paper():
    tested = {"siglip_from_scratch", "siglit_locked_image_tower", "finetune_pretrained", "msiglip_bottleneck",
              "fff_multi_positive", "fff_multi_positive_safe", "diht_cat_hard_negatives", "blip_capfilt",
              "blip_bootstrap",  # tests/test_bootstrap.py
              "siglip_label_noise",
              "albef_momentum_distillation", "diht_concept_distillation", "resolution_adaptation",
              "siglip2_captioning", "coca_captioning",  # these two: tests/test_captioning.py
              "albef_pretrain", "blip_pretrain"}  # these two: tests/test_itm_mlm.py
    assert {path.stem for path in RECIPES.glob("*.yaml")} == tested
    for path in RECIPES.glob("*.yaml"):
        text = path.read_text()
        assert "section" in text and "hf-siglip train --config" in text, path.name
        assert isinstance(yaml.safe_load(text), dict)
    assert len(list((RECIPES / "accelerate_configs").glob("*.yaml"))) == 5


def test_albef_momentum_distillation_keeps_a_teacher(tmp_path):
    output_dir = run_recipe("albef_momentum_distillation", tmp_path, teacher_warmup_steps=1, save_strategy="steps",
                            save_steps=1)
    checkpoint = output_dir / "checkpoint-2"
    # the teacher's weights are as readable as the rest of the checkpoint (safetensors alone writes 0600)
    assert (checkpoint / "momentum_teacher.safetensors").stat().st_mode == (checkpoint / "config.json").stat().st_mode
    card = (output_dir / "README.md").read_text()
    assert '"teacher_momentum": 0.995' in card  # the card's loss options name the distillation


def test_diht_concept_distillation_with_a_classifier_teacher(tmp_path):
    teacher = save_tiny_vit_teacher(tmp_path / "vit")  # the recipe names google/vit-base-patch16-224
    output_dir = run_recipe("diht_concept_distillation", tmp_path, save_strategy="steps", save_steps=1,
                            data_steps=recipe_steps("diht_concept_distillation", concept_targets=teacher))
    assert data_report(output_dir)["concept_targets"] == {"output": "logits", "undecodable_images": 0, "rows_in": 32,
                                                          "rows_out": 32}
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["concept_distillation_loss"] > 0 for entry in history if "loss" in entry] == [True, True]
    head = output_dir / "checkpoint-2" / "concept_head.safetensors"  # the head travels with checkpoints,
    assert head.stat().st_mode == (output_dir / "checkpoint-2" / "config.json").stat().st_mode  # as readable
    model, loading = SiglipModel.from_pretrained(output_dir, output_loading_info=True)  # not with the model
    assert loading["unexpected_keys"] == set() and loading["missing_keys"] == set(), loading
    assert '"concept_distillation_loss": "kl"' in (output_dir / "README.md").read_text()  # 'auto' resolved


def test_siglip_from_scratch_then_eval(tmp_path):
    output_dir = run_recipe("siglip_from_scratch", tmp_path)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "siglip"  # no bottleneck: saved as a plain SiglipModel

    # plain transformers loads it without remote code and without a warning about this model. transformers 5.24
    # itself notes that its *default* SiglipTextConfig() (vocabulary 32,000, bos/eos 49406/49407) is invalid: its
    # from_pretrained builds one to log the config, for every SiglipModel checkpoint (Google's too)
    script = f"from transformers import SiglipModel; SiglipModel.from_pretrained({str(output_dir)!r})"
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    about_this_model = [line for line in warning_lines(plain.stderr) if "(between 0 and 31999)" not in line]
    assert plain.returncode == 0 and about_this_model == [], plain.stderr[-2000:]

    # the card: model-index results the Hub shows, the run's settings, and a usage snippet that runs as written
    card = ModelCard.load(output_dir / "README.md")
    metrics = json.loads((output_dir / "eval_results.json").read_text())["metrics"]
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results["image-to-text recall@1"] == round(metrics["eval_i2t_recall@1"], 4)
    assert results["zero-shot top-1 accuracy"] == round(metrics["eval_zero_shot_top1"], 4)
    assert card.data.eval_results[0].dataset_name == "hf_siglip demo" and set(card.data.metrics) == {"recall",
                                                                                                    "accuracy"}
    for expected in ("| global batch | 16 |", "| optimizer steps | 2 |", "| torch |", "CPU process(es)",
                     "A toy model", "16 images and their captions (4 per image)"):
        assert expected in card.text, expected
    snippet = subprocess.run([sys.executable, "-c", usage_code(card.text, load_from=output_dir)], text=True,
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert snippet.returncode == 0, snippet.stderr[-2000:]
    probabilities = ast.literal_eval(snippet.stdout.strip().splitlines()[-1])  # it prints {text: probability}
    assert set(probabilities) == {"a red square", "a blue circle"}
    assert all(0.0 < p < 1.0 for p in probabilities.values())

    data = {key: TINY[key] for key in ("demo_train_size", "demo_test_size", "demo_image_size", "max_length")}
    assert cli_main(["eval", "--checkpoint", str(output_dir), "--few_shot", "1", "--output_file",
                     str(tmp_path / "eval.json"), *flags(data)]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    wanted = {"i2t_recall@1", "t2i_recall@5", "zero_shot_top1", "zero_shot_top5", "linear_probe_top1_1shot"}
    assert wanted <= set(metrics)


def test_siglit_locks_and_caches_the_pretrained_image_tower(tmp_path, native_tiny_checkpoint):
    output_dir = run_recipe("siglit_locked_image_tower", tmp_path, vision_model_name_or_path=native_tiny_checkpoint)
    assert data_report(output_dir)["image_embedding_cache"] == {"undecodable_images": 0, "rows_in": 32,
                                                                "rows_out": 32}
    trained, source = (SiglipModel.from_pretrained(path) for path in (output_dir, native_tiny_checkpoint))
    for (name, before), after in zip(source.vision_model.named_parameters(), trained.vision_model.parameters()):
        assert torch.equal(before, after), name


def test_finetune_pretrained_from_a_native_checkpoint(tmp_path, native_tiny_checkpoint):
    output_dir = run_recipe("finetune_pretrained", tmp_path, model_name_or_path=native_tiny_checkpoint)
    assert "Fine-tuned from" in (output_dir / "README.md").read_text()
    tuned = SiglipModel.from_pretrained(output_dir)  # still a plain transformers checkpoint
    assert tuned.logit_scale.shape == (1,)


def test_resolution_adaptation_resamples_a_checkpoint_to_a_larger_size(tmp_path, native_tiny_checkpoint):
    output_dir = run_recipe("resolution_adaptation", tmp_path, model_name_or_path=native_tiny_checkpoint, image_size=32)
    tuned = SiglipModel.from_pretrained(output_dir)  # plain transformers, at the new size
    assert tuned.config.vision_config.image_size == 32
    assert tuned.vision_model.embeddings.position_embedding.weight.shape[0] == (32 // 8) ** 2


def test_msiglip_bottleneck(tmp_path, native_tiny_checkpoint):
    output_dir = run_recipe("msiglip_bottleneck", tmp_path, tokenizer_name_or_path=native_tiny_checkpoint,
                            bottleneck_dim=8)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["text_config"]["bottleneck_dim"] == 8


def run_fff_recipe(name, tmp_path):
    """The FFF recipe `name` through the command with a tiny local captioner, mining from the tiny run's second step;
    returns its output folder, its loss settings and, per logged step, what the loss counted."""
    captioner = save_tiny_blip_captioner(tmp_path / "blip")
    loss_config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["loss_config"]
    assert loss_config["mining_start_step"] > 0  # the recipe waits before mining (a random init mines everything)
    output_dir = run_recipe(name, tmp_path, data_steps=recipe_steps(name, pseudo_captions=captioner),
                            loss_config=json.dumps({**loss_config, "mining_start_step": 1}))
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = {key: [entry[key] for entry in history if key in entry]
              for key in ("mined_positives_per_image", "positives_per_image", "pairs_per_image")}
    assert all(len(values) == 2 for values in logged.values()), logged
    return output_dir, loss_config, logged


def test_fff_as_published_makes_mined_pairs_positive(tmp_path):
    output_dir, loss_config, logged = run_fff_recipe("fff_multi_positive", tmp_path)
    # FFF's method by default: every rule on, image-text included, and what they find becomes a positive
    assert loss_config.get("mined_pairs", "positive") == "positive"
    assert all(loss_config[rule] is not None for rule in ("mine_image_text", "mine_image_image", "mine_text_text"))
    mined, positives, pairs = logged.values()
    assert mined[0] == 0 and mined[1] > 0  # off at step 0, on from step 1 (a random model: cosines near 1)
    assert positives[0] == 5  # k = 5 captions of its own per image
    assert positives[1] == pytest.approx(positives[0] + mined[1])  # mined pairs count as positives
    assert pairs[1] == pairs[0] == 16 * 5  # and every pair stays in the loss
    report = data_report(output_dir)
    assert report["pseudo_captions"]["rows"] == 32 and report["pseudo_captions"]["rows_out"] == 32
    assert report["caption_sampling"] == {"k": 5} and "image_augmentation" in report
    logged_counts = logged_data_counts(output_dir)
    assert logged_counts["data/pseudo_captions/rows_in"] == 32 and logged_counts["data/caption_sampling/k"] == 5
    assert "| pseudo_captions/rows_out | 32 |" in (output_dir / "README.md").read_text()


def test_fff_safe_variant_leaves_mined_caption_pairs_out_of_the_loss(tmp_path):
    output_dir, loss_config, logged = run_fff_recipe("fff_multi_positive_safe", tmp_path)
    assert loss_config["mined_pairs"] == "ignore" and loss_config["mine_text_text"] is not None
    assert loss_config.get("mine_image_text") is None and loss_config.get("mine_image_image") is None
    mined, positives, pairs = logged.values()
    assert mined[0] == 0 and mined[1] > 0
    assert positives[1] == positives[0] == 5  # found pairs are not positives...
    assert pairs[0] == 16 * 5 and pairs[1] == pytest.approx(pairs[0] - mined[1])  # ...and leave the loss
    assert '"mined_pairs": "ignore"' in (output_dir / "README.md").read_text()  # the card names the setting


def test_blip_capfilt_keeps_the_best_caption_per_image(tmp_path, native_tiny_checkpoint):
    captioner = save_tiny_blip_captioner(tmp_path / "blip")
    steps = recipe_steps("blip_capfilt", pseudo_captions=captioner, capfilt=native_tiny_checkpoint)
    output_dir = run_recipe("blip_capfilt", tmp_path, data_steps=steps)
    report = data_report(output_dir)["capfilt"]
    # the demo's 4 captions per image plus one pseudo-caption: 5 candidates, the best one kept
    assert report["captions"] == 32 * 5 and report["captions_kept"] == 32 and report["rows_out"] == 32
    assert logged_data_counts(output_dir)["data/capfilt/captions_kept"] == 32


def test_label_noise_study(tmp_path):
    output_dir = run_recipe("siglip_label_noise", tmp_path, demo_train_size=200)
    report = data_report(output_dir)["label_noise"]
    for kind in ("image", "text", "pairing"):  # p = 0.2 of 200 rows each, drawn independently
        assert 20 <= report[f"rows_{kind}_noise" if kind != "pairing" else "rows_pairing_shuffled"] <= 60, report
    assert logged_data_counts(output_dir)["data/label_noise/rows_in"] == 200


def test_positive_groups_from_a_flag(tmp_path, native_tiny_checkpoint):
    """A step no recipe lists, reached from --data_steps: groups found with a checkpoint, used as positive ids."""
    steps = [{"positive_groups": {"model": str(native_tiny_checkpoint), "image_threshold": 0.99,
                                  "text_threshold": 0.999}}]
    output_dir = run_recipe("siglip_from_scratch", tmp_path, data_steps=json.dumps(steps))
    report = data_report(output_dir)["positive_groups"]
    assert report["rows"] == 32 and 1 <= report["groups"] <= 32
    # the demo's captions repeat (30 classes' templates): identical captions embed identically and are grouped
    assert report["text_text_links"] > 0 and report["groups"] < 32


@pytest.mark.skipif(
    importlib.util.find_spec("spacy") is None or importlib.util.find_spec("pytesseract") is None
    or shutil.which("tesseract") is None,
    reason="CAT filtering needs the [data] extra (spaCy, pytesseract) and Debian's tesseract-ocr",
)
def test_diht_cat_filter_with_hard_negatives(tmp_path):
    steps = yaml.safe_load((RECIPES / "diht_cat_hard_negatives.yaml").read_text())["data_steps"]
    steps[0]["cat_filter"]["min_complexity"] = 1
    output_dir = run_recipe("diht_cat_hard_negatives", tmp_path, data_steps=json.dumps(steps))
    report = data_report(output_dir)["cat_filter"]
    assert report["rows_in"] == 32 and report["rows_out"] == report["rows_in"] - report["rows_removed"]
    assert logged_data_counts(output_dir)["data/cat_filter/rows_in"] == 32


def test_documented_two_process_launch_line(tmp_path):
    """The README's `accelerate launch` line (2 gloo processes, the CPU config) with the recipe at tiny scale."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [accelerate, "launch", "--config_file", str(RECIPES / "accelerate_configs" / "cpu_two_processes.yaml"),
               "--main_process_port", "29633", "-m", "hf_siglip", "train", "--config",
               str(RECIPES / "siglip_from_scratch.yaml"),
               *flags({**TINY, "output_dir": tmp_path / "ddp", "use_cpu": "false", "disable_tqdm": "true"})]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Evaluation (demo, held-out split)") == 1  # reported once, by the main process
    assert run.stdout.count("Training on the embedded demo") == 1  # the start-up summary too
    assert "  processes: 2 on cpu" in run.stdout
    assert warning_lines(run.stderr) == []  # no pin_memory, find_unused_parameters or special-token notices
    history = json.loads((tmp_path / "ddp" / "eval_results.json").read_text())["metrics"]
    assert history["eval_i2t_recall@1"] >= 0.0 and (tmp_path / "ddp" / "model.safetensors").exists()
