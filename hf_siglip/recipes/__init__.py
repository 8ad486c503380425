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

from ..errors import HfSiglipError

RECIPES_DIR = Path(__file__).parent
ACCELERATE_CONFIGS_DIR = RECIPES_DIR / "accelerate_configs"


class RecipeNotFoundError(HfSiglipError, FileNotFoundError):
    """`--config` names neither a file nor a packaged recipe (`hf-siglip` says so in one line)."""


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
    or `fff_multi_positive.yaml`; also `recipes/<name>.yaml` outside a clone of the repository, where the README's
    older commands point)."""
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


def find_recipe(name_or_path: str | os.PathLike) -> str:
    """What `--config` reads: `recipe_path`'s answer, or the value unchanged when that finds nothing (the caller then
    says the file is missing)."""
    try:
        return recipe_path(name_or_path)
    except RecipeNotFoundError:
        return os.fspath(name_or_path)


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
           "accelerate_config_path", "describe", "find_recipe", "load_recipe", "purpose", "recipe_names", "recipe_path"]
