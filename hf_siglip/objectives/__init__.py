"""Training objectives: one module per signal beside the sigmoid pair loss (see `base.Objective`).

A run turns objectives on with the `objectives` setting, a mapping from name to settings (a recipe's YAML mapping, or
JSON on the command line: `--objectives '{"captioning": {"weight": 2.0}}'`). A name is either a built-in objective
(the module `hf_siglip.objectives.<name>`) or a user's, as `package.module:Class` (the class is registered on
import). Momentum distillation and concept distillation also keep their flat flags (`teacher_momentum`,
`concept_distillation_weight`, ...), which build their settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

from .base import Objective, ObjectiveConfig, attach_module

OBJECTIVES: dict[str, type[Objective]] = {}
# the order objectives are built in: a teacher copies the model after every head is attached
BUILT_IN = ("concept_distillation", "captioning", "itm", "mlm", "momentum_teacher")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` reachable by its `name` from recipes and flags."""
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    """The class registered as `name`, importing its module: `hf_siglip.objectives.<name>`, or `module:Class`."""
    if ":" in name:
        module_name, class_name = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"objectives: cannot import {module_name!r} for {name!r} ({error})") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ValueError(f"objectives: {name!r} is not an hf_siglip.objectives.Objective subclass")
        return cls
    if name not in OBJECTIVES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    if name not in OBJECTIVES:
        known = sorted(set(BUILT_IN) | set(OBJECTIVES))
        raise ValueError(f"objectives: unknown objective {name!r}; choose from {known} or give 'module:Class'")
    return OBJECTIVES[name]


def parse_objectives(value) -> dict[str, ObjectiveConfig]:
    """`{name: settings}` (mapping, JSON text, or None) -> `{name: validated config dataclass}`."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"objectives: not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"objectives must be a mapping from objective name to settings, got {type(value).__name__}")
    configs = {}
    for name, settings in value.items():
        cls = objective_class(name)
        if isinstance(settings, ObjectiveConfig):
            config = settings
        else:
            settings = settings or {}
            if not isinstance(settings, dict):
                raise ValueError(f"objectives.{name}: settings must be a mapping, got {settings!r}")
            known = {f.name for f in dataclasses.fields(cls.config_class)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"objectives.{name}: unknown setting(s) {unknown}; its settings are {sorted(known)}")
            config = cls.config_class(**settings)
        config.validate(name)
        configs[name] = config
    return configs


FLAG_OBJECTIVES = ("concept_distillation", "momentum_teacher")  # objectives with flat flags of their own


def flag_objectives(args) -> dict[str, ObjectiveConfig]:
    """`{name: validated settings}` of the objectives the flat flags turn on (their settings are checked also when
    they are off, so a bad value fails whatever the weight)."""
    configs = {}
    for name in FLAG_OBJECTIVES:
        config = objective_class(name).config_from_flags(args)
        config.validate(name)
        if objective_class(name).flags_turn_on(args):
            configs[name] = config
    return configs


def build_objectives(model, args, processing_class=None, train_dataset=None) -> list[Objective]:
    """The objectives `args` turns on, built in order (built-ins first, a teacher last), heads attached to `model`."""
    configs = args.objectives or {}
    names = [name for name in BUILT_IN if name in configs] + [name for name in configs if name not in BUILT_IN]
    objectives = []
    for name in names:
        objective = objective_class(name)(configs[name], model, args, processing_class=processing_class,
                                          train_dataset=train_dataset)
        objective.check(model)
        objectives.append(objective)
    return objectives


def objective_settings(args) -> dict[str, dict]:
    """`{name: settings}` of a run's objectives as plain values (JSON-able), for the card and the start-up summary."""
    return {name: dataclasses.asdict(config) for name, config in (args.objectives or {}).items()}


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "attach_module", "build_objectives", "flag_objectives",
           "objective_class",
           "objective_settings", "parse_objectives", "register_objective"]
