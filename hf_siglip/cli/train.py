"""`hf-siglip train`: data preparation -> model -> SiglipTrainer -> evaluation -> checkpoint with a model card.

Arguments come from three dataclasses, as in TRL's scripts: `SiglipScriptArguments` (data),
`SiglipModelArguments` (model) and `SiglipTrainingArguments` (training). A YAML recipe (`--config`) sets
any of their fields; command-line flags override it. With no arguments at all it trains a small model on
the embedded demo dataset (`DEMO_TRAINING_DEFAULTS`). Under `accelerate launch` the same entry point runs
on many processes.
"""

import glob
import json
import logging
import os
import shutil

import datasets
import torch

from ..data import SiglipDataCollator, add_image_ids, load_image_text_dataset, make_demo_dataset, normalize_captions
from ..data.demo import DEMO_CLASSES, DEMO_TEMPLATES
from ..data.embedding import embed_images, text_uses_attention_mask
from ..data.images import decode_decodable
from ..data.loading import canonical_columns
from ..data.shards import clear_shard_faults, shard_fault_report, shard_faults
from ..data.splits import select_split
from ..data.steps import DataContext, run_data_steps
from ..dual_encoders import load_dual_encoder
from ..errors import own_messages_as_usage_errors
from ..evaluation import chance_recall, to_json, zero_shot_classifier, zero_shot_metrics
from ..modeling_siglip_bottleneck import SiglipBottleneckModel
from ..processing import build_processor, train_caption_tokenizer
from ..training.checkpoint_files import resolve_checkpoint
from ..training.launching import check_process_world
from ..training.trainer import SiglipTrainer
from ..training.training_args import SiglipTrainingArguments
from .arguments import (
    AUTO,
    DEMO,
    DEMO_TRAINING_DEFAULTS,
    SiglipModelArguments,
    SiglipScriptArguments,
    validate_arguments,
)
from .eval_record import evaluation_record, evaluation_record_callback, write_evaluation_record
from .startup import StartupSummary, data_step_settings, describe_run, quiet_local_loading

logger = logging.getLogger(__name__)

DEMO_NOTICE = ("A toy model: trained for a couple of minutes on the embedded demo dataset of 32 x 32 coloured "
               "shapes, to show the pipeline end to end. It knows nothing about real images; do not use it or "
               "fine-tune from it. Start from a released SigLIP checkpoint (e.g. google/siglip-base-patch16-224) or "
               "train on your own data instead.")


def load_splits(script_args: SiglipScriptArguments):
    """(train, eval or None) datasets with canonical column names (`image`, `caption`, `image_id`); the demo is
    generated in-process.

    `eval_split="auto"` takes 'test', else 'validation' (datasets' name for a dev/ or val/ folder), else
    none; a named split that does not exist is an error listing the splits there are.
    """
    return load_named_splits(script_args)[:2]


