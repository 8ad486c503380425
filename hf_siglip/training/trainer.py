"""`SiglipTrainer`: `transformers.Trainer` with the distributed sigmoid loss and the SigLIP papers' recipes.

Flow per step: collator batch (`pixel_values` or cached `image_embeds`, `input_ids`, `image_ids`,
`text_ids`) -> model forward (normalised embeddings, t, b) -> `sigmoid_loss` over the whole global batch
(a ring across processes) -> backward. Each process's loss is its share such that DDP's gradient average
is exactly the gradient of the global loss (see `hf_siglip.loss`); the logged loss is the global loss.

Gradient accumulation. A contrastive loss over a batch of B*G pairs is not the sum of G losses over B pairs
(the cross pairs are missing), so plain accumulation would train on a smaller batch. With
`gradient_accumulation_steps = G > 1` this trainer instead caches embeddings (GradCache): it embeds the
G micro-batches without autograd, computes the loss of the whole B*G batch and its gradients w.r.t. the
embeddings, t and b, then re-runs each micro-batch's forward with autograd and back-propagates those
embedding gradients. The update equals that of one B*G batch (exactly, given deterministic towers; RNG
state is replayed so dropout masks match), at the activation memory of one micro-batch and the cost of
one extra forward pass. The loss is not divided by G: it is already the loss of the large batch.
"""

import contextlib
import json
import logging
import math
import os
from collections import Counter, defaultdict

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from ..data.collator import SiglipDataCollator, collator_epoch_callback, normalize_pixel_values
from ..data.embedding import text_uses_attention_mask
from ..dual_encoders import as_dual_encoder, restore_config_parameters, set_patch_dropout, tower_modules
from ..evaluation import retrieval_metrics
from ..hub import build_model_card, check_hub_access
from ..loss import dense_sigmoid_loss, sigmoid_loss
from ..objectives import build_objectives
from ..objectives.base import Objective
from .checkpoint_files import CheckpointManifest, match_umask, resolve_checkpoint, save_beside_checkpoint
from .finite import NonFiniteError, check_finite_weights, describe_nonfinite_weights, nonfinite_parameters
from .launching import check_process_world, fsdp_request_ignored
from .optimizer_groups import siglip_parameter_groups  # noqa: F401 (re-exported)
from .stream_training import StreamEpochs, StreamPosition, fetch_agreed_batches
from .training_args import SiglipTrainingArguments

logger = logging.getLogger(__name__)

# what the collator emits that the model takes (NaFlex images come with their patch mask and grid shapes)
MODEL_INPUTS = ("input_ids", "pixel_values", "image_embeds", "attention_mask", "position_ids", "pixel_attention_mask",
                "spatial_shapes")
# the column evaluation rows carry: their position in the evaluation set (SiglipTrainer.evaluate)
EVALUATION_ROW = "_evaluation_row"


class _ClampLogitScale(TrainerCallback):
    """Clamp t = exp(logit_scale) to `logit_scale_max` after each optimizer step (opt-in)."""

    def __init__(self, logit_scale_max: float):
        self.max_log = torch.tensor(logit_scale_max).log().item()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            with torch.no_grad():
                model.logit_scale.clamp_(max=self.max_log)


