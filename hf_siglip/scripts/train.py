"""`hf-siglip train`: data preparation -> model -> SiglipTrainer -> evaluation -> checkpoint with a model card.

Arguments come from three dataclasses, as in TRL's scripts: `SiglipScriptArguments` (data),
`SiglipModelArguments` (model) and `SiglipTrainingArguments` (training). A YAML recipe (`--config`) sets
any of their fields; command-line flags override it. With no arguments at all it trains a small model on
the embedded demo dataset (`DEMO_TRAINING_DEFAULTS`). Under `accelerate launch` the same entry point runs
on many processes.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from ..data import (
    CaptionSampler,
    SiglipDataCollator,
    add_image_ids,
    load_image_text_dataset,
    make_demo_dataset,
)
from ..data.demo import DEMO_CLASSES, DEMO_TEMPLATES
from ..data.embedding import add_image_embeddings, embed_images
from ..evaluation import chance_recall, to_json, zero_shot_classifier, zero_shot_metrics
from ..modeling_siglip_bottleneck import SiglipBottleneckModel
from ..processing import build_processor, train_caption_tokenizer
from ..trainer import SiglipTrainer
from ..training_args import SiglipTrainingArguments

logger = logging.getLogger(__name__)

DEMO = "demo"
# Training defaults for the embedded demo (a YAML recipe or flags override each of them).
DEMO_TRAINING_DEFAULTS = dict(
    output_dir="outputs/siglip-demo",
    per_device_train_batch_size=128,
    per_device_eval_batch_size=256,
    num_train_epochs=14,
    learning_rate=2e-3,
    warmup_steps=0.1,
    weight_decay=1e-4,
    lr_scheduler_type="cosine",
    logging_steps=10,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    seed=0,
)


@dataclass
class SiglipScriptArguments:
    """Where the data comes from and how it is prepared before training."""

    dataset: str = field(default=DEMO, metadata={
        "help": "'demo' (the embedded dataset), a local image folder with metadata.jsonl, a parquet/arrow/"
                "save_to_disk folder, or any datasets.load_dataset spec."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="test", metadata={"help": "Split to evaluate on (None: no evaluation)."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    caption_column: str = field(default="caption", metadata={
        "help": "Caption column (a string or a list of strings per row)."})
    max_length: int = field(default=16, metadata={"help": "Text length in tokens (padded/truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    demo_train_size: int = field(default=4000, metadata={"help": "Demo: number of training images."})
    demo_test_size: int = field(default=500, metadata={"help": "Demo: number of held-out images."})
    demo_image_size: int = field(default=32, metadata={"help": "Demo: image side in pixels."})
    captions_per_image: int | None = field(default=None, metadata={
        "help": "FFF batch text augmentation: k captions per image drawn each epoch from the caption and "
                "pseudo-caption columns (None: every caption of the row)."})
    pseudo_caption_model: str | None = field(default=None, metadata={
        "help": "An image-to-text checkpoint (BLIP, BLIP-2, GIT...) that adds pseudo-captions before training."})
    num_pseudo_captions: int = field(default=3, metadata={"help": "Pseudo-captions sampled per image."})
    cat_filter: bool = field(default=False, metadata={"help": "Apply DiHT's CAT filter to the training data."})
    cat_min_complexity: int | None = field(default=2, metadata={"help": "CAT: minimum caption complexity."})
    cat_require_action: bool = field(default=True, metadata={"help": "CAT: require a verb with a subject."})
    cat_text_spotting: bool = field(default=True, metadata={"help": "CAT: drop captions that spell text in the image."})
    cache_image_embeddings: bool = field(default=False, metadata={
        "help": "SigLiT: embed every training image once with the (locked) vision tower and train on the cached "
                "embeddings; requires lock_vision_tower."})
    label_noise: float = field(default=0.0, metadata={"help": "SigLIP 4.10: fraction of rows to corrupt."})
    zero_shot_classes: list[str] | None = field(default=None, metadata={
        "help": "Class names for zero-shot evaluation (demo: its 30 colour-shape classes)."})
    zero_shot_templates: list[str] | None = field(default=None, metadata={"help": "Prompt templates with '{}'."})
    label_column: str = field(default="label", metadata={"help": "Zero-shot label column (class index)."})
    recipe: str | None = field(default=None, metadata={"help": "Recipe name, recorded in the model card."})


@dataclass
class SiglipModelArguments:
    """Which model to train: a checkpoint, separately pretrained towers, or a new small model."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A SigLIP checkpoint (native google/siglip-* format or ours) to fine-tune."})
    vision_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained vision backbone (any HF vision model) for a new dual encoder."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained SigLIP text tower for a new dual encoder (else a new text tower)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to use (else the checkpoint's, or one trained on the training captions)."})
    vocab_size: int = field(default=1000, metadata={"help": "New tokenizer: maximum vocabulary size."})
    hidden_size: int = field(default=128, metadata={"help": "New towers: width."})
    intermediate_size: int = field(default=256, metadata={"help": "New towers: MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "New towers: layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "New towers: attention heads."})
    patch_size: int = field(default=8, metadata={"help": "New vision tower: patch size."})
    image_size: int | None = field(default=None, metadata={"help": "New vision tower: input size (demo: its size)."})
    bottleneck_dim: int | None = field(default=None, metadata={"help": "Bottleneck token embeddings K (None: off)."})
    logit_bias_init_value: float = field(default=-10.0, metadata={"help": "Initial b for new heads."})


