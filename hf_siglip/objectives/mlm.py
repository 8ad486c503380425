"""Masked language modelling conditioned on the image (ALBEF, Li et al. 2021, arXiv 2107.07651, section 3.2) as a
training objective.

Each caption's tokens are masked with probability `mask_probability` (BERT, Devlin et al. 2019: 15%), a masked token
replaced by [MASK] 80% of the time, by a random token of the vocabulary 10% and left as it is 10%; pad and the
tokenizer's special tokens are never masked. The fusion encoder (`hf_siglip.objectives.fusion`) reads the masked
caption while cross-attending to the caption's own image's patch tokens, and the MLM head (BLIP's
`BlipTextOnlyMLMHead`) predicts the original tokens at the masked positions: cross-entropy summed over masked
tokens, divided by the global number of masked tokens (the objectives' rule), times `weight`.

The masks are drawn per caption from a generator seeded by (seed, optimizer step, the caption's row in the global
batch: processes by rank, each its accumulation window in order), one uniform triple per position (prefix-stable, so
the padded length does not matter): the same masks on any number of processes, under accumulation and after a
resume. Momentum distillation of the MLM targets (ALBEF's) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..captioner import IGNORE, caption_image_index, patch_tokens_of
from ..errors import UsageError
from . import register_objective
from .base import Objective, ObjectiveConfig, attach_module
from .fusion import (
    FusionSettings,
    attach_fusion_encoder,
    describe,
    fusion_and_head_state,
    fusion_settings,
    load_fusion_and_head_state,
    new_mlm_head,
    save_fusion,
    unsupported,
)

HEAD_NAME = "mlm_head"
WEIGHTS_NAME = "mlm.safetensors"


@dataclass
class MlmConfig(ObjectiveConfig, FusionSettings):
    """Settings of masked language modelling (`objectives: {mlm: {...}}`); fusion sizes are shared with itm."""

    mask_probability: float = field(default=0.15, metadata={
        "help": "Probability that a caption token is masked (BERT, ALBEF: 0.15); of those 80% [MASK], 10% random, "
                "10% kept."})

    def validate(self, name: str) -> None:
        super().validate(name)
        self.validate_fusion(name)
        if not (isinstance(self.mask_probability, (int, float)) and 0.0 < self.mask_probability < 1.0):
            raise ValueError(f"objectives.{name}.mask_probability must be in (0, 1), got {self.mask_probability!r}")


def mask_captions(input_ids: torch.LongTensor, first_row: int, seed: int, step: int, probability: float,
                  vocabulary) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(masked ids, labels: the original id where masked, -100 elsewhere) for captions `input_ids` `(T, L)` whose
    first row is row `first_row` of the global batch; BERT's 80/10/10 replacement."""
    length = input_ids.shape[1]
    draws = np.stack([np.random.default_rng([int(seed), int(step), first_row + row]).random((length, 3))
                      for row in range(len(input_ids))]) if len(input_ids) else np.zeros((0, length, 3))
    draws = torch.from_numpy(draws).to(input_ids.device)
    candidate = ~torch.isin(input_ids, torch.tensor(vocabulary.special, device=input_ids.device))
    chosen = candidate & (draws[..., 0] < probability)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    random_tokens = (draws[..., 2] * vocabulary.size).long().clamp_(max=vocabulary.size - 1)
    masked = torch.where(chosen & (draws[..., 1] < 0.8), torch.full_like(input_ids, vocabulary.mask), input_ids)
    masked = torch.where(chosen & (draws[..., 1] >= 0.8) & (draws[..., 1] < 0.9), random_tokens, masked)
    return masked, labels


@register_objective
class Mlm(Objective):
    """MLM head `mlm_head` on the shared `fusion_encoder`; units are masked tokens."""

    name = "mlm"
    config_class = MlmConfig
    side_file = WEIGHTS_NAME

    def __init__(self, config: MlmConfig, model, args, processing_class=None, train_dataset=None):
        super().__init__(config, model, args)
        self.problem = unsupported(model, train_dataset)
        if self.problem is not None:
            return
        settings = fusion_settings(config, args)
        self.seed = settings["seed"]
        self.fusion = attach_fusion_encoder(model, config, args, processing_class)
        self.head = attach_module(model, HEAD_NAME, lambda: new_mlm_head(self.fusion), seed=self.seed + 2,
                                 learning_rate=settings["learning_rate"])
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def check(self, model) -> None:
        if self.problem is not None:
            raise UsageError(f"the mlm objective {self.problem}")

    def prepare_step(self, trainer, image_embeds, text_embeds, batches) -> None:
        """Masks for the step's captions, by their rows in the global batch (one gather of the caption counts)."""
        accelerator = getattr(trainer, "accelerator", None)
        counts = torch.tensor([sum(len(batch["input_ids"]) for batch in batches)], device=image_embeds.device)
        row = 0
        if accelerator is not None and accelerator.num_processes > 1:
            row = int(accelerator.gather(counts)[:accelerator.process_index].sum())
        step = trainer.state.global_step if trainer is not None else 0
        self.masks = {}
        for batch in batches:
            ids = batch["input_ids"]
            masked, labels = mask_captions(ids, row, self.seed, step, self.config.mask_probability,
                                           self.fusion.vocabulary)
            self.masks[id(batch)] = (masked, labels, ids != self.fusion.vocabulary.pad)
            row += len(ids)

    def _masks(self, batch):
        masks = self.masks.get(id(batch))
        if masks is None:
            raise RuntimeError("the mlm objective's masks are drawn in prepare_step, once per optimizer step, before "
                               "count / loss_sum of the step's batches (SiglipTrainer calls it)")
        return masks

    def count(self, batch) -> int:
        return int((self._masks(batch)[1] != IGNORE).sum())

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        masked, labels, text_mask = self._masks(batch)
        patches = patch_tokens_of(outputs.vision_model_output)
        if patches is None:
            raise UsageError("the mlm objective needs the vision tower's patch tokens, and this batch's forward gave "
                             "none (cached image_embeds?)")
        index = caption_image_index(batch["image_ids"], batch["text_ids"])
        hidden = self.fusion(patches[index], masked, text_mask)[:, 1:]  # past [CLS]
        chosen = labels != IGNORE
        logits = self.head(hidden[chosen])  # only the masked positions (none: an empty term, still in the graph)
        return F.cross_entropy(logits.float(), labels[chosen], reduction="sum")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return fusion_and_head_state(self.fusion, self.head, HEAD_NAME)

    def load_state_dict(self, state) -> None:
        load_fusion_and_head_state(self.fusion, self.head, HEAD_NAME, state)

    def card(self) -> dict:
        return {"mlm_weight": self.weight, "mlm_mask_probability": self.config.mask_probability,
                "fusion_encoder": describe(self.fusion)}

    def save_pretrained(self, model, output_dir: str, processing_class=None) -> None:
        save_fusion(model, output_dir)


__all__ = ["WEIGHTS_NAME", "Mlm", "MlmConfig", "mask_captions"]