class _ObjectiveEvents(TrainerCallback):
    """The objectives' part of the Trainer's events: their side files in each checkpoint, their per-step updates."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        for objective in self.trainer.objectives:
            objective.on_optimizer_step(model)

    def on_save(self, args, state, control, **kwargs):
        for objective in self.trainer.objectives:
            if objective.side_file is not None:  # state_dict() is a collective under FSDP: every process
                save_beside_checkpoint(objective.state_dict(), args, state, objective.side_file)


class SiglipTrainer(Trainer):
    r"""`transformers.Trainer` for SigLIP dual encoders ([`SiglipBottleneckModel`] or any model with the same
    forward outputs: normalised `image_embeds` / `text_embeds`, `logit_scale` (t) and `logit_bias`).

    Args:
        model: the dual encoder.
        args ([`SiglipTrainingArguments`]): training arguments (a `TrainingArguments` works too; the
            SigLIP-specific fields then take their defaults).
        data_collator: defaults to [`hf_siglip.data.SiglipDataCollator`] built from `processing_class`.
        processing_class: a processor with `.tokenizer` and `.image_processor` (saved with checkpoints).
        Other arguments are those of `transformers.Trainer`.

    Logged each `logging_steps`: the global loss, `t`, `b` and what the loss saw in the global batch:
    `positives_per_image` (mined pairs included), `logit_positive_mean` / `logit_negative_mean`, `pairs_per_image`;
    and `<objective>_loss` for each training objective with a loss term (hf_siglip.objectives).
    `evaluate()` reports the loss and retrieval recall@1/5/10 both ways on the evaluation set.

    Bad rows: the collator's per-batch drop counts (`dropped_rows`) are summed in `data_counts`. A step in
    which some process's batch has no row left (every image broken, say) is skipped on every process
    together: no forward, no backward, so the optimizer leaves every weight as it is (parameters without a
    gradient are not updated) while the step counter and learning-rate schedule move on. Skipped batches and
    the rows skipped with them are counted; `data_report()` sums the counts over processes.

    Non-finite values (hf_siglip.training.finite): a step whose loss, gradient norm, t or b is NaN or infinite stops the
    run with a `NonFiniteError` naming the step, or with `args.on_nonfinite="skip"` leaves the weights as they are
    and is counted (`nonfinite_steps_skipped`); every process takes the same decision. The weights are checked
    finite before and after training, after loading a checkpoint, and before a model card or a push.
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = _as_siglip_arguments(args)
        check_process_world(args.world_size)  # the ring loss must span exactly the trainer's processes
        if data_collator is None and processing_class is not None:
            data_collator = SiglipDataCollator(processor=processing_class,  # BERT-like text towers take the mask
                                               return_attention_mask=text_uses_attention_mask(model))
        if hasattr(data_collator, "return_drop_counts"):
            data_collator.return_drop_counts = True  # counts from DataLoader workers reach `data_counts`
        if getattr(data_collator, "normalize_on_device", False) is None:
            data_collator.normalize_on_device = True  # uint8 batches from the workers: `_prepare_inputs` normalises
        # a native SiglipModel / Siglip2Model / CLIPModel gets the forward this trainer needs (hf_siglip.dual_encoders)
        model = set_patch_dropout(as_dual_encoder(model), args.patch_dropout)  # FLIP, a training-time hook
        for tower in _locked_towers(args):
            for module in tower_modules(model, tower):
                module.requires_grad_(False)
        if _is_stream(train_dataset):
            train_dataset = _prepare_stream(train_dataset, args)
        # training objectives (hf_siglip.objectives): their heads join the model before Trainer wraps it
        self.objectives = build_objectives(model, args, processing_class, train_dataset)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        fsdp_ignored = fsdp_request_ignored(self.accelerator.distributed_type)
        if fsdp_ignored and self.is_world_process_zero():
            logger.warning(fsdp_ignored)
        # We compute and scale the loss ourselves (see the module docstring on accumulation).
        self.model_accepts_loss_kwargs = False
        self._metrics = defaultdict(list)
        self._accumulation_window = []
        self.data_counts = Counter()  # "train/<reason>", "evaluation/<reason>": rows dropped or skipped
        self.data_steps_report = {}  # data step -> counts (hf_siglip.data.steps), logged with the first log
        self._data_steps_logged = False
        if args.logit_scale_max is not None:
            self.add_callback(_ClampLogitScale(args.logit_scale_max))
        if hasattr(self.data_collator, "set_epoch"):  # fresh per-epoch caption sampling (FFF)
            self.add_callback(collator_epoch_callback(self.data_collator))
        if _is_stream(self.train_dataset):
            self.add_callback(StreamPosition())  # saved in checkpoints: where a resumed stream picks up
        for objective in self.objectives:
            objective.setup(self)
        if self.objectives:
            self.add_callback(_ObjectiveEvents(self))  # side files in each checkpoint, updates after each step
        self.add_callback(CheckpointManifest(self.accelerator))  # kept last by add_callback: marks checkpoints complete
        self.resumed_from = None  # the checkpoint folder this run resumed from (side files are read from it)
        self.card_info = {}  # extra model card fields (datasets, recipe, training_curve, ...) for create_model_card
        self._step_losses, self._step_t_b = [], None  # this optimizer step's, for `_check_finite_step`
        self._loss_before_step = None  # the Trainer's running loss sum before this step (a skipped step adds nothing)
        self._window = Counter()  # optimizer steps and skipped steps since the last logged loss
        self.nonfinite_steps_skipped = 0  # on_nonfinite="skip": steps left without an update (equal on every process)

    def objective(self, name: str) -> Objective:
        """The running objective called `name` (hf_siglip.objectives)."""
        for objective in self.objectives:
            if objective.name == name:
                return objective
        raise KeyError(f"no objective {name!r} in this run; it has {[o.name for o in self.objectives]}")

    def pretrained_towers(self) -> set[str]:
        """Towers treated as pretrained by the optimizer groups (locked towers are not trained at all)."""
        explicit = self.args.pretrained_towers
        towers = set(explicit) if explicit is not None else set(getattr(self.model, "pretrained_towers", ()))
        return towers - set(_locked_towers(self.args))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = siglip_parameter_groups(opt_model, self.args, self.pretrained_towers())
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- loss ----------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs):
        # uint8 pixels (the collator's normalize_on_device) become the model's pixel values on the device
        return normalize_pixel_values(super()._prepare_inputs(inputs), getattr(self.model, "dtype", None))

    def _embed(self, model, inputs):
        unwrapped = self.accelerator.unwrap_model(model)
        for tower in _locked_towers(self.args):  # Trainer calls model.train() each step; locked towers stay in eval
            for module in tower_modules(unwrapped, tower):
                module.eval()
        return model(**{key: inputs[key] for key in MODEL_INPUTS if key in inputs})

    _loss_statistics = None  # what the last loss call saw in the global batch (hf_siglip.loss.LossStatistics)

    def _loss(self, image_embeds, text_embeds, logit_scale, logit_bias, inputs, micro_batches=None):
        """The loss of a batch: `inputs` holds its ids; `micro_batches` the model inputs when the embeddings were
        made in parts (gradient accumulation), for a teacher to embed the same rows."""
        config, teacher = self.args.loss_config.at_step(self.state.global_step), None
        for objective in self.objectives:  # e.g. the momentum teacher's soft targets
            config, given = objective.pair_loss(self, config, micro_batches or [inputs])
            teacher = given if given is not None else teacher
        loss, self._loss_statistics = sigmoid_loss(
            image_embeds, text_embeds, logit_scale, logit_bias, inputs.get("image_ids"), inputs.get("text_ids"),
            config=config, teacher=teacher, return_statistics=True)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = self._embed(model, inputs)
        loss = self._loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias, inputs)
        if model.training:
            self._record_metrics(outputs.logit_scale, outputs.logit_bias)
            self._prepare_objectives(outputs.image_embeds.detach(), outputs.text_embeds.detach(), [inputs])
        if model.training and self._loss_terms():
            sums = [objective.loss_sum(outputs, inputs) for objective in self._loss_terms()]
            counts = [objective.count(inputs) for objective in self._loss_terms()]
            factors = self._objective_factors(counts, [value.detach() for value in sums])
            loss = loss + sum(factor * value for factor, value in zip(factors, sums))
        return (loss, outputs) if return_outputs else loss

    # --- training objectives (hf_siglip.objectives) ----------------------------------------------------------

    def _loss_terms(self) -> list[Objective]:
        """The objectives that add a loss term (those that only change the pair loss, as a teacher, add none)."""
        return [objective for objective in self.objectives if type(objective).loss_sum is not Objective.loss_sum]

    def _prepare_objectives(self, image_embeds, text_embeds, batches) -> None:
        for objective in self.objectives:  # the whole step's embeddings, before any loss_sum (Objective.prepare_step)
            for name, value in (objective.prepare_step(self, image_embeds, text_embeds, batches) or {}).items():
                self._metrics[name].append(value)

    def _global_sums(self, values: list) -> list[float]:
        """Each value summed over the processes (one all-reduce for the list)."""
        totals = torch.tensor([float(value) for value in values], device=self.args.device, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return totals.tolist()

    def _objective_factors(self, counts: list, sums: list | None = None) -> list[float]:
        """Each loss term's factor on this process's loss sum: weight * processes / global unit count, so DDP's
        gradient average is the gradient of the global mean (hf_siglip.objectives.base). With `sums`, the global
        mean of each term goes to the logs (the same all-reduce)."""
        totals = self._global_sums(list(counts) + list(sums or []))
        global_counts, global_sums = totals[:len(counts)], totals[len(counts):]
        factors = [objective.weight * self.accelerator.num_processes / count if count > 0 else 0.0
                   for objective, count in zip(self._loss_terms(), global_counts)]
        if sums is not None:
            self._log_objective_means(global_sums, global_counts)
        return factors

    def _log_objective_means(self, global_sums: list[float], global_counts: list[float]) -> None:
        for objective, total, count in zip(self._loss_terms(), global_sums, global_counts):
            if count > 0:
                self._metrics[f"{objective.name}_loss"].append(total / count)

    @torch.no_grad()
    def _record_metrics(self, logit_scale, logit_bias) -> None:
        self._step_t_b = (logit_scale.float().mean().item(), logit_bias.float().mean().item())
        self._metrics["t"].append(self._step_t_b[0])
        self._metrics["b"].append(self._step_t_b[1])
        statistics = self._loss_statistics  # global batch; positives by the loss's own rule (ids and mined pairs)
        names = ["positives_per_image", "logit_positive_mean", "logit_negative_mean", "pairs_per_image"]
        if self.args.loss_config.mining:
            names.append("mined_positives_per_image")
        for name in names:
            value = getattr(statistics, name)
            if not math.isnan(value):
                self._metrics[name].append(value)

    def _gather_ragged(self, tensor: torch.Tensor) -> torch.Tensor:
        """All processes' 1-d tensors concatenated (they may differ in length)."""
        if self.accelerator.num_processes == 1:
            return tensor
        lengths = self.accelerator.gather(torch.tensor([len(tensor)], device=tensor.device))
        padded = self.accelerator.pad_across_processes(tensor, dim=0)
        gathered = self.accelerator.gather(padded).view(self.accelerator.num_processes, -1)
        return torch.cat([row[:length] for row, length in zip(gathered, lengths.tolist())])

    def _mean_across_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value.detach().reshape(1), reduction="mean").item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the mean over the steps applied since the last log (nan when every one was skipped)
            steps, skipped = self._window["steps"], self._window["skipped"]
            if skipped:
                logs["loss"] = logs["loss"] * steps / (steps - skipped) if steps > skipped else math.nan
            self._window.clear()
        if "train_loss" in logs and self.nonfinite_steps_skipped:  # the Trainer divides by every step
            applied = self.state.global_step - self.nonfinite_steps_skipped
            logs["train_loss"] = logs["train_loss"] * self.state.global_step / applied if applied > 0 else math.nan
        if ("loss" in logs or "train_loss" in logs) and self.nonfinite_steps_skipped:
            logs["nonfinite_steps_skipped"] = self.nonfinite_steps_skipped
        if "loss" in logs and self._metrics:
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items() if values})
            self._metrics.clear()
        if "loss" in logs and not self._data_steps_logged:
            # the data steps' counts, once, beside the first training loss (they are fixed before training starts)
            logs.update({f"data/{step}/{reason}": value for step, counts in self.data_steps_report.items()
                         for reason, value in counts.items() if isinstance(value, (int, float))})
            self._data_steps_logged = True
        super().log(logs, start_time)

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches hold every caption of a row and unaugmented images, whatever the training collator
        samples or augments (also for evaluations during training)."""
        training_collator = self.data_collator
        if hasattr(training_collator, "for_evaluation"):
            self.data_collator = training_collator.for_evaluation()
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
            if hasattr(self.data_collator, "row_index_column") and _is_map_style(dataset):
                # each row carries its position: evaluate() counts the sampler's repeats once
                self.data_collator.row_index_column = EVALUATION_ROW
                eval_dataset = _NumberedRows(dataset)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    # --- gradient accumulation by embedding cache ------------------------------------------------------

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        if _is_stream(self.train_dataset):
            return StreamEpochs(dataloader, self._stream_position, self.data_collator)
        return dataloader

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        for objective in self.objectives:  # before any batch (concept distillation's 'auto' reads the data report)
            objective.before_training(self)
        if resume_from_checkpoint is True:  # the newest complete checkpoint (hf_siglip.training.checkpoint_files)
            resume_from_checkpoint = resolve_checkpoint(self.args.output_dir, True)
        if resume_from_checkpoint and _is_stream(self.train_dataset):
            self._stream_position().restore(resume_from_checkpoint)
        self._check_finite_weights(consequence="not trained")  # e.g. a corrupt tower from from_vision_text_pretrained
        result = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        # a last update can overflow with finite gradients: such a model is not evaluated, saved with a card or pushed
        self._check_finite_weights(consequence="not evaluated, saved or pushed")
        return result

    def _stream_position(self) -> StreamPosition:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, StreamPosition))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if _is_stream(self.train_dataset):  # an epoch ends on every process together (training.stream_training)
            batch_samples, left = fetch_agreed_batches(epoch_iterator, num_batches, self.accelerator,
                                                       self._stream_position())
            for batch in left:
                self._count_dropped_rows(batch, "train")
                self.data_counts["train/batches_dropped_at_uneven_epoch_end"] += 1
            if not batch_samples:
                self.control.should_epoch_stop = True
            num_items_in_batch = None
        else:
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._accumulation_window = batch_samples
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._step_losses and isinstance(getattr(self, "_tr_loss", None), torch.Tensor):
            self._loss_before_step = self._tr_loss.detach().clone()  # first micro-batch of an optimizer step
        loss = self._training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach())  # judged with the gradient norm before the update (_get_grad_norm)
        return loss

    def _training_step(self, model, inputs, num_items_in_batch=None):
        self._count_dropped_rows(inputs, "train")
        window = self._accumulation_window
        if len(window) <= 1 or not any(inputs is batch for batch in window):
            if self._skip_if_any_process_empty([inputs], "train"):
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)
        if inputs is not window[-1]:
            # Earlier micro-batches are processed together with the last one (which runs with gradient sync).
            return torch.zeros((), device=self.args.device)
        if self._skip_if_any_process_empty(window, "train"):
            return torch.zeros((), device=self.args.device)
        micro_batches = [self._prepare_inputs(batch) for batch in window if _batch_rows(batch) > 0]
        return self._embedding_cache_step(model, micro_batches)

    # --- bad rows --------------------------------------------------------------------------------------

    def _count_dropped_rows(self, inputs, stage: str) -> None:
        for reason, count in (inputs.pop("dropped_rows", None) or {}).items():
            self.data_counts[f"{stage}/{reason}"] += int(count)

    def _skip_if_any_process_empty(self, batches, stage: str) -> bool:
        """True (and counted) when this step's batch has no row on some process: every process then skips
        it together, since the loss needs rows everywhere and a lone skip would leave the others waiting."""
        rows = sum(_batch_rows(batch) for batch in batches)
        fewest = rows
        if self.accelerator.num_processes > 1:
            fewest = int(self.accelerator.gather(torch.tensor([rows], device=self.args.device)).min())
        if fewest > 0:
            return False
        if rows == 0:
            self.data_counts[f"{stage}/empty_batches_skipped"] += 1
        else:
            self.data_counts[f"{stage}/rows_skipped_with_another_process_empty_batch"] += rows
        logger.warning("skipping a %s batch: %s", stage, "every row of this process's batch was dropped" if rows == 0
                       else "another process's batch has no row left")
        return True

    def data_report(self) -> dict[str, int]:
        """`data_counts` summed over all processes (a collective: call it on every process)."""
        from accelerate.utils import gather_object

        total = Counter()
        parts = gather_object([dict(self.data_counts)]) if self.accelerator.num_processes > 1 else [self.data_counts]
        for part in parts:
            total.update(part)
        return dict(sorted(total.items()))

    def _embedding_cache_step(self, model, micro_batches) -> torch.Tensor:
        model.train()
        rng_states, image_parts, text_parts = [], [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for batch in micro_batches:
                rng_states.append(_rng_state())
                outputs = self._embed(model, batch)
                image_parts.append(outputs.image_embeds)
                text_parts.append(outputs.text_embeds)
        image_embeds = torch.cat(image_parts).detach().requires_grad_(True)
        text_embeds = torch.cat(text_parts).detach().requires_grad_(True)
        self._prepare_objectives(image_embeds.detach(), text_embeds.detach(), micro_batches)
        columns = ("image_ids", "text_ids", *(column for objective in self.objectives
                                              for column in objective.batch_columns))
        merged = {key: torch.cat([batch[key] for batch in micro_batches]) for key in columns if key in micro_batches[0]}

        unwrapped = self.accelerator.unwrap_model(model)
        logit_scale, logit_bias = unwrapped.logit_scale.detach().exp().requires_grad_(True), \
            unwrapped.logit_bias.detach().clone().requires_grad_(True)
        with self.compute_loss_context_manager():
            loss = self._loss(image_embeds, text_embeds, logit_scale, logit_bias, merged, micro_batches)
        loss.backward()
        self._record_metrics(logit_scale, logit_bias)
        terms = self._loss_terms()  # each objective's term, per unit: every micro-batch adds its own units' losses
        factors = self._objective_factors([sum(o.count(batch) for batch in micro_batches) for o in terms])
        term_sums = [0.0] * len(terms)

        image_grads = image_embeds.grad.split([len(part) for part in image_parts])
        text_grads = text_embeds.grad.split([len(part) for part in text_parts])
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if index == last else self.accelerator.no_sync(model)
            with sync, _replay_rng(rng_states[index]), self.compute_loss_context_manager():
                outputs = self._embed(model, batch)
                surrogate = (outputs.image_embeds * image_grads[index]).sum() + \
                    (outputs.text_embeds * text_grads[index]).sum()
                if index == last:  # t and b enter the graph once, with their whole-batch gradients
                    surrogate = surrogate + (outputs.logit_scale * logit_scale.grad).sum() + \
                        (outputs.logit_bias * logit_bias.grad).sum()
                for position, (objective, factor) in enumerate(zip(terms, factors)):
                    value = objective.loss_sum(outputs, batch)
                    surrogate = surrogate + factor * value
                    term_sums[position] += value.detach().item()
                self.accelerator.backward(surrogate)
        if terms:
            global_sums = self._global_sums(term_sums)
            counts = self._global_sums([sum(o.count(batch) for batch in micro_batches) for o in terms])
            self._log_objective_means(global_sums, counts)
        return loss.detach() + sum(factor * value for factor, value in zip(factors, term_sums))

    # --- non-finite values (hf_siglip.training.finite) ----------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm. Every optimizer step passes here once, after backward (plain and GradCache
        paths alike) and before `on_pre_optimizer_step` and `optimizer.step()`: non-finite steps stop or skip here."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_finite_step(grad_norm)
        return grad_norm

    def _check_finite_step(self, grad_norm) -> None:
        """Stop (`NonFiniteError`) or skip this optimizer step when its loss, gradient norm, t or b is not finite on
        any process. The values are gathered, so every process takes the same decision and none waits for another."""
        losses, self._step_losses = self._step_losses, []
        self._window["steps"] += 1
        t, b = self._step_t_b if self._step_t_b is not None else (1.0, 0.0)  # no forward this step: nothing to judge
        self._step_t_b = None
        loss = torch.stack(losses).float().sum().item() if losses else 0.0
        # with fp16 loss scaling an overflowing gradient is expected: the scaler skips that step itself
        norm = 0.0 if grad_norm is None or self.accelerator.scaler is not None else float(grad_norm)
        values = torch.tensor([[loss, norm, t, b]], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values)  # (processes, 4)
        bad = ~torch.isfinite(values)
        if not bad.any():
            return
        step, processes = self.state.global_step + 1, len(values)
        problems = []
        for column, name in enumerate(("loss", "gradient norm", "t", "b")):
            rows = bad[:, column].nonzero().flatten().tolist()
            if rows:
                where = f" on process {rows[0]} of {processes}" if len(rows) < processes else ""
                problems.append(f"{name} is {values[rows[0], column].item():g}{where}")
        state = f"{', '.join(problems)} (t={values[0, 2].item():.4g}, b={values[0, 3].item():.4g})"
        hint = (f"lower --learning_rate (now {self.args.learning_rate:g}), clip gradients (--max_grad_norm, now "
                f"{self.args.max_grad_norm:g}) or warm up (--warmup_steps)")
        if bad[:, 2:].any():  # t and b are weights: a skipped step leaves them as they are
            raise NonFiniteError(f"training diverged at step {step}: {state}; t and b are weights, so skipping steps "
                                 f"cannot repair them; {hint}")
        if self.args.on_nonfinite == "stop":
            raise NonFiniteError(f"training diverged at step {step}: {state}; the step was not applied: {hint}, or "
                                 "pass --on_nonfinite skip to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
        if self._loss_before_step is not None:  # the logged loss is that of the applied steps (a nan would stay in the
            self._tr_loss.copy_(self._loss_before_step)  # Trainer's running sum for good: it resets it by subtraction)
        self._window["skipped"] += 1
        self.nonfinite_steps_skipped += 1
        if self.is_world_process_zero():  # once: data_report() sums the counts over processes
            self.data_counts["train/nonfinite_steps_skipped"] += 1
            logger.warning("step %d: %s; skipped, no weight update (on_nonfinite=skip; %d skipped so far)", step,
                           state, self.nonfinite_steps_skipped)

    def _check_finite_weights(self, source: str | None = None, consequence: str = "not loaded", model=None) -> None:
        """`NonFiniteError` on every process when any process's parameters hold NaN or infinity (sharded weights
        differ between processes), naming the safetensors file and tensor of `source` when it holds them."""
        model = self.model if model is None else model
        bad = nonfinite_parameters(model)
        found = len(bad)
        if self.accelerator.num_processes > 1:
            found = int(self.accelerator.gather(torch.tensor([found], device=self.args.device)).sum())
        if found:
            raise NonFiniteError(describe_nonfinite_weights(bad, source, consequence))

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        match_umask(output_dir or self.args.output_dir, "*.safetensors")

    def add_callback(self, callback):
        """`Trainer.add_callback`, keeping the checkpoint manifest last: it must see every file other callbacks
        write on save (callbacks added later, by a user, too)."""
        super().add_callback(callback)
        manifests = [cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointManifest)]
        for manifest in manifests:
            self.callback_handler.callbacks.remove(manifest)
            self.callback_handler.callbacks.append(manifest)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.resumed_from = resume_from_checkpoint
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_config_parameters(model or self.model, resume_from_checkpoint)  # CLIP's b is in config.json
        self._check_finite_weights(resume_from_checkpoint, "not resumed", model=model)
        for objective in self.objectives:  # heads and teachers are saved beside the weights, not in them
            objective.load_from(resume_from_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():  # the finished model: what objectives add to it
            for objective in self.objectives:
                objective.save_pretrained(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                                          self.processing_class)

    def _load_best_model(self):
        super()._load_best_model()
        restore_config_parameters(self.model, self.state.best_model_checkpoint)

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`, after a one-line check that the Hub can be reached with a token (`HubAccessError`
        instead of a long connection traceback)."""
        check_hub_access(self.args.hub_token)
        check_finite_weights(self.accelerator.unwrap_model(self.model), consequence="not pushed")
        return super().push_to_hub(*args, **kwargs)

    # --- model card ----------------------------------------------------------------------------------

    def create_model_card(self, license: str | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, dataset: str | list[str] | None = None, **kwargs) -> None:
        """Write README.md in `output_dir` from the package's model card template (used by `push_to_hub`).

        Metrics are the last `evaluate()` results; more fields (e.g. `recipe`, `training_data`,
        `training_curve`) can be set in `trainer.card_info`.
        """
        if not self.is_world_process_zero():
            return
        check_finite_weights(self.accelerator.unwrap_model(self.model), consequence="no model card is written for it")
        metrics = {}  # every evaluation logged so far; later values replace earlier ones
        for entry in self.state.log_history:
            metrics.update({key[len("eval_"):]: value for key, value in entry.items()
                            if key.startswith("eval_") and isinstance(value, float) and "runtime" not in key
                            and "per_second" not in key})
        info = {"metrics": metrics or None, "hyperparameters": self._card_hyperparameters(),
                "hardware": self._card_hardware(),
                **{key: value for key, value in self.card_info.items() if key != "extra_hyperparameters"}}
        if finetuned_from is not None:
            info["base_model"] = finetuned_from
        if dataset is not None:
            info["datasets"] = dataset
        if license is not None:
            info["license"] = license
        # the snippet loads the Hub repository once one is known (push_to_hub creates it first), else a placeholder
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        title = model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        build_model_card(self.accelerator.unwrap_model(self.model), repo_id, model_name=title, **info).save(
            os.path.join(self.args.output_dir, "README.md"))

    def _card_hyperparameters(self) -> dict:
        args = self.args
        global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        return {"optimizer steps": self.state.global_step, "epochs": round(self.state.epoch or 0, 3),
                "batch per process": args.per_device_train_batch_size, "processes": args.world_size,
                "gradient accumulation": args.gradient_accumulation_steps, "global batch": global_batch,
                "learning rate": args.learning_rate,
                "schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, "
                            f"warm-up {args.warmup_steps}",
                "weight decay": args.weight_decay, "Adam betas": f"({args.adam_beta1}, {args.adam_beta2})",
                "precision": precision, "seed": args.seed,
                "loss options": json.dumps(_loss_options(args)) if _loss_options(args) else "defaults",
                **({"objectives": json.dumps({o.name: o.card() for o in self.objectives})} if self.objectives else {}),
                **self.card_info.get("extra_hyperparameters", {})}

    def _card_hardware(self) -> str:
        if torch.cuda.is_available() and not self.args.use_cpu:
            return f"{self.args.world_size} process(es) on {torch.cuda.get_device_name()}"
        return f"{self.args.world_size} CPU process(es), {os.cpu_count()} cores"

    # --- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Retrieval recall@k (both ways, every caption of a row) and the loss over the whole evaluation set.

        The same on any number of processes as on one: rows that the distributed sampler repeats to even out the
        last batch are counted once (by their position in the set), and the loss is that of the whole set taken as
        one batch (every image against every caption, with the training loss's form on the true pairs: no mining,
        negative masking or teacher), so it depends neither on the batch size nor on the number of processes.
        """
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:  # retrieval ranks every held-out image against every caption: never drop a partial batch
            dataloader = self.get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        model.eval()
        parts, outputs = defaultdict(list), None
        with torch.no_grad():
            for inputs in dataloader:
                self._count_dropped_rows(inputs, "evaluation")
                if self._skip_if_any_process_empty([inputs], "evaluation"):
                    continue
                inputs = self._prepare_inputs(inputs)
                with self.compute_loss_context_manager():
                    outputs = self._embed(model, inputs)
                parts["image_embeds"].append(outputs.image_embeds.float())
                parts["text_embeds"].append(outputs.text_embeds.float())
                for name in ("image_ids", "text_ids", "row_index", "text_row_index"):
                    if name in inputs:
                        parts[name].append(inputs[name])
        if outputs is None:
            raise ValueError("The evaluation set is empty: nothing to evaluate.")
        gathered = _count_rows_once({name: self._gather_rows(torch.cat(values)) for name, values in parts.items()})
        metrics = retrieval_metrics(gathered["image_embeds"], gathered["text_embeds"], gathered["image_ids"],
                                    gathered["text_ids"])
        metrics["loss"] = self._evaluation_loss(gathered, outputs.logit_scale, outputs.logit_bias)
        metrics["images"], metrics["texts"] = len(gathered["image_ids"]), len(gathered["text_ids"])
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluation_loss(self, gathered: dict, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> float:
        """The loss of the whole (gathered) evaluation set as one batch: each process takes a slice of the images
        and of the texts round the ring (one process: all of it, tile by tile), or, when there are fewer rows than
        processes, every process computes all of it densely."""
        config = self.args.loss_config.for_evaluation()
        images, texts = gathered["image_embeds"], gathered["text_embeds"]
        image_ids, text_ids = gathered["image_ids"], gathered["text_ids"]
        t, b = logit_scale.float().reshape(1), logit_bias.float().reshape(1)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1 and min(len(images), len(texts)) < world:
            return dense_sigmoid_loss(images, texts, t, b, image_ids, text_ids, config=config).item()
        image_slice = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
        text_slice = slice(rank * len(texts) // world, (rank + 1) * len(texts) // world)
        share = sigmoid_loss(images[image_slice], texts[text_slice], t, b, image_ids[image_slice],
                             text_ids[text_slice], config=config)
        return self._mean_across_processes(share)  # the mean of the processes' values is the global loss

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        flat = self._gather_ragged(tensor.reshape(len(tensor), -1).flatten())
        return flat.view(-1, *tensor.shape[1:])


class _NumberedRows(torch.utils.data.Dataset):
    """A map-style dataset whose rows also carry their position (`EVALUATION_ROW`), so that evaluation can tell a
    row from the copies a distributed sampler adds to even out the last batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], EVALUATION_ROW: int(index)}

    def __getitems__(self, indices):
        rows = (self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__")
                else [self.dataset[index] for index in indices])
        return [{**row, EVALUATION_ROW: int(index)} for row, index in zip(rows, indices)]


