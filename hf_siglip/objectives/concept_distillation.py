"""DiHT's concept distillation (Radenovic et al., CVPR 2023, arXiv 2301.02280, section 3) as a training objective.

A frozen teacher image model (an ImageNet-style classifier, or any image-feature model) sees every training image
once, before training: the `concept_targets` data step stores its class logits or its feature vector per row. A
linear head on the student's image embedding learns to predict them, and `concept_distillation_weight * loss` joins
the contrastive loss, so the image embedding is pushed to carry the teacher's visual concepts. Per image the loss is
`T^2 * KL(softmax(teacher / T) || softmax(head / T))` for logits (Hinton et al.'s T^2 keeps the gradients' size at
any temperature T) and `1 - cos(head, teacher)` for features.

Where the head lives: a submodule `concept_head` of the model, attached before `Trainer` wraps the model. The
optimizer groups, gradient clipping, mixed precision and DDP's gradient averaging (FSDP / DeepSpeed wrapping too)
then treat it as any other weight, with no collective of ours that could fall out of step with theirs (all-reducing
an outside head's gradients by hand would miss clipping and need its own hook per launcher). Its keys are in the
model's `_keys_to_ignore_on_save` (transformers' own mechanism, which every `save_pretrained` path and the Trainer's
resume check honour), so a saved model stays in its native format; the head is written beside each checkpoint
(`concept_head.safetensors`) and read back on resume.

Averaging is the objectives' rule (`hf_siglip.objectives.base`): the mean over the global batch's images. The logged
`concept_distillation_loss` is that global mean, unweighted.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.embedding import _features
from . import register_objective
from .base import Objective, ObjectiveConfig, attach_module, full_state, load_into

HEAD_NAME = "concept_head"
WEIGHTS_NAME = "concept_head.safetensors"
COLUMN = "concept_targets"  # written by the concept_targets data step, passed on by the collator
OUTPUT_LOSSES = {"logits": "kl", "features": "cosine"}  # concept_distillation_loss "auto", by the step's output
MISSING_TARGETS = (f"concept_distillation_weight > 0 needs a '{COLUMN}' column in the training data: add the "
                   "concept_targets data step (data_steps: [{concept_targets: {model: TEACHER}}]) or "
                   "hf_siglip.data.add_concept_targets")


def distillation_losses(predictions: torch.Tensor, targets: torch.Tensor, kind: str,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-image loss `(N,)` of the head's `predictions` against the teacher's `targets` (both `(N, C)`), in fp32."""
    predictions, targets = predictions.float(), targets.float()
    if kind == "kl":
        student = F.log_softmax(predictions / temperature, dim=-1)
        teacher = F.log_softmax(targets / temperature, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature ** 2
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(predictions, targets, dim=-1)
    raise ValueError(f"concept distillation loss is 'kl' or 'cosine', got {kind!r}")


def target_dim(dataset) -> int:
    """Length of the `concept_targets` vectors of `dataset`, read without decoding an image: from the column's
    fixed-length feature (what the data step writes, also for streams), else from the first row that has one."""
    if dataset is None:
        raise ValueError(f"{MISSING_TARGETS}; the trainer was given no train_dataset (the head's size comes from it)")
    features = getattr(dataset, "features", None)
    if features is None:
        raise ValueError(f"{MISSING_TARGETS}; this dataset's columns are unknown (a stream without features)")
    if COLUMN not in features:
        raise ValueError(MISSING_TARGETS)
    length = getattr(features[COLUMN], "length", -1)
    if length > 0:
        return length
    import datasets
    import pyarrow.compute as pc

    if isinstance(dataset, datasets.Dataset):
        lengths = pc.list_value_length(dataset.data.column(COLUMN)).drop_null()
        if len(lengths) and lengths[0].as_py() > 0:
            return lengths[0].as_py()
    raise ValueError(f"cannot tell the length of the '{COLUMN}' vectors: no row has one, or the column is a stream's "
                     "variable-length list (the concept_targets data step writes a fixed length)")


def image_embedding_dim(model) -> int:
    """Width of the model's image embeddings, which is its text embeddings' (they meet in one space): read from a
    one-token text forward, which every dual encoder has whatever its config calls the width."""
    was_training = model.training
    model.eval()  # no dropout: the run's random stream is left as it was
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            output = model.get_text_features(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    return _features(output, normalize=False).shape[-1]


@dataclass
class ConceptDistillationConfig(ObjectiveConfig):
    """Settings of concept distillation; the flags `concept_distillation_weight` / `_loss` / `_temperature` set them."""

    loss: str = field(default="auto", metadata={"help": "'kl' (a classifier teacher's logits), 'cosine' (a feature "
                                                       "teacher's vectors) or 'auto' (what the data step stored)."})
    temperature: float = field(default=1.0, metadata={"help": "kl only: softmax temperature T (loss scaled by T^2)."})
    seed: int = field(default=42, metadata={"help": "Seed of the head's initialisation (the run's seed)."})

    def validate(self, name: str) -> None:
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):  # also refuses nan
            raise ValueError(f"concept_distillation_weight must be >= 0 (0: off), got {self.weight!r}")
        if self.loss not in CONCEPT_DISTILLATION_LOSSES:
            raise ValueError(f"concept_distillation_loss must be one of {CONCEPT_DISTILLATION_LOSSES}, got "
                             f"{self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"concept_distillation_temperature must be > 0, got {self.temperature!r}")
        if self.loss == "cosine" and self.temperature != 1.0:
            raise ValueError("concept_distillation_temperature applies to the kl loss only (cosine has none)")


CONCEPT_DISTILLATION_LOSSES = ("auto", "kl", "cosine")


@register_objective
class ConceptDistillation(Objective):
    """A linear head `concept_head` on the image embedding, sized from the training data's `concept_targets`
    vectors, trained to predict them; the head's file is written beside each checkpoint."""

    name = "concept_distillation"
    config_class = ConceptDistillationConfig
    side_file = WEIGHTS_NAME
    batch_columns = (COLUMN,)

    def __init__(self, config, model, args, processing_class=None, train_dataset=None):
        super().__init__(config, model, args)
        self.temperature = config.temperature
        self.kind = None if config.loss == "auto" else config.loss
        in_features, out_features = image_embedding_dim(model), target_dim(train_dataset)
        self.head = attach_module(model, HEAD_NAME, lambda: nn.Linear(in_features, out_features), seed=config.seed)

    @classmethod
    def flags_turn_on(cls, args) -> bool:
        return args.concept_distillation_weight > 0

    @classmethod
    def config_from_flags(cls, args):
        return ConceptDistillationConfig(weight=args.concept_distillation_weight, loss=args.concept_distillation_loss,
                                         temperature=args.concept_distillation_temperature, seed=args.seed)

    def before_training(self, trainer) -> None:
        self.resolve_loss(trainer.args, trainer.data_steps_report)  # 'auto' follows the data step's report

    def resolve_loss(self, args, data_steps_report: dict) -> str:
        """The loss to use: the arguments' choice, or for 'auto' the one fitting the concept_targets step's output
        (recorded in its report); written back into `args` so the checkpoint and model card name it."""
        if self.kind is None:
            output = (data_steps_report or {}).get("concept_targets", {}).get("output")
            if output not in OUTPUT_LOSSES:
                raise ValueError("concept_distillation_loss 'auto' follows the concept_targets data step's output, "
                                 "which this run did not record: set it to 'kl' (teacher logits) or 'cosine' "
                                 "(teacher features)")
            self.kind = OUTPUT_LOSSES[output]
            if self.kind == "cosine" and self.temperature != 1.0:
                raise ValueError("concept_distillation_temperature applies to the kl loss only, and 'auto' chose "
                                 "cosine (the concept_targets step stored features)")
        args.concept_distillation_loss = self.kind
        return self.kind

    def losses(self, image_embeds: torch.Tensor, inputs) -> torch.Tensor:
        """Per-image losses `(N,)` of a batch (`inputs` holds its `concept_targets`)."""
        if COLUMN not in inputs:
            raise ValueError(MISSING_TARGETS)
        if self.kind is None:
            raise ValueError("concept_distillation_loss is still 'auto': SiglipTrainer.train resolves it")
        predictions = self.head(image_embeds.to(self.head.weight.dtype))
        return distillation_losses(predictions, inputs[COLUMN], self.kind, self.temperature)

    def count(self, batch) -> int:
        return len(batch[COLUMN]) if COLUMN in batch else 0

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        return self.losses(outputs.image_embeds, batch).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state(self.head)

    def load_state_dict(self, state) -> None:
        load_into(self.head, state)

    def card(self) -> dict:
        card = {"concept_distillation_weight": self.weight, "concept_distillation_loss": self.kind or "auto"}
        if self.kind != "cosine":
            card["concept_distillation_temperature"] = self.temperature
        return card


__all__ = ["COLUMN", "ConceptDistillation", "ConceptDistillationConfig", "WEIGHTS_NAME", "distillation_losses",
           "target_dim"]
