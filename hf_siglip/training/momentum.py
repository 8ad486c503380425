"""ALBEF's momentum distillation (Li et al. 2021, arXiv 2107.07651, section 3.3) for `SiglipTrainer`.

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
import os

import torch
from transformers import TrainerCallback

from .checkpoint_files import save_beside_checkpoint
from ..loss import Teacher

WEIGHTS_NAME = "momentum_teacher.safetensors"


class MomentumTeacher(TrainerCallback):
    """The EMA copy of a model, kept up to date as a `TrainerCallback`."""

    def __init__(self, model, momentum: float, warmup_steps: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.momentum, self.warmup_steps = momentum, warmup_steps

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        teacher = dict(self.model.named_parameters())
        for name, parameter in model.named_parameters():
            teacher[name].lerp_(parameter.detach().to(teacher[name].dtype), 1.0 - self.momentum)
        teacher_buffers = dict(self.model.named_buffers())
        for name, buffer in model.named_buffers():
            teacher_buffers[name].copy_(buffer)

    def on_save(self, args, state, control, **kwargs):
        save_beside_checkpoint(self.model.state_dict(), args, state, WEIGHTS_NAME)

    def load(self, checkpoint_folder: str) -> bool:
        """Take the teacher's weights saved with a checkpoint; False when it holds none."""
        path = os.path.join(checkpoint_folder, WEIGHTS_NAME)
        if not os.path.exists(path):
            return False
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(path, device=str(next(self.model.parameters()).device)))
        return True

    def weight(self, step: int, full_weight: float) -> float:
        """The targets' teacher weight at optimizer step `step`: a linear ramp to `full_weight`."""
        if self.warmup_steps <= 0:
            return full_weight
        return full_weight * min(1.0, step / self.warmup_steps)


def teacher_targets(trainer, micro_batches, config):
    """(loss config, Teacher) for this step of `trainer` (a SiglipTrainer with `teacher_momentum` set): the teacher's
    outputs for the step's micro-batches (one, or the gradient-accumulation window), concatenated as the loss sees
    the batch. The teacher is created from the model at the first step (or read from the checkpoint a run resumes
    from), and its weight follows the warm-up ramp. Evaluation gets the plain loss: no soft targets, and a teacher
    only to mine with (loss_config.mine_with = "teacher")."""
    teacher = getattr(trainer, "_momentum_teacher", None)
    if teacher is None:
        teacher = MomentumTeacher(trainer.accelerator.unwrap_model(trainer.model), trainer.args.teacher_momentum,
                                  trainer.args.teacher_warmup_steps)
        if trainer.state.global_step > 0:  # resuming: the teacher of the checkpoint, not a copy of the student
            checkpoint = getattr(trainer, "resumed_from", None) or os.path.join(
                trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
            if not teacher.load(checkpoint):
                raise ValueError(f"resuming momentum distillation needs {WEIGHTS_NAME} in {checkpoint}")
        trainer._momentum_teacher = teacher
        trainer.add_callback(teacher)
    mines = bool(config.mining) and config.mine_with == "teacher"
    if trainer.model.training:
        weight = teacher.weight(trainer.state.global_step, config.teacher_weight)
    elif mines:
        weight = 0.0
    else:
        return config, None
    with torch.no_grad():
        outputs = [trainer._embed(teacher.model, batch) for batch in micro_batches]
    image_embeds = torch.cat([output.image_embeds for output in outputs])
    text_embeds = torch.cat([output.text_embeds for output in outputs])
    return dataclasses.replace(config, teacher_weight=weight), Teacher(
        image_embeds, text_embeds, outputs[0].logit_scale, outputs[0].logit_bias)


__all__ = ["MomentumTeacher", "teacher_targets"]