def _count_rows_once(gathered: dict) -> dict:
    """Gathered evaluation tensors with each dataset row once: the first copy of a repeated row keeps its image and
    its texts, later copies are dropped (without row positions, e.g. a custom collator, everything is kept)."""
    if "row_index" not in gathered or len(gathered["row_index"]) == 0:
        return gathered
    rows, text_rows = gathered["row_index"].cpu().numpy(), gathered["text_row_index"].cpu().numpy()
    keep_images = np.zeros(len(rows), dtype=bool)
    keep_images[np.unique(rows, return_index=True)[1]] = True
    # a row's texts come in copies of the same k texts, in order: keep its first k
    order = np.argsort(text_rows, kind="stable")
    rank_in_row = np.empty(len(text_rows), dtype=np.int64)
    rank_in_row[order] = np.arange(len(text_rows)) - np.searchsorted(text_rows[order], text_rows[order])
    texts_per_copy = np.bincount(text_rows) // np.maximum(np.bincount(rows, minlength=text_rows.max() + 1), 1)
    keep_texts = rank_in_row < texts_per_copy[text_rows]
    image_names = ("image_embeds", "image_ids", "row_index")
    return {name: value[torch.from_numpy(keep_images if name in image_names else keep_texts).to(value.device)]
            for name, value in gathered.items()}