def load_splits(script_args: SiglipScriptArguments):
    """(train, eval or None) datasets; the demo is generated in-process."""
    if script_args.dataset == DEMO:
        splits = make_demo_dataset(n_train=script_args.demo_train_size, n_test=script_args.demo_test_size,
                                   image_size=script_args.demo_image_size, seed=0)
        train, evaluation = splits["train"], splits["test"]
    else:
        def load(split):
            return load_image_text_dataset(script_args.dataset, split=split, image_column=script_args.image_column,
                                           caption_column=script_args.caption_column)
        train = load(script_args.train_split)
        evaluation = load(script_args.eval_split) if script_args.eval_split else None
        if "image_id" not in train.column_names:
            train = add_image_ids(train)
        if evaluation is not None and "image_id" not in evaluation.column_names:
            evaluation = add_image_ids(evaluation, offset=len(train))
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def prepare_training_data(train, script_args: SiglipScriptArguments, seed: int):
    """The papers' data steps, in order: pseudo-captions -> CAT filter -> label noise. Returns (data, report)."""
    report = {}
    if script_args.pseudo_caption_model:
        from ..data.pseudo_captions import add_pseudo_captions, load_captioner

        captioner, captioner_processor = load_captioner(script_args.pseudo_caption_model)
        train, report["pseudo_captions"] = add_pseudo_captions(
            train, captioner, captioner_processor, num_captions=script_args.num_pseudo_captions,
            image_column=script_args.image_column, seed=seed)
    if script_args.cat_filter:
        from ..data.filters import cat_filter

        train, report["cat_filter"] = cat_filter(
            train, min_complexity=script_args.cat_min_complexity, require_action=script_args.cat_require_action,
            text_spotting=script_args.cat_text_spotting, image_column=script_args.image_column,
            caption_column=script_args.caption_column)
    if script_args.label_noise > 0:
        from ..data.noise import corrupt_labels

        train = corrupt_labels(train, p=script_args.label_noise, seed=seed, image_column=script_args.image_column,
                               caption_column=script_args.caption_column)
        report["label_noise"] = script_args.label_noise
    return train, report


def build_model_and_processor(model_args: SiglipModelArguments, train, script_args: SiglipScriptArguments):
    from transformers import AutoProcessor, AutoTokenizer

    if model_args.model_name_or_path:
        model = SiglipBottleneckModel.from_pretrained(model_args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
        return model, processor

    image_size = model_args.image_size or script_args.demo_image_size
    if model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    elif model_args.text_model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.text_model_name_or_path)
    else:
        tokenizer = train_caption_tokenizer(_iter_captions(train, script_args.caption_column),
                                            vocab_size=model_args.vocab_size, model_max_length=script_args.max_length)
    processor = build_processor(tokenizer, image_size=image_size)
    towers = dict(hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
                  num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads)
    text_config = dict(vocab_size=len(tokenizer), max_position_embeddings=script_args.max_length,
                       bottleneck_dim=model_args.bottleneck_dim, bos_token_id=None, eos_token_id=None,
                       pad_token_id=tokenizer.pad_token_id, **towers)
    vision_config = dict(image_size=image_size, patch_size=model_args.patch_size, **towers)
    model = SiglipBottleneckModel.from_vision_text_pretrained(
        vision_model_name_or_path=model_args.vision_model_name_or_path,
        text_model_name_or_path=model_args.text_model_name_or_path,
        text_config=None if model_args.text_model_name_or_path else text_config,
        vision_config=None if model_args.vision_model_name_or_path else vision_config,
        logit_bias_init_value=model_args.logit_bias_init_value,
    )
    return model, processor


