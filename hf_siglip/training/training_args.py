"""`SiglipTrainingArguments`: `transformers.TrainingArguments` plus the SigLIP papers' training options."""

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..dual_encoders import TOWERS
from ..loss_config import SiglipLossConfig
from .launching import start_cpu_process_group

logger = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "skip")


@dataclass
class SiglipTrainingArguments(TrainingArguments):
    r"""
    Arguments for [`SiglipTrainer`]. Every `transformers.TrainingArguments` field works as usual; the defaults
    that differ follow the SigLIP paper: `adam_beta2=0.95` (stabilises training with large batches) and
    `remove_unused_columns=False` (the collator needs the image and caption columns).
    """

    _argument_group_name = "SigLIP training (hf_siglip)"  # its --help group

    adam_beta2: float = field(
        default=0.95,
        metadata={"help": "Adam beta2. SigLIP (section 4.7) uses 0.95 instead of 0.999 to avoid loss spikes."},
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin DataLoader memory. Default: only where an accelerator (CUDA) is available; pinning "
                  "on CPU does nothing but warn."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP's find_unused_parameters. False: every trainable weight takes part in the loss (locked "
                  "towers are frozen, so DDP does not wait for them), and the extra graph walk is saved."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the SigLIP collator reads raw image/caption columns the model does not take."},
    )
    pretrained_towers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Towers holding pretrained weights ('text', 'vision'). Default: the model's own record "
            "(`model.pretrained_towers`: both for from_pretrained, the loaded ones for from_vision_text_pretrained, "
            "none for a fresh model). Pass [] to treat every weight as new."
        },
    )
    pretrained_learning_rate_multiplier: float = field(
        default=0.1,
        metadata={"help": "Learning-rate multiplier for pretrained towers (SigLIP section 4.5 uses 0.1)."},
    )
    pretrained_weight_decay: float = field(
        default=0.0,
        metadata={"help": "Weight decay on pretrained towers (SigLIP section 4.5: off, so they stay near their init)."},
    )
    layer_lr_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay in pretrained towers (BEiT, timm fine-tuning; e.g. 0.75): a "
                  "tower's block i of N trains at decay^(N - i) times its rate, its embeddings at decay^(N + 1), "
                  "what follows the blocks and the heads at the full rate; composed with "
                  "pretrained_learning_rate_multiplier (hf_siglip.training.optimizer_groups). None: off."},
    )
    lock_text_tower: bool = field(
        default=False, metadata={"help": "Freeze the text tower and keep it in eval mode (LiT-style locking)."}
    )
    lock_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "Freeze the vision tower and keep it in eval mode (SigLiT). With rows carrying precomputed "
            "`image_embeds` (see hf_siglip.data.add_image_embeddings) the tower is not run at all."
        },
    )
    patch_dropout: float = field(
        default=0.0,
        metadata={"help": "FLIP patch dropout: the fraction of each image's patch tokens dropped at random in training "
                  "(after the position embeddings; CLIP keeps its class token), as open_clip's PatchDropout; in "
                  "[0, 1). FLIP: 0.5 trains ~2x faster per image. Evaluation, inference and a locked vision tower "
                  "see every patch; the saved model is unchanged. Not for SigLIP 2 NaFlex. 0: off."},
    )
    stream_shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "Streams (e.g. tar shards): rows held in the shuffle buffer, after the shard order is "
                  "shuffled per epoch (rows hold encoded images, ~50 KB each). 0: read in order."},
    )
    logit_scale_max: float | None = field(
        default=None,
        metadata={
            "help": "Optional clamp on t = exp(logit_scale) after each step. Off by default: released SigLIP "
            "checkpoints have t ~ 112 and a silent clamp at 100 would change them."
        },
    )
    teacher_momentum: float | None = field(
        default=None,
        metadata={
            "help": "ALBEF momentum distillation: keep an EMA copy of the model (this momentum per optimizer step; "
            "ALBEF: 0.995) whose embeddings give soft targets, mixed with the ids' targets by "
            "loss_config.teacher_weight (hf_siglip.objectives.momentum_teacher). None: off."
        },
    )
    teacher_warmup_steps: int = field(
        default=0,
        metadata={"help": "Momentum distillation: the teacher's weight ramps linearly from 0 over these optimizer "
                  "steps (ALBEF: the first epoch)."},
    )
    concept_distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "DiHT concept distillation (section 3): weight of the loss of a linear head on the image "
            "embedding that learns a frozen teacher's outputs, stored per row by the concept_targets data step "
            "(hf_siglip.objectives.concept_distillation). 0: off."
        },
    )
    concept_distillation_loss: str = field(
        default="auto",
        metadata={"help": "Concept distillation loss: 'kl' (a classifier teacher's logits, softened by the "
                  "temperature), 'cosine' (a feature teacher's vectors), or 'auto' (what the concept_targets step "
                  "recorded: kl for logits, cosine for features)."},
    )
    concept_distillation_temperature: float = field(
        default=1.0,
        metadata={"help": "Concept distillation, kl loss: softmax temperature T for teacher and head (the loss is "
                  "scaled by T^2 so its gradients keep their size)."},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "What an optimizer step does when its loss, gradient norm, t = exp(logit_scale) or b is NaN or "
            "infinite (checked after backward, before the update; on several processes they decide together). "
            "'stop': end the run with an error naming the step and the value (the weights stay as they were "
            "before it). 'skip': leave every weight as it is for that step (no optimizer update; the learning-rate "
            "schedule moves on), count it (`nonfinite_steps_skipped` in the logs, `train/nonfinite_steps_skipped` "
            "in the data report of the model card and eval_results.json) and go on; the logged loss is the mean over "
            "the applied steps of its window (nan when none was). A non-finite t or b stops the "
            "run either way: they are weights, and skipping steps cannot repair them. With fp16 loss scaling the "
            "gradient norm is left to the scaler, which skips overflowing steps by design. Under DeepSpeed the engine "
            "updates inside backward, before this check: 'stop' stops after that update and 'skip' cannot undo it."
        },
    )
    objectives: dict | str | None = field(
        default=None,
        metadata={
            "help": "Training objectives beside the pair loss (hf_siglip.objectives), name -> settings: a mapping in a "
            "recipe, JSON on the command line, e.g. '{\"captioning\": {\"weight\": 2.0}}'. A name is a built-in "
            "objective or 'package.module:Class'. Checked when the arguments are built."
        },
    )
    loss_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Loss settings (hf_siglip.SiglipLossConfig: loss_type, normalize, negative masking, positive "
            "mining, HN-NCE, ...): a mapping in a recipe, JSON on the command line, e.g. "
            "'{\"normalize\": \"row\", \"mine_image_text\": 0.9}'. Checked when the arguments are built."
        },
    )

    @functools.cached_property
    def _setup_devices(self):
        # on CPU, accelerate would start the gloo group without --ddp_timeout (hf_siglip.training.launching)
        if self.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
            start_cpu_process_group(self.ddp_timeout, self.ddp_backend)
        return TrainingArguments._setup_devices.func(self)

    def __post_init__(self):
        if self.dataloader_pin_memory is None:
            import torch

            self.dataloader_pin_memory = torch.cuda.is_available() and not self.use_cpu
        super().__post_init__()
        if self.pretrained_towers is not None:
            unknown = set(self.pretrained_towers) - set(TOWERS)
            if unknown:
                raise ValueError(f"pretrained_towers: unknown tower(s) {sorted(unknown)}; choose from {TOWERS}.")
        if self.pretrained_learning_rate_multiplier < 0:
            raise ValueError("pretrained_learning_rate_multiplier must be >= 0.")
        if not 0.0 <= self.patch_dropout < 1.0:  # also refuses nan
            raise ValueError(f"patch_dropout must be in [0, 1) (the fraction of patch tokens dropped), got "
                             f"{self.patch_dropout!r}")
        if self.layer_lr_decay is not None and not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"layer_lr_decay must be in (0, 1] (None: off), got {self.layer_lr_decay!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
        if self.lock_text_tower and self.lock_vision_tower:
            raise ValueError("lock_text_tower and lock_vision_tower are both set: nothing would be trained.")
        # a SiglipLossConfig from a mapping (recipe), JSON (flag) or itself; a bad setting fails here, not at step 1
        self.loss_config = SiglipLossConfig.from_value(self.loss_config, "loss_config")
        self._match_pairs_seen()
        if self.loss_config.mine_with == "teacher" and self.teacher_momentum is None:
            raise ValueError("loss_config.mine_with='teacher' mines with the momentum teacher: set teacher_momentum "
                             "(e.g. 0.995; loss_config.teacher_weight: 0 for mining without its soft targets)")
        self._parse_objectives()

    def _parse_objectives(self):
        """`objectives` as `{name: validated settings dataclass}`, with those the flat flags turn on."""
        from ..objectives import flag_objectives, parse_objectives

        objectives = parse_objectives(self.objectives)
        for name, config in flag_objectives(self).items():
            if name in objectives:
                raise ValueError(f"objectives.{name} is also set by its flags ({name} settings): use one of the two")
            objectives[name] = config
        self.objectives = objectives

    def _match_pairs_seen(self):
        """SigLIP 4.8's 'matching total pairs seen': a masked run trains longer by the factor of pairs it drops."""
        images_per_step = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
        factor = self.loss_config.pairs_seen_factor(images_per_step)
        if factor == 1.0:
            return
        if self.max_steps > 0:
            self.max_steps = math.ceil(self.max_steps * factor)
        else:
            self.num_train_epochs *= factor
        logger.info("loss_config.match_pairs_seen: training %.4gx longer (max_steps %d, num_train_epochs %.4g)",
                    factor, self.max_steps, self.num_train_epochs)

    def to_dict(self):
        values = super().to_dict()
        values["loss_config"] = dataclasses.asdict(self.loss_config)  # JSON-ready, and accepted back as a mapping
        values["objectives"] = {name: dataclasses.asdict(config) for name, config in (self.objectives or {}).items()}
        return values