def load_named_splits(script_args: SiglipScriptArguments):
    """`load_splits` and the name of the evaluation split it chose (None when there is none)."""
    bad_shards = getattr(script_args, "bad_shards", "skip")
    clear_shard_faults()  # the faults this run meets (tar shards): counted in its data report
    if script_args.dataset == DEMO:
        splits = make_demo_dataset(n_train=script_args.demo_train_size, n_test=script_args.demo_test_size,
                                   image_size=script_args.demo_image_size, seed=0)
    else:
        # a training stream's failure is raised at a batch every process agrees on (hf_siglip.training.stream_training)
        splits = load_image_text_dataset(script_args.dataset, split=None, image_column=script_args.image_column,
                                         caption_column=script_args.caption_column, bad_shards=bad_shards,
                                         agreed_failure=True)
    train = select_split(splits, script_args.train_split, script_args.dataset)
    evaluation, eval_split = None, script_args.eval_split
    if script_args.eval_split == AUTO:
        eval_split = None
        for name in ("test", "validation"):
            try:
                evaluation, eval_split = select_split(splits, name, script_args.dataset), name
                break
            except KeyError:
                continue
        else:
            logger.warning("%s has no 'test' or 'validation' split: no evaluation (set --eval_split to choose one)",
                           script_args.dataset)
    elif script_args.eval_split is not None:
        evaluation = select_split(splits, script_args.eval_split, script_args.dataset)
    if isinstance(evaluation, datasets.IterableDataset):
        # retrieval ranks every held-out image against every caption: read the (small) split, and only its
        # files, into Arrow once
        split_name = next(name for name, part in splits.items() if part is evaluation)
        evaluation = load_image_text_dataset(script_args.dataset, split=split_name, streaming=False,
                                             image_column=script_args.image_column,
                                             caption_column=script_args.caption_column, bad_shards=bad_shards)
    train = canonical_columns(train, script_args.image_column, script_args.caption_column)
    if evaluation is not None:
        evaluation = canonical_columns(evaluation, script_args.image_column, script_args.caption_column)
    if "image_id" not in train.column_names:
        train = add_image_ids(train)
    if evaluation is not None and "image_id" not in evaluation.column_names:
        evaluation = add_image_ids(evaluation, offset=len(train))
    if script_args.max_train_samples is not None:
        train = (train.take(script_args.max_train_samples) if isinstance(train, datasets.IterableDataset)
                 else train.select(range(min(script_args.max_train_samples, len(train)))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation, eval_split


def _gathered(items: list, accelerator) -> list:
    """Every process's `items`, concatenated (a collective on several processes)."""
    from accelerate.utils import gather_object

    return gather_object(items) if accelerator.num_processes > 1 else items


def build_model_and_processor(model_args: SiglipModelArguments, train, script_args: SiglipScriptArguments,
                              report: dict | None = None, resume_from: str | None = None):
    """(model, processor). When resuming, the processor (the trained tokenizer included) comes from the checkpoint;
    the weights are restored by the trainer. Captions dropped while training a tokenizer go to `report`."""
    from transformers import AutoProcessor, AutoTokenizer

    if model_args.model_name_or_path:  # SigLIP (ours or native), SigLIP 2, CLIP: by config.json's model type
        model = load_dual_encoder(model_args.model_name_or_path, logit_bias_init_value=model_args.logit_bias_init_value)
        processor = AutoProcessor.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
        fit_token_table(model, processor.tokenizer)
        if model_args.text_pooling != "auto":  # a VisionTextDualEncoder checkpoint pooled another way (validated)
            model.config.text_pooling = model_args.text_pooling
            model._freeze_unused_pooler()
        if model_args.image_size is not None:  # another size: position embeddings resampled (validated before)
            from ..resolution import change_image_size

            change_image_size(model, model_args.image_size, processor)
        return model, processor

    if model_args.text_model_name_or_path and not is_siglip_text_tower(model_args.text_model_name_or_path):
        return build_text_encoder_pair(model_args, resume_from)
    saved_processor = resume_from and os.path.exists(os.path.join(resume_from, "processor_config.json"))
    if saved_processor:
        processor = AutoProcessor.from_pretrained(resume_from)
        tokenizer = processor.tokenizer
    else:
        if model_args.tokenizer_name_or_path:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
        elif model_args.text_model_name_or_path:
            tokenizer = AutoTokenizer.from_pretrained(model_args.text_model_name_or_path)
        else:
            counts = {"captions_dropped": 0}
            tokenizer = train_caption_tokenizer(_iter_captions(train, "caption", counts),
                                                vocab_size=model_args.vocab_size,
                                                model_max_length=script_args.max_length)
            if report is not None:
                report["tokenizer_training"] = counts
        processor = build_processor(tokenizer, image_size=model_args.image_size)
    towers = dict(hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
                  num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads)
    text_config = dict(vocab_size=len(tokenizer), max_position_embeddings=script_args.max_length,
                       bottleneck_dim=model_args.bottleneck_dim,
                       # the tokenizer's own special tokens (else the Trainer re-aligns the config, with a warning)
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **towers)
    vision_config = dict(image_size=model_args.image_size, patch_size=model_args.patch_size, **towers)
    model = SiglipBottleneckModel.from_vision_text_pretrained(
        vision_model_name_or_path=model_args.vision_model_name_or_path,
        text_model_name_or_path=model_args.text_model_name_or_path,
        text_config=None if model_args.text_model_name_or_path else text_config,
        vision_config=None if model_args.vision_model_name_or_path else vision_config,
        logit_bias_init_value=model_args.logit_bias_init_value,
    )
    if model_args.text_model_name_or_path:
        fit_token_table(model, tokenizer)
    return model, processor


def is_siglip_text_tower(name_or_path: str) -> bool:
    """Whether the checkpoint's text tower is SigLIP's (it joins a `SiglipBottleneckModel`); any other text encoder
    makes a `VisionTextDualEncoder` (`build_text_encoder_pair`)."""
    from transformers import AutoConfig

    from ..dual_encoders import SIGLIP_TEXT_MODEL_TYPES

    return AutoConfig.from_pretrained(name_or_path).model_type in SIGLIP_TEXT_MODEL_TYPES


def build_text_encoder_pair(model_args: SiglipModelArguments, resume_from: str | None = None):
    """(model, processor) for a pretrained non-SigLIP text encoder (BERT, RoBERTa, XLM-R, MiniLM) beside a pretrained
    vision backbone or a new SigLIP vision tower: a `VisionTextDualEncoder` (saved as transformers'
    VisionTextDualEncoderModel) with the text encoder's tokenizer and the vision checkpoint's image processor (else
    SigLIP's at the tower's size) in a `VisionTextDualEncoderProcessor`. Resuming, the processor is the checkpoint's."""
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        SiglipVisionConfig,
        VisionTextDualEncoderProcessor,
    )

    from ..dual_encoders import build_vision_text_dual_encoder

    vision_config = None
    if not model_args.vision_model_name_or_path:
        vision_config = SiglipVisionConfig(
            image_size=model_args.image_size, patch_size=model_args.patch_size, hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size, num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads)
    with own_messages_as_usage_errors():
        model = build_vision_text_dual_encoder(
            model_args.text_model_name_or_path, model_args.vision_model_name_or_path, vision_config,
            text_pooling=model_args.text_pooling, logit_bias_init_value=model_args.logit_bias_init_value)
    if resume_from and os.path.exists(os.path.join(resume_from, "processor_config.json")):
        processor = AutoProcessor.from_pretrained(resume_from)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path
                                                  or model_args.text_model_name_or_path)
        image_processor = None
        if model_args.vision_model_name_or_path:
            try:  # the backbone's own preprocessing, as it was trained
                image_processor = AutoImageProcessor.from_pretrained(model_args.vision_model_name_or_path)
            except (OSError, ValueError, ImportError):
                logger.info("%s has no image processor: SigLIP's at the tower's image size",
                            model_args.vision_model_name_or_path)
        if image_processor is None:
            size = model.config.vision_config.image_size
            image_processor = build_processor(tokenizer, image_size=size if isinstance(size, int) else size[0]) \
                .image_processor
        processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    fit_token_table(model, processor.tokenizer)
    return model, processor


