"""ALBEF's momentum distillation (Li et al. 2021, arXiv 2107.07651, section 3.3) as a training objective
(`hf_siglip.objectives`).

A momentum teacher is an exponential moving average (EMA) of the model being trained, updated after each optimizer
step: `teacher = m * teacher + (1 - m) * model` (ALBEF: m = 0.995). Its embeddings of the same batch give soft
targets, `sigmoid(teacher logit)` per pair, which the loss mixes with the ids' hard targets:
`(1 - w) * target + w * sigmoid(teacher logit)` (`hf_siglip.loss_terms.teacher`), with w = loss_config.teacher_weight
ramped up linearly over `teacher_warmup_steps` optimizer steps (ALBEF: over the first epoch). Under DDP each process
holds the same teacher (the same updates of the same weights); the teacher's text embeddings travel the loss's ring
with the student's. The teacher's weights are saved beside each checkpoint and read back on resume.

The teacher's embeddings can also be what FFF's mining rules compare (`loss_config.mine_with = "teacher"`): a model
that moves slowly does not pull in its own mined pairs as fast as the student does. With gradient accumulation the
teacher embeds each micro-batch of the accumulation window; the targets are those of the whole batch.
"""

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from ..loss import Teacher
from . import register_objective
from .base import Objective, ObjectiveConfig, full_state, load_into

WEIGHTS_NAME = "momentum_teacher.safetensors"


@dataclass
class MomentumTeacherConfig(ObjectiveConfig):
    """Settings of the momentum teacher; the flags `teacher_momentum` / `teacher_warmup_steps` set them. Its
    targets' weight in the loss is the loss's own setting, `loss_config.teacher_weight` (`weight` is unused)."""

    momentum: float = field(default=0.995, metadata={"help": "EMA momentum m (ALBEF: 0.995)."})
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps over which the targets' weight ramps "
                                                           "linearly from 0 to loss_config.teacher_weight."})

    def validate(self, name: str) -> None:
        super().validate(name)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"teacher_momentum must be in [0, 1), got {self.momentum!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"teacher_warmup_steps must be >= 0, got {self.warmup_steps!r}")


@register_objective
class MomentumTeacher(Objective):
    """The EMA copy of the dual encoder (`self.model`, without other objectives' heads), updated after each optimizer
    step; its embeddings of each batch are the pair loss's soft targets (and, with `loss_config.mine_with =
    "teacher"`, what mining compares). Saved beside each checkpoint, read back on resume from any folder."""

    name = "momentum_teacher"
    config_class = MomentumTeacherConfig
    side_file = WEIGHTS_NAME

    def __init__(self, config, model, args, processing_class=None, train_dataset=None):
        super().__init__(config, model, args)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for head in getattr(model, "_objective_modules", ()):  # other objectives' heads: not part of the teacher
            delattr(self.model, head)
        self.model._keys_to_ignore_on_save = None

    @classmethod
    def config_from_flags(cls, args):
        momentum = 0.995 if args.teacher_momentum is None else args.teacher_momentum
        return MomentumTeacherConfig(momentum=momentum, warmup_steps=args.teacher_warmup_steps)

    @classmethod
    def flags_turn_on(cls, args) -> bool:
        return args.teacher_momentum is not None

    def setup(self, trainer) -> None:
        parameter = next(trainer.model.parameters())  # the Trainer moved the model to its device
        self.model.to(device=parameter.device)

    @torch.no_grad()
    def on_optimizer_step(self, model) -> None:
        student = dict(model.named_parameters())
        for name, parameter in self.model.named_parameters():
            parameter.lerp_(student[name].detach().to(parameter.dtype), 1.0 - self.config.momentum)
        student_buffers = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(student_buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state(self.model)

    def load_state_dict(self, state) -> None:
        load_into(self.model, state)

    def target_weight(self, step: int, full_weight: float) -> float:
        """The targets' teacher weight at optimizer step `step`: a linear ramp to `full_weight`."""
        if self.config.warmup_steps <= 0:
            return full_weight
        return full_weight * min(1.0, step / self.config.warmup_steps)

    def pair_loss(self, trainer, config, micro_batches):
        """The teacher's outputs for the step's micro-batches (one, or the accumulation window), concatenated as the
        loss sees the batch, with the ramped weight. Evaluation gets the plain loss: no soft targets, and a teacher
        only to mine with."""
        mines = bool(config.mining) and config.mine_with == "teacher"
        if trainer.model.training:
            weight = self.target_weight(trainer.state.global_step, config.teacher_weight)
        elif mines:
            weight = 0.0
        else:
            return config, None
        with torch.no_grad():
            outputs = [trainer._embed(self.model, batch) for batch in micro_batches]
        image_embeds = torch.cat([output.image_embeds for output in outputs])
        text_embeds = torch.cat([output.text_embeds for output in outputs])
        return dataclasses.replace(config, teacher_weight=weight), Teacher(
            image_embeds, text_embeds, outputs[0].logit_scale, outputs[0].logit_bias)

    def card(self) -> dict:
        return {"teacher_momentum": self.config.momentum, "teacher_warmup_steps": self.config.warmup_steps}


__all__ = ["MomentumTeacher", "MomentumTeacherConfig", "WEIGHTS_NAME"]