def _iter_captions(dataset, column):
    for cell in dataset.select_columns([column])[column]:
        yield from ([cell] if isinstance(cell, str) else [c for c in cell if isinstance(c, str)])


def zero_shot_evaluation(model, processor, evaluation, script_args: SiglipScriptArguments) -> dict:
    classes = script_args.zero_shot_classes or (DEMO_CLASSES if script_args.dataset == DEMO else None)
    if not classes or evaluation is None or script_args.label_column not in evaluation.column_names:
        return {}
    templates = script_args.zero_shot_templates or DEMO_TEMPLATES
    model.eval()
    classifier = zero_shot_classifier(model, processor, classes, templates, max_length=script_args.max_length)
    image_embeds = embed_images(model, processor, evaluation[script_args.image_column])
    metrics = zero_shot_metrics(image_embeds, torch.tensor(evaluation[script_args.label_column]), classifier)
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
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for axis, key, title in zip(axes, ("loss", "t", "b"), ("loss (global)", "temperature t", "bias b")):
        axis.plot([e["step"] for e in entries if key in e], [e[key] for e in entries if key in e])
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_train(script_args: SiglipScriptArguments, model_args: SiglipModelArguments,
              training_args: SiglipTrainingArguments) -> dict:
    """The whole job; returns the evaluation metrics (also written to output_dir/eval_results.json)."""
    train, evaluation = load_splits(script_args)
    train, data_report = prepare_training_data(train, script_args, training_args.seed)
    model, processor = build_model_and_processor(model_args, train, script_args)
    if script_args.cache_image_embeddings:
        if not training_args.lock_vision_tower:
            raise ValueError("cache_image_embeddings needs lock_vision_tower: a trained tower's embeddings change.")
        with training_args.main_process_first(desc="caching image embeddings"):
            train = add_image_embeddings(train, model, processor, image_column=script_args.image_column)
        train = train.remove_columns(script_args.image_column)
    sampler = None
    if script_args.captions_per_image:
        columns = [script_args.caption_column] + (["pseudo_captions"] if script_args.pseudo_caption_model else [])
        sampler = CaptionSampler(columns=columns, k=script_args.captions_per_image, seed=training_args.seed)
    collator = SiglipDataCollator(processor=processor, max_length=script_args.max_length,
                                  image_column=script_args.image_column, caption_column=script_args.caption_column,
                                  caption_sampler=sampler)
    eval_collator = SiglipDataCollator(processor=processor, max_length=script_args.max_length,
                                       image_column=script_args.image_column, caption_column=script_args.caption_column)
    trainer = SiglipTrainer(model=model, args=training_args, data_collator=collator, train_dataset=train,
                            eval_dataset=evaluation, processing_class=processor)
    trainer.train()

    metrics = {}
    if evaluation is not None:
        trainer.data_collator = eval_collator  # all captions, no sampling, for the retrieval protocol
        metrics.update(trainer.evaluate())
        metrics.update({f"eval_{k}": v for k, v in zero_shot_evaluation(model, processor, evaluation, script_args).items()})
        captions_per_image = len(evaluation[0][script_args.caption_column]) if not isinstance(
            evaluation[0][script_args.caption_column], str) else 1
        n_images = len(evaluation)
        metrics["eval_i2t_chance_recall@1"] = chance_recall(n_images * captions_per_image, captions_per_image, 1)
        metrics["eval_t2i_chance_recall@1"] = chance_recall(n_images, 1, 1)
        trainer.log({key: value for key, value in metrics.items() if "zero_shot" in key or "chance" in key})

    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        trainer.save_model(training_args.output_dir)
        curve = save_training_curves(trainer.state.log_history,
                                     os.path.join(training_args.output_dir, "training_curves.png"))
        trainer.card_info.update(
            training_data="the embedded hf_siglip demo dataset" if script_args.dataset == DEMO else script_args.dataset,
            datasets=None if script_args.dataset == DEMO else [script_args.dataset],
            recipe=script_args.recipe or "hf-siglip train defaults",
            training_curve=os.path.basename(curve) if curve else None,
            base_model=model_args.model_name_or_path,
        )
        trainer.create_model_card()
        to_json({"metrics": metrics, "data": data_report}, os.path.join(training_args.output_dir, "eval_results.json"))
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    return metrics


def format_metrics(metrics: dict) -> str:
    rows = [f"{name:<32} {value:.4f}" for name, value in sorted(metrics.items()) if isinstance(value, float)]
    return "\n".join(rows)


__all__ = ["DEMO_TRAINING_DEFAULTS", "SiglipModelArguments", "SiglipScriptArguments", "run_train"]