def fit_token_table(model, tokenizer) -> None:
    """A tokenizer with more tokens than the model's vocabulary (tokens added for fine-tuning) gets them:
    `resize_token_embeddings` grows the token table (with bottleneck embeddings, the N x K table; the projection
    stays), new rows initialised as transformers does. A smaller tokenizer leaves the table as it is."""
    text_config = model.config.get_text_config()
    old, new = text_config.vocab_size, len(tokenizer)
    if new <= old:
        return
    try:
        model.resize_token_embeddings(new)
    except NotImplementedError:  # transformers.CLIPModel keeps its token table in its text tower only
        model.text_model.resize_token_embeddings(new)
        text_config.vocab_size = new
    logger.warning("The tokenizer holds %d tokens, the model's vocabulary %d: the token table now has %d rows.",
                   new, old, new)


def _iter_captions(dataset, column, counts: dict):
    """Every usable caption of `column`; None / empty ones are skipped and counted in `counts` (the collator
    drops such rows again, and counts them, when it meets them)."""
    for row, cell in enumerate(record[column] for record in dataset.select_columns([column])):
        captions, dropped = normalize_captions(cell, row=row)
        counts["captions_dropped"] += dropped
        yield from captions


def usable_rows(evaluation) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows with a decodable image and at least one caption (the rows the evaluation collator keeps);
    the others are counted by reason. Columns by their canonical names (`load_splits`)."""
    _, decodable = decode_decodable(evaluation["image"])
    decodable = set(decodable)
    kept, dropped = [], {"rows_with_undecodable_image": 0, "rows_without_caption": 0}
    for row, cell in enumerate(evaluation["caption"]):
        if row not in decodable:
            dropped["rows_with_undecodable_image"] += 1
        elif not normalize_captions(cell, row)[0]:
            dropped["rows_without_caption"] += 1
        else:
            kept.append(row)
    return kept, dropped


def zero_shot_classes(script_args: SiglipScriptArguments) -> list[str] | None:
    """The zero-shot class names: the configured ones, the demo's own for the demo, else none."""
    return script_args.zero_shot_classes or (list(DEMO_CLASSES) if script_args.dataset == DEMO else None)


