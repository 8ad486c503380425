"""DiHT's concept distillation (Radenovic et al., CVPR 2023, arXiv 2301.02280, section 3) for `SiglipTrainer`.

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

Averaging: a process's term is `weight * (sum of its images' losses) * W / (global image count)`, so DDP's average of
the gradients is the gradient of the mean over the global batch, also with unequal local batches (DESIGN decision 2).
The logged `concept_distillation_loss` is that global mean, unweighted.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .checkpoint_files import save_beside_checkpoint
from ..data.embedding import _features

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


def attach_head(model, in_features: int, out_features: int, seed: int) -> nn.Linear:
    """A linear head registered as `model.concept_head`, initialised from `seed` alone (the same head whatever ran
    before), its keys left out of what `save_pretrained` writes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(in_features, out_features)
    parameter = next(model.parameters())
    head.to(device=parameter.device, dtype=parameter.dtype)
    model.add_module(HEAD_NAME, head)
    keys = {f"{HEAD_NAME}.{name}" for name, _ in head.named_parameters()}
    model._keys_to_ignore_on_save = {*(getattr(model, "_keys_to_ignore_on_save", None) or ()), *keys}
    return head


class ConceptDistillation(TrainerCallback):
    """The head, the loss settings, and the head's file in each checkpoint (`on_save`; `load` on resume).

    Args:
        model: the dual encoder (before `Trainer` wraps it); gets the `concept_head` submodule.
        args: `SiglipTrainingArguments` with `concept_distillation_weight` > 0.
        train_dataset: the training rows, with the `concept_targets` column (its length sizes the head).
    """

    def __init__(self, model, args, train_dataset):
        self.weight, self.temperature = args.concept_distillation_weight, args.concept_distillation_temperature
        self.kind = None if args.concept_distillation_loss == "auto" else args.concept_distillation_loss
        self.head = attach_head(model, image_embedding_dim(model), target_dim(train_dataset), args.seed)

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

    def scale(self, accelerator, local_sum: torch.Tensor, local_images: int) -> tuple[float, float]:
        """`(weight * W / global image count, global mean loss)`: one all-reduce of two numbers."""
        totals = torch.stack([local_sum.detach().float().reshape(()),
                              torch.tensor(float(local_images), device=local_sum.device)])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        total, images = totals.tolist()
        return self.weight * accelerator.num_processes / images, total / images

    def on_save(self, args, state, control, **kwargs):
        weights = {name: _full(value).detach().cpu() for name, value in self.head.state_dict().items()}
        save_beside_checkpoint(weights, args, state, WEIGHTS_NAME)

    def load(self, checkpoint_folder: str) -> None:
        """Take the head saved with a checkpoint (a checkpoint of a run without concept distillation has none)."""
        path = os.path.join(checkpoint_folder, WEIGHTS_NAME)
        if not os.path.exists(path):
            raise ValueError(f"resuming concept distillation needs {WEIGHTS_NAME} in {checkpoint_folder}")
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        with torch.no_grad():
            for name, value in self.head.state_dict().items():
                value.copy_(weights[name])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP2 shards (a collective: every process saves), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


__all__ = ["ConceptDistillation", "distillation_losses", "target_dim"]
