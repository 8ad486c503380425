"""The training-objective unit: one signal beside the sigmoid pair loss (docs/ARCHITECTURE.md, "Add an objective").

An objective owns its settings (a typed dataclass), its trainable heads (attached to the model before `Trainer` wraps
it, so optimizer groups, clipping, mixed precision and DDP/FSDP treat them as any other weight), its loss on the model
outputs and batch, its files beside each checkpoint and what the model card says of it. `SiglipTrainer` loops over
the objectives a run turns on; it never names one.

Averaging (the same for every objective): an objective's loss is a mean over "units" (images for a per-image head,
target tokens for a captioner). It returns the *sum* over its batch's units (`loss_sum`) and how many there are
(`count`); the trainer adds `weight * processes * loss_sum / global count` (the count summed over processes and the
gradient-accumulation window), so DDP's gradient average is the gradient of the global mean, with unequal local
batches too, and accumulating G micro-batches equals one batch G times larger.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class ObjectiveConfig:
    """Settings every objective has. Subclass it with typed fields, each with `metadata={"help": ...}`."""

    weight: float = field(default=1.0, metadata={"help": "Weight of this objective's mean loss beside the pair loss."})

    def validate(self, name: str) -> None:
        """Raise ``ValueError`` (one line, naming the setting) for a value that cannot work."""
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"objectives.{name}.weight must be a finite number >= 0, got {self.weight!r}")

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults (for the model card)."""
        defaults = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}


class Objective:
    """Base class of a training objective. Subclasses set `name` and `config_class`, attach their heads in
    `__init__` and implement `count` + `loss_sum` (a loss term) and/or `pair_loss` (a change to the pair loss)."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    # state_dict() is written beside each checkpoint under this name and read back on resume, from whichever folder
    side_file: ClassVar[str | None] = None
    # batch keys the objective reads beyond the model inputs and ids (kept when micro-batches are merged)
    batch_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ObjectiveConfig, model: nn.Module, args, processing_class=None, train_dataset=None):
        self.config = config

    @classmethod
    def config_from_flags(cls, args) -> ObjectiveConfig:
        """Settings from flat flags of its own (only objectives listed in `FLAG_OBJECTIVES` have them)."""
        raise NotImplementedError(f"{cls.name} has no flags of its own: set it under `objectives`")

    @classmethod
    def flags_turn_on(cls, args) -> bool:
        return False

    @property
    def weight(self) -> float:
        return self.config.weight

    # --- at start-up -------------------------------------------------------------------------------------

    def check(self, model) -> None:
        """Raise `UsageError` in one line when `model` cannot serve this objective."""

    def setup(self, trainer) -> None:
        """Called once the Trainer is built (the model on its device, not yet wrapped)."""

    def before_training(self, trainer) -> None:
        """Called at the start of `train()`, before any batch (data-step reports are known by then)."""

    # --- per step ------------------------------------------------------------------------------------------

    def count(self, batch) -> int:
        """Units of `batch` its loss averages over (rows by default), read from the batch without a forward."""
        return len(batch["image_ids"])

    def prepare_step(self, trainer, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     batches: list) -> dict[str, float] | None:
        """Once per optimizer step on every process (collectives are allowed), before any `count` / `loss_sum` of
        the step: this process's detached embeddings of the whole step (the micro-batches of an accumulation window
        concatenated in order) and the step's `batches` (`loss_sum` is later called with these same objects). For
        what needs the whole step, e.g. ITM's hard negatives. Returns metrics to log (averaged like `<name>_loss`)."""
        return None

    def loss_sum(self, outputs, batch) -> torch.Tensor | None:
        """Sum over `batch`'s units of the per-unit loss, with autograd (None: this objective adds no term).
        `outputs` is the dual encoder's forward output for `batch`."""
        return None

    def pair_loss(self, trainer, config, micro_batches):
        """(loss config, teacher) for the pair loss of this step; the default leaves the pair loss as it is."""
        return config, None

    def on_optimizer_step(self, model) -> None:
        """After each optimizer step (e.g. an EMA update)."""

    # --- files and card --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def load_from(self, folder: str) -> None:
        """Read `side_file` from a checkpoint folder; a resumed run without it cannot go on exactly."""
        if self.side_file is None:
            return
        path = os.path.join(folder, self.side_file)
        if not os.path.exists(path):
            raise ValueError(f"resuming with the {self.name} objective needs {self.side_file} in {folder}")
        from safetensors.torch import load_file

        self.load_state_dict(load_file(path, device="cpu"))

    def card(self) -> dict[str, Any]:
        """Settings shown under the model card's hyperparameters."""
        return self.config.changed() | {"weight": self.weight}

    def save_pretrained(self, model, output_dir: str, processing_class=None) -> None:
        """Write what the objective adds to a finished model into `output_dir` (e.g. a captioner folder)."""


def attach_module(model: nn.Module, name: str, module: nn.Module, seed: int | None = None,
                  learning_rate: float | None = None) -> nn.Module:
    """Register `module` as the submodule `name` of `model`, on its device and dtype, its keys left out of what
    `save_pretrained` writes (transformers' `_keys_to_ignore_on_save`, which every save path and the resume check
    honour), so the saved dual encoder stays in its native format. `module` may be a factory called under `seed`
    (the same initial head whatever ran before). `learning_rate` (None: the run's) is the peak rate of its
    parameters (their optimizer group follows the run's schedule)."""
    if callable(module) and not isinstance(module, nn.Module):
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            module = module()
    parameter = next(model.parameters())
    module.to(device=parameter.device, dtype=parameter.dtype)
    model.add_module(name, module)
    model._objective_modules = (*getattr(model, "_objective_modules", ()), name)  # a teacher's copy leaves them out
    if learning_rate is not None:
        model._module_learning_rates = {**getattr(model, "_module_learning_rates", {}), name: float(learning_rate)}
    keys = {f"{name}.{key}" for key in module.state_dict()}
    model._keys_to_ignore_on_save = {*(getattr(model, "_keys_to_ignore_on_save", None) or ()), *keys}
    return module


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state on the CPU, whole (an FSDP2-sharded parameter is gathered: a collective, every process)."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu()
            for name, value in module.state_dict().items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in module.state_dict().items():
            value.copy_(state[name])


__all__ = ["Objective", "ObjectiveConfig", "attach_module", "full_state", "load_into"]