def zero_shot_evaluation(model, processor, evaluation, script_args: SiglipScriptArguments,
                         image_embeds: torch.Tensor | None = None) -> dict:
    """Zero-shot top-1/5 on the rows retrieval evaluates (a decodable image and a caption), the images decoded in
    full and prepared by the processor, as `hf-siglip eval` does. `image_embeds`: the embeddings of every row of
    `evaluation` when the caller has them (then `evaluation` holds only usable rows)."""
    classes = zero_shot_classes(script_args)
    if not classes or evaluation is None or script_args.label_column not in evaluation.column_names:
        return {}
    templates = script_args.zero_shot_templates or DEMO_TEMPLATES
    model.eval()
    if image_embeds is None:
        evaluation = evaluation.select(usable_rows(evaluation)[0])  # the retrieval pass counted the rest
        if not len(evaluation):
            return {}
        image_embeds = embed_images(model, processor, evaluation["image"])
    classifier = zero_shot_classifier(model, processor, classes, templates, max_length=script_args.max_length)
    labels = torch.tensor(evaluation[script_args.label_column])
    metrics = zero_shot_metrics(image_embeds, labels, classifier)
    metrics["zero_shot_classes"] = len(classes)
    metrics["zero_shot_chance_top1"] = 1.0 / len(classes)
    return metrics