def _batch_rows(batch) -> int:
    """Images in a collated batch (a custom collator without ids: the first dimension of its image input)."""
    for key in ("image_ids", "pixel_values", "image_embeds"):
        if key in batch:
            return len(batch[key])
    return 1  # nothing to judge by: assume the batch has rows


def _as_siglip_arguments(args) -> SiglipTrainingArguments:
    """SiglipTrainingArguments as given, built from a plain TrainingArguments (TRL's convention), or default."""
    if args is None:
        return SiglipTrainingArguments(output_dir="siglip-output")
    if isinstance(args, SiglipTrainingArguments):
        return args
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict masks tokens
    fields = {name for name, spec in SiglipTrainingArguments.__dataclass_fields__.items() if spec.init}
    return SiglipTrainingArguments(**{name: value for name, value in values.items() if name in fields})


def _is_map_style(dataset) -> bool:
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or _is_stream(dataset):
        return False
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _is_stream(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _prepare_stream(dataset, args: SiglipTrainingArguments):
    """A training stream: shuffled (shard order, then a buffer of `stream_shuffle_buffer_size` rows; the same seed on
    every process, so each takes different shards), read by each process itself (accelerate would otherwise read
    and decode every batch on process 0 and send slices), skipped on resume by `StreamEpochs`, not the Trainer."""
    if args.accelerator_config.dispatch_batches is None:
        args.accelerator_config.dispatch_batches = False
    args.ignore_data_skip = True
    if args.stream_shuffle_buffer_size > 0:
        dataset = dataset.shuffle(seed=args.data_seed if args.data_seed is not None else args.seed,
                                  buffer_size=args.stream_shuffle_buffer_size)
    return dataset


def _loss_options(args: SiglipTrainingArguments) -> dict:
    """The loss settings that differ from the defaults (the teacher's weight too when a momentum teacher runs)."""
    options = args.loss_config.changed()
    if args.teacher_momentum is not None:
        options.update(teacher_weight=args.loss_config.teacher_weight)
    return options


def _locked_towers(args: SiglipTrainingArguments) -> list[str]:
    return [tower for tower in ("text", "vision") if getattr(args, f"lock_{tower}_tower")]


def _rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


@contextlib.contextmanager
def _replay_rng(state):
    cpu, cuda = state
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


__all__ = ["SiglipTrainer", "siglip_parameter_groups"]
