"""Recipes by name: `--config fff_multi_positive` reads the packaged recipe from anywhere, a path still works, and
`hf-siglip recipes` lists each recipe and accelerate config with its purpose (the file's first comment line)."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from cli_helpers import RECIPES, REPO, cli_env
from hf_siglip import recipes
from hf_siglip.cli.arguments import (
    DEMO_TRAINING_DEFAULTS,
    SiglipModelArguments,
    SiglipScriptArguments,
    validate_arguments,
)
from hf_siglip.cli.main import main as cli_main
from hf_siglip.cli.main import parse_with_config
from hf_siglip.errors import UsageError
from hf_siglip.training.training_args import SiglipTrainingArguments

TYPES = (SiglipScriptArguments, SiglipModelArguments, SiglipTrainingArguments)


def parsed(config: str, tmp_path) -> dict:
    script, model, training = parse_with_config(TYPES, ["--config", config, "--output_dir", str(tmp_path / "out")],
                                                defaults=DEMO_TRAINING_DEFAULTS)
    return {"script": vars(script), "model": vars(model), "lr": training.learning_rate,
            "beta2": training.adam_beta2, "epochs": training.num_train_epochs}


@pytest.mark.parametrize("name", ["fff_multi_positive", "siglip_from_scratch"])
def test_a_recipe_name_reads_the_packaged_file_from_any_folder(name, tmp_path, monkeypatch):
    by_path = parsed(str(RECIPES / f"{name}.yaml"), tmp_path)
    assert by_path["script"]["recipe"] == name and by_path["lr"] == yaml.safe_load(
        (RECIPES / f"{name}.yaml").read_text())["learning_rate"]
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    for given in (name, f"{name}.yaml", f"recipes/{name}.yaml"):
        assert parsed(given, tmp_path) == by_path, given
    assert recipes.load_recipe(name) == yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def test_a_file_given_by_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "siglip_from_scratch").write_text("recipe: mine\nlearning_rate: 0.5\n")
    assert recipes.recipe_path("siglip_from_scratch") == "siglip_from_scratch"
    mine = parsed("siglip_from_scratch", tmp_path)
    assert mine["script"]["recipe"] == "mine" and mine["lr"] == 0.5
    assert (REPO / "recipes" / "siglip_from_scratch.yaml").samefile(RECIPES / "siglip_from_scratch.yaml")


def test_unknown_names_and_accelerate_configs_are_refused_naming_the_recipes():
    with pytest.raises(recipes.RecipeNotFoundError, match="no packaged recipe of that name.*fff_multi_positive"):
        recipes.recipe_path("fff_multi_positiv")
    with pytest.raises(recipes.RecipeNotFoundError, match="accelerate config, not a training recipe"):
        recipes.recipe_path("cpu_two_processes")
    result = subprocess.run([sys.executable, "-m", "hf_siglip", "train", "--config", "no_such_recipe"],
                            env=cli_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "no_such_recipe" in line]


def test_hf_siglip_recipes_lists_each_with_its_first_comment_line(capsys):
    assert cli_main(["recipes"]) == 0
    listing = capsys.readouterr().out.splitlines()
    sections = {"Recipes": sorted(RECIPES.glob("*.yaml")),
                "Accelerate configs": sorted((RECIPES / "accelerate_configs").glob("*.yaml"))}
    # the package ships *.yaml and accelerate_configs/*.yaml only (pyproject's package-data): a recipe saved under
    # another name (.yml) would neither install nor be listed, so nothing else may sit beside them
    assert {path.name for path in RECIPES.iterdir()} - {"__init__.py", "__pycache__", "accelerate_configs"} == \
        {path.name for path in sections["Recipes"]}
    assert set((RECIPES / "accelerate_configs").iterdir()) == set(sections["Accelerate configs"])
    listed, heading = {}, None  # each section's heading -> the names printed under it, in order
    for line in listing:
        if line.startswith("  "):
            listed[heading].append(line.split(maxsplit=1)[0])
        else:
            heading = line.split(" (")[0]
            listed[heading] = []
    assert listed == {heading: [path.stem for path in files] for heading, files in sections.items()}
    # those the README and the other tests name are there (an empty folder cannot pass)
    assert {"fff_multi_positive", "siglip_from_scratch", "finetune_pretrained"} <= set(listed["Recipes"])
    assert {"cpu_two_processes", "multi_gpu_ddp"} <= set(listed["Accelerate configs"])
    for path in [path for files in sections.values() for path in files]:
        first = next(line for line in path.read_text().splitlines() if line.startswith("#"))
        purpose = first.lstrip("#").strip()
        assert 20 <= len(purpose) <= 110 and purpose.endswith("."), f"{path.name}: one short sentence first"
        assert [line for line in listing if line.split(maxsplit=1) == [path.stem, purpose]], path.name
    assert cli_main(["recipes", "--path", "fff_multi_positive"]) == 0
    assert capsys.readouterr().out.strip() == str(RECIPES / "fff_multi_positive.yaml")
    assert cli_main(["recipes", "--path", "multi_gpu_ddp"]) == 0
    assert capsys.readouterr().out.strip() == str(RECIPES / "accelerate_configs" / "multi_gpu_ddp.yaml")


def fields_of(arguments) -> dict:
    return {field.name: getattr(arguments, field.name) for field in dataclasses.fields(arguments)}


def test_recipe_arguments_are_what_the_command_builds_and_refuse_what_it_refuses(tmp_path):
    """`hf_siglip.recipe_arguments` (the README's Python route) equals `hf-siglip train --config NAME --flag value`."""
    ours = recipes.recipe_arguments("fff_multi_positive_safe", output_dir=str(tmp_path), num_train_epochs=1)
    command = parse_with_config(TYPES, ["--config", "fff_multi_positive_safe", "--output_dir", str(tmp_path),
                                        "--num_train_epochs", "1"], defaults=DEMO_TRAINING_DEFAULTS)
    validate_arguments(*command)  # as hf-siglip train does before reading data: fills max_length, image_size
    assert fields_of(ours[0]) == fields_of(command[0]) and ours[0].max_length == 16
    assert fields_of(ours[1]) == fields_of(command[1]) and ours[1].image_size == 32
    assert fields_of(ours[2]) == fields_of(command[2]) and ours[2].adam_beta2 == 0.95
    assert ours[2].num_train_epochs == 1 and ours[2].loss_config.mined_pairs == "ignore"
    with pytest.raises(UsageError) as refused:
        recipes.recipe_arguments("siglip_from_scratch", learning_rat=0.1, per_device_train_batch_size=0)
    assert refused.value.problems[0].startswith("unknown field learning_rat")
    with pytest.raises(UsageError, match="per_device_train_batch_size"):
        recipes.recipe_arguments("siglip_from_scratch", per_device_train_batch_size=0, output_dir=str(tmp_path))
