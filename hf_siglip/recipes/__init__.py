"""The YAML recipes that ship with hf_siglip, found by name.

Each `<name>.yaml` here is a recipe for `hf-siglip train --config <name>` (no folder, no `.yaml` needed: the
installed package's copy is read; a path to any YAML file works as well). The first comment line of a recipe says
what it is for; `hf-siglip recipes` lists them with it. `accelerate_configs/` holds configs for
`accelerate launch --config_file`; `hf-siglip recipes --path <name>` prints where a recipe or an accelerate config
lies, e.g. `accelerate launch --config_file "$(hf-siglip recipes --path multi_gpu_ddp)" -m hf_siglip train ...`.

In Python, `load_recipe(name_or_path)` gives a recipe's fields as a dict (what `--config` reads). This module
imports nothing heavy: the command line calls it before transformers is loaded.
"""

import os
from pathlib import Path

from ..errors import UsageError

RECIPES_DIR = Path(__file__).parent
ACCELERATE_CONFIGS_DIR = RECIPES_DIR / "accelerate_configs"


class RecipeNotFoundError(UsageError):
    """`--config` names neither a file nor a packaged recipe (`hf-siglip` says so in one line, exit status 2)."""


def recipe_names() -> list[str]:
    """The packaged training recipes, by name (file name without `.yaml`), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def accelerate_config_names() -> list[str]:
    """The packaged `accelerate launch` configs, by name, sorted."""
    return sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def purpose(path: str | os.PathLike) -> str:
    """A recipe's one-line purpose: its first comment line, without the `#`."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip().startswith("#"):
                return line.strip().lstrip("#").strip()
    return ""


def recipe_path(name_or_path: str | os.PathLike, flag: str = "--config") -> str:
    """The file `--config` reads: an existing file as given, else the packaged recipe of that name (`fff_multi_positive`
    or `fff_multi_positive.yaml`; also `recipes/<name>.yaml` outside a clone of the repository, where older
    commands point)."""
    given = os.fspath(name_or_path)
    if os.path.isfile(given):
        return given
    folder, base = os.path.split(given)
    name = base[: -len(".yaml")] if base.endswith(".yaml") else base
    if folder in ("", "recipes") and name in recipe_names():
        return str(RECIPES_DIR / f"{name}.yaml")
    if folder in ("", "recipes", os.path.join("recipes", "accelerate_configs")) and name in accelerate_config_names():
        raise RecipeNotFoundError(f"{flag} {given}: {name} is an accelerate config, not a training recipe; give it "
                                  f"to accelerate launch --config_file \"$(hf-siglip recipes --path {name})\"")
    raise RecipeNotFoundError(f"{flag} {given}: no such file, and no packaged recipe of that name (they are: "
                              f"{', '.join(recipe_names())}; `hf-siglip recipes` says what each is for)")


def accelerate_config_path(name_or_path: str | os.PathLike) -> str:
    """An `accelerate launch --config_file` file: an existing file as given, else the packaged config of that name."""
    given = os.fspath(name_or_path)
    if os.path.isfile(given):
        return given
    base = os.path.basename(given)
    name = base[: -len(".yaml")] if base.endswith(".yaml") else base
    if name in accelerate_config_names():
        return str(ACCELERATE_CONFIGS_DIR / f"{name}.yaml")
    raise RecipeNotFoundError(f"{given}: no such file, and no packaged accelerate config of that name (they are: "
                              f"{', '.join(accelerate_config_names())})")


def load_recipe(name_or_path: str | os.PathLike) -> dict:
    """A recipe's fields as a dict, e.g. `load_recipe("siglip_from_scratch")["learning_rate"]`."""
    import yaml

    path = recipe_path(name_or_path)
    with open(path, encoding="utf-8") as file:
        loaded = yaml.safe_load(file) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a recipe is a mapping of field: value, got {type(loaded).__name__}")
    return loaded


def recipe_arguments(name_or_path: str | os.PathLike, **overrides):
    """`(data_args, model_args, training_args)` as `hf-siglip train --config NAME` builds them: the command's defaults,
    then the recipe, then `overrides` (any field, as a flag would), checked and completed (text length, image size)
    the same way. `data_args` is a `SiglipScriptArguments`, `model_args` a `SiglipModelArguments`,
    `training_args` a `SiglipTrainingArguments`; `hf_siglip.load_splits(data_args)` and
    `hf_siglip.build_model_and_processor(model_args, train, data_args)` take them on. A recipe's `data_steps` run
    in `hf-siglip train` only (in Python, the `hf_siglip.data` functions are the steps)."""
    import dataclasses

    from ..cli.arguments import DEMO_TRAINING_DEFAULTS, SiglipModelArguments, SiglipScriptArguments, validate_arguments
    from ..training.training_args import SiglipTrainingArguments

    values = {**DEMO_TRAINING_DEFAULTS, **load_recipe(name_or_path), **overrides}
    kinds = (SiglipScriptArguments, SiglipModelArguments, SiglipTrainingArguments)
    fields = [{field.name for field in dataclasses.fields(kind) if field.init} for kind in kinds]
    unknown = sorted(set(values) - set().union(*fields))
    if unknown:
        raise UsageError([f"unknown field {name} (see hf-siglip train --help)" for name in unknown])
    built = tuple(kind(**{key: value for key, value in values.items() if key in names})
                  for kind, names in zip(kinds, fields))
    validate_arguments(*built)  # one UsageError listing every problem; fills max_length and image_size
    return built


def describe() -> str:
    """What `hf-siglip recipes` prints: each recipe and accelerate config with its purpose."""
    width = max(len(name) for name in recipe_names() + accelerate_config_names())
    lines = ["Recipes (hf-siglip train --config NAME; hf-siglip recipes --path NAME prints the file):"]
    lines += [f"  {name:<{width}}  {purpose(RECIPES_DIR / f'{name}.yaml')}" for name in recipe_names()]
    lines += ["Accelerate configs (accelerate launch --config_file \"$(hf-siglip recipes --path NAME)\" "
              "-m hf_siglip train ...):"]
    lines += [f"  {name:<{width}}  {purpose(ACCELERATE_CONFIGS_DIR / f'{name}.yaml')}"
              for name in accelerate_config_names()]
    return "\n".join(lines)


__all__ = ["ACCELERATE_CONFIGS_DIR", "RECIPES_DIR", "RecipeNotFoundError", "accelerate_config_names",
           "accelerate_config_path", "describe", "load_recipe", "purpose", "recipe_arguments",
           "recipe_names", "recipe_path"]