def save_training_curves(log_history: list[dict], path: str) -> str | None:
    """PNG of loss, t and b against the step (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training-curve image (pip install matplotlib)")
        return None
    entries = [entry for entry in log_history if "loss" in entry]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("loss", "loss (global batch)", "loss"), ("t", "temperature t = exp(logit_scale)", "t"),
              ("b", "bias b", "b"))
    for axis, (key, title, label) in zip(axes, panels):
        axis.plot([e["step"] for e in entries if key in e], [e[key] for e in entries if key in e], label="training")
        if key == "loss" and evaluations:
            axis.plot([e["step"] for e in evaluations], [e["eval_loss"] for e in evaluations], "o",
                      label="evaluation")
            axis.legend()
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        # plain tick labels: with an offset, b = -10 would read as "0.004" under a "-1e1" corner label
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def resolve_resume(training_args: SiglipTrainingArguments, overwrite_output_dir: bool) -> str | None:
    """The checkpoint to resume from (`--resume_from_checkpoint PATH|true`), or None for a fresh start.

    `true` takes the newest complete checkpoint (`hf_siglip.training.checkpoint_files`: one a kill cut short while it
    was
    written is skipped and named). A fresh start into an output_dir that holds checkpoints is refused unless
    `overwrite_output_dir`, which then deletes them (a stale checkpoint-N left beside the new run's would be what
    `true` resumes next time).
    """
    from transformers.trainer_utils import get_last_checkpoint

    requested = training_args.resume_from_checkpoint
    if isinstance(requested, str) and requested.strip().lower() in ("", "false", "none", "no"):
        requested = None
    output_dir = training_args.output_dir
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if requested is None:
        if last is not None and not overwrite_output_dir:
            raise ValueError(
                f"output_dir {output_dir} holds checkpoints (latest: {os.path.basename(last)}) and a fresh run would "
                f"write over them. Continue the run with --resume_from_checkpoint true (or a checkpoint path), or "
                f"start afresh with --overwrite_output_dir true (deletes its checkpoint-* folders).")
        if last is not None:
            with training_args.main_process_first(desc="deleting old checkpoints"):
                if training_args.process_index == 0:
                    for folder in glob.glob(os.path.join(output_dir, "checkpoint-*")):
                        shutil.rmtree(folder, ignore_errors=True)
        return None
    # the newest complete checkpoint, naming newer incomplete ones; a given path must be complete
    if str(requested).strip().lower() in ("true", "yes", "1"):
        return resolve_checkpoint(output_dir, True)
    return resolve_checkpoint(output_dir, requested)


def seed_everything(training_args: SiglipTrainingArguments) -> None:
    """Seed before anything random is built (model init, tokenizer, data steps), as the Trainer would."""
    from transformers import enable_full_determinism, set_seed

    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


FINETUNED_FOLDER = "finetuned"  # under output_dir: the fine-tuned end point when WiSE-FT saves a mix


def forgetting_measures(trainer, script_args: SiglipScriptArguments, processor, evaluation, resume_from):
    """`--anchor_dataset`: its zero-shot accuracy joins every evaluation (before training too: `eval_on_start`, on a
    fresh run). Returns a CPU copy of the starting weights when `--wise_ft_alphas` asks for a sweep, else None."""
    if not script_args.anchor_dataset:
        return None
    from ..errors import UsageError
    from ..training.wise_ft import parse_alphas, weight_snapshot
    from .anchor import AnchorEvaluation, anchor_callback

    if evaluation is None:
        raise UsageError(f"anchor_dataset / wise_ft_alphas need an evaluation split of {script_args.dataset} (the "
                         "target metric): it has none; name one with --eval_split")
    labels = script_args.label_column in evaluation.column_names
    if script_args.wise_ft_target_metric == "zero_shot_top1" and not labels:
        raise UsageError(f"wise_ft_target_metric zero_shot_top1: the evaluation split of {script_args.dataset} has no "
                         f"label column {script_args.label_column!r} (columns: {evaluation.column_names}); name it "
                         "with --label_column")
    with own_messages_as_usage_errors(), quiet_local_loading(script_args.anchor_dataset):
        anchor = AnchorEvaluation(script_args, processor)
    trainer.add_callback(anchor_callback(trainer, anchor))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if parse_alphas(script_args.wise_ft_alphas) is not None and any("lora_" in name for name, _ in
                                                                    model.named_parameters()):
        # mixing an adapter's A and B factors separately is not the mix of the weights they make
        raise UsageError("wise_ft_alphas with use_peft is not supported yet (mixing LoRA factors is not mixing the "
                         "weights they make): fine-tune without use_peft to sweep mixes")
    if resume_from is None:  # a resumed run's log already holds its start
        trainer.args.eval_on_start = True
    if parse_alphas(script_args.wise_ft_alphas) is None:
        return None
    # the weights training starts from (a resumed run's too: the checkpoint is loaded inside train())
    return weight_snapshot(model)


def save_wise_ft_curve(result: dict, output_dir: str, anchor_name: str) -> str | None:
    from ..training.wise_ft import save_sweep_curve

    curve = save_sweep_curve(result, os.path.join(output_dir, "wise_ft.png"), anchor_name)
    return os.path.basename(curve) if curve else None


def run_train(script_args: SiglipScriptArguments, model_args: SiglipModelArguments,
              training_args: SiglipTrainingArguments) -> dict:
    """The whole job; returns the evaluation metrics (also written to output_dir/eval_results.json)."""
    validate_arguments(script_args, model_args, training_args)  # before any data is read
    check_process_world(training_args.world_size)
    if training_args.push_to_hub:
        from ..hub import check_hub_access

        check_hub_access(training_args.hub_token)  # before hours of training, not after
    with own_messages_as_usage_errors():  # our messages (a missing split, checkpoints in the way): one line each
        resume_from = resolve_resume(training_args, script_args.overwrite_output_dir)
    seed_everything(training_args)

    with own_messages_as_usage_errors(), quiet_local_loading(script_args.dataset):
        train, evaluation, eval_split = load_named_splits(script_args)
    models = {}

    def training_model(data):
        """The model being trained, built once (a new tokenizer learns the captions of `data` as they are)."""
        if not models:
            models["pair"] = build_model_and_processor(model_args, data, script_args, context.report, resume_from)
        return models["pair"]

    context = DataContext(seed=training_args.seed, max_length=script_args.max_length, training_model=training_model,
                          main_process_first=training_args.main_process_first,
                          run=os.path.abspath(training_args.output_dir))  # names the steps' shared results
    train = run_data_steps(train, script_args.steps(), context)
    model, processor = training_model(train)
    peft_model, fine_tuning = None, {}  # fine_tuning: the model card's account of LoRA and layer decay
    if model_args.use_peft:  # adapters injected into `model` itself, which trains as before (hf_siglip.lora)
        from ..lora import add_lora, count_parameters

        peft_model = add_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                              target_modules=model_args.lora_target_modules, towers=model_args.lora_towers)
        fine_tuning["LoRA (peft)"] = (
            f"r {model_args.lora_r}, alpha {model_args.lora_alpha}, dropout {model_args.lora_dropout}, "
            f"{' + '.join(model_args.lora_towers)} tower(s), {count_parameters(model)[0]:,} adapter parameters; "
            + ("merged, adapter in adapter/" if model_args.merge_adapter else "saved as the adapter"))
    if training_args.layer_lr_decay is not None:
        fine_tuning["layer-wise lr decay"] = training_args.layer_lr_decay
    # what the run is about to do, printed when training begins (process 0 reads a sample of the data for it)
    facts = (describe_run(script_args, model_args, train, evaluation, eval_split, model, processor, context.report)
             if training_args.process_index == 0 else None)
    processor.tokenizer.model_max_length = script_args.max_length  # saved: `hf-siglip eval` reads it back
    collator = SiglipDataCollator(processor=processor, max_length=script_args.max_length,
                                  return_attention_mask=text_uses_attention_mask(model),  # BERT-like text towers
                                  **context.collator_options,  # what the batch steps hand over
                                  image_fast_path=script_args.image_fast_path)
    trainer = SiglipTrainer(model=model, args=training_args, data_collator=collator, train_dataset=train,
                            eval_dataset=evaluation, processing_class=processor)
    trainer.data_steps_report = context.report  # logged with the first training log, and in the model card
    # what this run evaluates on, beside the weights and in each checkpoint: `hf-siglip eval` reads it back
    record = evaluation_record(script_args, eval_split if evaluation is not None else None)
    trainer.add_callback(evaluation_record_callback(record))
    trainer.add_callback(StartupSummary(facts))
    start_weights = forgetting_measures(trainer, script_args, processor, evaluation, resume_from)
    trainer.train(resume_from_checkpoint=resume_from)
    wise_ft = None
    if start_weights is not None:  # WiSE-FT: keep the fine-tuned end point, then load and save the chosen mix
        from ..training.wise_ft import run_sweep, sweep_alphas

        trainer.save_model(os.path.join(training_args.output_dir, FINETUNED_FOLDER))
        alphas = sweep_alphas(script_args.wise_ft_alphas, script_args.wise_ft_rule)
        zero_shot = ((lambda mix: zero_shot_evaluation(mix, processor, evaluation, script_args))
                     if zero_shot_classes(script_args) else None)  # the target's classes: each mix's zero-shot too
        wise_ft = run_sweep(trainer, start_weights, alphas, script_args.wise_ft_rule,
                            script_args.wise_ft_max_anchor_drop, script_args.wise_ft_target_metric, zero_shot)

    metrics, protocol = {}, None
    evaluation_name = "hf_siglip demo" if script_args.dataset == DEMO else script_args.dataset
    if evaluation is not None:
        metrics.update(trainer.evaluate())  # every caption, no augmentation (SiglipTrainer's evaluation collator)
        zero_shot = zero_shot_evaluation(model, processor, evaluation, script_args)  # rows and pixels as hf-siglip eval
        metrics.update({f"eval_{k}": v for k, v in zero_shot.items()})
        captions_per_image = len(evaluation[0]["caption"]) if not isinstance(evaluation[0]["caption"], str) else 1
        n_images = len(evaluation)
        metrics["eval_i2t_chance_recall@1"] = chance_recall(n_images * captions_per_image, captions_per_image, 1)
        metrics["eval_t2i_chance_recall@1"] = chance_recall(n_images, 1, 1)
        protocol = (f"On the held-out split of {evaluation_name}: {n_images:,} images and their captions "
                    f"({captions_per_image} per image). Retrieval ranks every image against every caption and back "
                    f"(recall@k: the match is among the k best)."
                    + (" Zero-shot: the class names in prompt templates, averaged per class."
                       if any("zero_shot" in key for key in metrics) else ""))
        trainer.log({key: value for key, value in metrics.items() if "zero_shot" in key or "chance" in key})
    data_report = {**context.report, **trainer.data_report(),  # collectives: every process
                   **shard_fault_report(_gathered(shard_faults(), trainer.accelerator), eval_split)}

    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        if peft_model is not None:  # peft's adapter files, and with merge_adapter the merged native model
            from ..lora import save_lora

            save_lora(peft_model, training_args.output_dir, processor, merge=model_args.merge_adapter)
        else:
            trainer.save_model(training_args.output_dir)
        if evaluation is not None and any(o.name == "captioning" for o in trainer.objectives):
            metrics.update(_caption_evaluation(trainer, evaluation, training_args.output_dir))
        if evaluation is not None and script_args.itm_rerank_k:  # as hf-siglip eval --itm_rerank_k on the folder
            from .evaluate import itm_rerank_of_checkpoint

            reranked = itm_rerank_of_checkpoint(training_args.output_dir, evaluation, script_args.itm_rerank_k,
                                                script_args.max_length)
            metrics.update({f"eval_{name}": value for name, value in reranked.items()})
            trainer.log({f"eval_{name}": value for name, value in reranked.items()})
        trainer.save_state()  # trainer_state.json: the whole log history, resumed runs included
        curve = save_training_curves(trainer.state.log_history,
                                     os.path.join(training_args.output_dir, "training_curves.png"))
        trainer.card_info.update(
            eval_dataset=evaluation_name if evaluation is not None else None,
            evaluation_protocol=protocol,
            intended_use=DEMO_NOTICE if script_args.dataset == DEMO else None,
            extra_hyperparameters={"image size": getattr(model.config.vision_config, "image_size", None),
                                   "text length (tokens)": script_args.max_length,
                                   "data steps": json.dumps(script_args.data_steps) if script_args.data_steps
                                   else "none", **fine_tuning},
            training_data="the embedded hf_siglip demo dataset" if script_args.dataset == DEMO else script_args.dataset,
            datasets=None if script_args.dataset == DEMO else [script_args.dataset],
            recipe=script_args.recipe or "hf-siglip train defaults",
            training_curve=os.path.basename(curve) if curve else None,
            base_model=model_args.model_name_or_path,
            data_report=data_report,
        )
        if wise_ft is not None:
            wise_ft.update(finetuned=FINETUNED_FOLDER, anchor_dataset=script_args.anchor_dataset,
                           curve=save_wise_ft_curve(wise_ft, training_args.output_dir, script_args.anchor_dataset))
            trainer.card_info["wise_ft"] = wise_ft
            write_evaluation_record(record, os.path.join(training_args.output_dir, FINETUNED_FOLDER))
        trainer.create_model_card()
        to_json({"metrics": metrics, "data": data_report, "data_steps": data_step_settings(script_args),
                 **({"wise_ft": wise_ft} if wise_ft is not None else {})},
                os.path.join(training_args.output_dir, "eval_results.json"))  # data_steps: every setting of each
        write_evaluation_record(record, training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    return metrics


def _caption_evaluation(trainer, evaluation, output_dir: str) -> dict:
    """The saved captioner's captions for the held-out images, scored as `hf-siglip caption` does (its files in
    `output_dir/captions/`); logged as eval_caption_* so the model card reports them."""
    from .caption import caption_evaluation, captioner_folder, write_captions

    caption_metrics, rows = caption_evaluation(captioner_folder(output_dir), evaluation)
    write_captions(os.path.join(output_dir, "captions"), caption_metrics, rows)
    logged = {f"eval_{name}": value for name, value in caption_metrics.items() if "/" not in name}
    trainer.log(logged)
    return logged


__all__ = ["DEMO_TRAINING_DEFAULTS", "SiglipModelArguments", "SiglipScriptArguments", "load_named_splits",
           "load_splits", "resolve_resume", "run_train", "usable_rows", "zero_shot_evaluation"]
