"""The fields of `hf-siglip train` / `eval` beyond `SiglipTrainingArguments`, and their validation.

`validate_arguments` checks the whole configuration before any data is loaded or any tokenizer is trained,
with messages that name the field and the allowed values: a mistake costs seconds, not a data pass.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..paths import missing_local_path

logger = logging.getLogger(__name__)

DEMO = "demo"
AUTO = "auto"
# SigLIP's base resolution: a new vision tower on user data without --image_size gets it (logged).
DEFAULT_IMAGE_SIZE = 224
# Text length of a new model when neither the flag nor a checkpoint says otherwise (the demo's captions fit).
DEFAULT_MAX_LENGTH = 16
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

NEW_TOWER_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def _none_if_spelled_none(value):
    """`--eval_split None` arrives as the string "None": the help promises it disables evaluation."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "") else value


@dataclass
class SiglipScriptArguments:
    """Where the data comes from and how it is prepared before training."""

    _argument_group_name = "Data and data steps (hf_siglip)"  # its --help group

    dataset: str = field(default=DEMO, metadata={
        "help": "'demo' (the embedded dataset), a local image folder with metadata.jsonl (or train/ dev/ test/ "
                "folders each with their own), a folder or glob of webdataset .tar shards (img2dataset layout; "
                "streamed, needs max_steps), a parquet/arrow/save_to_disk folder, or any datasets.load_dataset spec."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=AUTO, metadata={
        "help": "Split to evaluate on. 'auto': 'test', else 'validation' (a dev/ folder), else no evaluation. "
                "None: no evaluation."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    caption_column: str = field(default="caption", metadata={
        "help": "Caption column (a string or a list of strings per row)."})
    max_length: int | None = field(default=None, metadata={
        "help": f"Text length in tokens (padded/truncated). Default: the checkpoint's training length, else "
                f"{DEFAULT_MAX_LENGTH}."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    demo_train_size: int = field(default=4000, metadata={"help": "Demo: number of training images."})
    demo_test_size: int = field(default=500, metadata={"help": "Demo: number of held-out images."})
    demo_image_size: int = field(default=32, metadata={"help": "Demo: image side in pixels."})
    data_steps: list[dict[str, Any]] | str | None = field(default=None, metadata={
        "help": "The data steps, in order: a list of {step: settings} (JSON on the command line), e.g. "
                "'[{\"cat_filter\": {\"min_complexity\": 2}}, {\"caption_sampling\": {\"k\": 5}}]'. Steps: "
                "pseudo_captions, cat_filter, capfilt, positive_groups, label_noise, concept_targets, "
                "image_embedding_cache, caption_sampling, image_augmentation (docs/REFERENCE.md: Data steps)."})
    image_fast_path: str | None = field(default="torch", metadata={
        "help": "How the collator makes pixel_values when the processor only resizes and normalises: 'torch' "
                "(antialiased uint8 resize, within 2/255 of the processor, several times faster), 'pil' (Pillow's "
                "resize, equal to the processor up to float rounding) or None (the processor itself). Other "
                "processors (CLIP's crop, NaFlex) always use the processor."})
    zero_shot_classes: list[str] | None = field(default=None, metadata={
        "help": "Class names for zero-shot evaluation (demo: its 30 colour-shape classes)."})
    zero_shot_templates: list[str] | None = field(default=None, metadata={"help": "Prompt templates with '{}'."})
    label_column: str = field(default="label", metadata={"help": "Zero-shot label column (class index)."})
    recipe: str | None = field(default=None, metadata={"help": "Recipe name, recorded in the model card."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in an output_dir that holds checkpoints, deleting its checkpoint-* folders. Without "
                "it (or --resume_from_checkpoint) such a run refuses to start."})
    bad_shards: str = field(default="skip", metadata={
        "help": "Tar shards: what a bad shard does (truncated, empty, not a tar, a .txt/.json that does not "
                "decode, fewer rows than its <shard>_stats.json records). 'skip': named in a warning, skipped "
                "(the rows read before the fault are kept) and counted in the data report (eval_results.json, "
                "model card); 'fail': the run stops with one line naming the shard. Every process alike."})
    # fine-tuning that does not forget (hf_siglip.cli.anchor, hf_siglip.training.wise_ft)
    anchor_dataset: str | None = field(default=None, metadata={
        "help": "A labelled set with class names ('demo', or an image/caption/label dataset as --dataset takes) "
                "whose zero-shot top-1 is evaluated before, at each evaluation and after training, logged as "
                "eval_anchor_zero_shot_top1 beside the target metrics: what fine-tuning forgets."})
    anchor_split: str = field(default=AUTO, metadata={"help": "Anchor split. 'auto': 'test', else 'validation'."})
    anchor_label_column: str = field(default="label", metadata={"help": "Anchor label column (class index)."})
    anchor_classes: list[str] | None = field(default=None, metadata={
        "help": "Anchor class names (default: the demo's, else the label column's ClassLabel names)."})
    anchor_templates: list[str] | None = field(default=None, metadata={
        "help": "Anchor prompt templates with '{}' (default: the demo's)."})
    anchor_max_samples: int | None = field(default=None, metadata={"help": "Use only the first N anchor rows."})
    wise_ft_alphas: str | None = field(default=None, metadata={
        "help": "WiSE-FT at the end of training: mixes (1-a)*start + a*fine-tuned for these a, e.g. "
                "'0,0.25,0.5,0.75,1' (0 and 1 always added), each evaluated on the target and the anchor set; the "
                "one --wise_ft_rule picks is saved in output_dir, the fine-tuned weights in output_dir/finetuned. "
                "Needs --anchor_dataset."})
    wise_ft_rule: str = field(default="anchor_drop", metadata={
        "help": "Which mix is saved: 'anchor_drop' (best target metric among the mixes whose anchor top-1 is at "
                "most --wise_ft_max_anchor_drop below the start's), 'mean' (best mean of the two), 'target' (best "
                "target metric), or a number: that alpha. Ties: the smaller alpha."})
    wise_ft_target_metric: str = field(default="recall@1", metadata={
        "help": "The sweep's target metric on the evaluation split: 'recall@1' (retrieval, the mean of image->text "
                "and text->image; for captions that differ per image) or 'zero_shot_top1' (zero-shot classification "
                "with --zero_shot_classes / --zero_shot_templates, the demo's own by default; the WiSE-FT paper's "
                "target, for labelled data whose template captions are shared by a class and so tie in retrieval)."})
    wise_ft_max_anchor_drop: float = field(default=0.01, metadata={
        "help": "wise_ft_rule anchor_drop: the anchor accuracy a mix may lose against the start (0.01 = 1 point)."})
    itm_rerank_k: int | None = field(default=None, metadata={
        "help": "Retrieval re-ranked by the ITM head (ALBEF / BLIP): each query's K best candidates by cosine "
                "re-scored by the head the itm objective trains (BLIP: 256 on COCO, 128 on Flickr30K), reported as "
                "i2t_itm_recall@k / t2i_itm_recall@k beside the embeddings' recall (hf-siglip train: after training, "
                "on the held-out split; hf-siglip eval: with the checkpoint's fusion_encoder/). None: no "
                "re-ranking."})

    def __post_init__(self):
        from ..data.steps import parse_data_steps

        self.eval_split = _none_if_spelled_none(self.eval_split)
        self.image_fast_path = _none_if_spelled_none(self.image_fast_path)
        if isinstance(self.data_steps, str):  # JSON from the command line
            try:
                self.data_steps = json.loads(self.data_steps) if self.data_steps.strip() not in ("", "None") else None
            except json.JSONDecodeError as error:
                raise ValueError(f"data_steps: not valid JSON ({error}): {self.data_steps!r}") from None
        # parsed once: an unknown step, setting or value fails here, before any data
        self._steps = parse_data_steps(self.data_steps)

    def steps(self):
        """The data steps as ``[(name, typed config)]``."""
        return self._steps


@dataclass
class SiglipModelArguments:
    """Which model to train: a checkpoint, separately pretrained towers, or a new small model."""

    _argument_group_name = "Model (hf_siglip)"  # its --help group

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A checkpoint to fine-tune: SigLIP (native google/siglip-* format, SigLIP 2 FixRes included, or ours), "
                "SigLIP 2 NaFlex (Siglip2Model) or CLIP; its config.json's model type picks the class."})
    vision_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained vision backbone (any HF vision model) for a new dual encoder."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained text tower for a new dual encoder (else a new text tower): a SigLIP checkpoint's, or any "
                "HF text encoder (BERT, RoBERTa, XLM-R, MiniLM: AutoModel), which makes a VisionTextDualEncoderModel "
                "with new linear projections, its tokenizer and the attention mask (hf_siglip.dual_encoders)."})
    text_pooling: str = field(default="auto", metadata={
        "help": "How a non-SigLIP text tower's states become the text embedding: 'mean' (over the tokens the "
                "attention mask keeps), 'cls', 'pooler' (the tower's own pooler, as plain VisionTextDualEncoderModel), "
                "or 'auto': as the sentence-transformers pooling config beside the weights says (1_Pooling/), else "
                "mean; a VisionTextDualEncoder checkpoint keeps its config's (default pooler)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to use (else the checkpoint's, or one trained on the training captions)."})
    vocab_size: int = field(default=1000, metadata={"help": "New tokenizer: maximum vocabulary size."})
    hidden_size: int = field(default=128, metadata={"help": "New towers: width."})
    intermediate_size: int = field(default=256, metadata={"help": "New towers: MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "New towers: layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "New towers: attention heads."})
    patch_size: int = field(default=8, metadata={"help": "New vision tower: patch size."})
    image_size: int | None = field(default=None, metadata={
        "help": f"New vision tower: input size (demo: its image size; other data: {DEFAULT_IMAGE_SIZE}). "
                "With a checkpoint: unset keeps its size; another size resamples its position embeddings (bicubic, "
                "SigLIP / CLIP; a multiple of its patch size) and the saved model and processor take the new size "
                "(hf_siglip.resolution; recipe resolution_adaptation)."})
    bottleneck_dim: int | None = field(default=None, metadata={"help": "Bottleneck token embeddings K (None: off)."})
    logit_bias_init_value: float = field(default=-10.0, metadata={
        "help": "Initial b for new heads (also a CLIP checkpoint's, which has no bias)."})
    # LoRA through peft, with TRL's ModelConfig names (use_peft, lora_r, lora_alpha, lora_dropout,
    # lora_target_modules); lora_towers and merge_adapter are ours
    use_peft: bool = field(default=False, metadata={
        "help": "LoRA (peft) on a checkpoint (model_name_or_path): only the adapters train; the base weights, t and b "
                "stay as loaded. Saved: peft's adapter (adapter_model.safetensors, adapter_config.json) for "
                "PeftModel.from_pretrained on the base model; with merge_adapter also the merged native model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Linear layers given adapters, by name inside each tower's blocks (e.g. q_proj v_proj fc1), or "
                "'all-linear' (every linear layer of the towers). Default: the attention projections q_proj k_proj "
                "v_proj out_proj."})
    lora_towers: list[str] = field(default_factory=lambda: ["text", "vision"], metadata={
        "help": "Towers given adapters ('text', 'vision'); a tower left out stays frozen as loaded."})
    merge_adapter: bool = field(default=False, metadata={
        "help": "With use_peft: save the merged model (peft's merge_and_unload) in output_dir, loadable by plain "
                "transformers, and the adapter in output_dir/adapter. Without: output_dir holds the adapter."})


def _positive(name: str, value, allow_none: bool = False) -> list[str]:
    if value is None and allow_none:
        return []
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return [f"{name} must be a positive integer, got {value!r}"]
    return []


def _checkpoint_config(path: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what}={path!r} is not a model checkpoint folder or Hub id: {reason}") from None


def checkpoint_text_length(checkpoint: str) -> int | None:
    """The text length a checkpoint was trained with: its tokenizer's `model_max_length` (what `hf-siglip train`
    records, and what released SigLIP tokenizers hold), else its text tower's position count."""
    from transformers import AutoTokenizer

    try:
        length = AutoTokenizer.from_pretrained(checkpoint).model_max_length
    except (OSError, ValueError, TypeError):
        length = None
    if length is not None and 0 < length < 100_000:  # transformers' "unset" is a huge sentinel
        return int(length)
    config = _checkpoint_config(checkpoint, "checkpoint")
    text_config = getattr(config, "text_config", config)
    return getattr(text_config, "max_position_embeddings", None)


def validate_arguments(script_args: SiglipScriptArguments, model_args: SiglipModelArguments,
                       training_args) -> None:
    """Raise one `UsageError` listing every problem found in the configuration, before any data is loaded.

    Fills what the configuration leaves to be derived: `max_length` (from the checkpoint or the default) and
    `image_size` (from the checkpoint, the demo, or SigLIP's 224).
    """
    from ..errors import UsageError

    problems = configuration_problems(script_args, model_args, training_args)
    if problems:
        raise UsageError(problems)


def configuration_problems(script_args: SiglipScriptArguments | None, model_args: SiglipModelArguments | None,
                           training_args) -> list[str]:
    """Every problem of the configuration, one line each, without reading any data (a local folder's split names
    excepted); an argument group that could not be built (None) is skipped. Fills `max_length` and `image_size`
    as `validate_arguments` says."""
    problems = []
    if training_args is not None:
        problems += _training_problems(training_args)
    if script_args is not None:
        problems += _data_problems(script_args, training_args)
    if model_args is not None and training_args is not None and model_args.use_peft:
        from ..objectives import Objective, objective_class

        savers = [name for name in (training_args.objectives or {})
                  if objective_class(name).save_pretrained is not Objective.save_pretrained]
        if savers:  # e.g. a captioner holds the vision tower, which LoRA leaves as a base plus an adapter
            problems.append(f"use_peft saves an adapter, not the whole model that the {', '.join(savers)} "
                            "objective(s) save beside it: train without use_peft")
    if model_args is not None:
        for name in ("vocab_size",) + NEW_TOWER_SIZES:
            problems += _positive(name, getattr(model_args, name))
        problems += _positive("image_size", model_args.image_size, allow_none=True)
        if model_args.model_name_or_path and (model_args.vision_model_name_or_path
                                              or model_args.text_model_name_or_path):
            problems.append("model_name_or_path loads a whole dual encoder: drop vision_model_name_or_path / "
                            "text_model_name_or_path, or drop model_name_or_path to assemble one from towers")
        from ..dual_encoders import TEXT_POOLINGS

        if model_args.text_pooling not in ("auto", *TEXT_POOLINGS):
            problems.append(f"text_pooling is 'auto' or one of {list(TEXT_POOLINGS)}, got {model_args.text_pooling!r}")
        if model_args.num_attention_heads and _is_positive(model_args.num_attention_heads) and \
                model_args.hidden_size % model_args.num_attention_heads:
            problems.append(f"hidden_size ({model_args.hidden_size}) must be divisible by num_attention_heads "
                            f"({model_args.num_attention_heads})")
        for name in ("model_name_or_path", "vision_model_name_or_path", "text_model_name_or_path",
                     "tokenizer_name_or_path"):
            problems += [problem for problem in [missing_local_path(getattr(model_args, name), name)] if problem]
    if script_args is None or model_args is None or any(missing_local_path(getattr(model_args, name), name)
                                                        for name in ("model_name_or_path",
                                                                     "vision_model_name_or_path",
                                                                     "text_model_name_or_path")):
        return problems
    problems += _peft_problems(model_args)
    if model_args.model_name_or_path:
        _validate_checkpoint(script_args, model_args, problems)
    else:
        _validate_new_towers(script_args, model_args, problems)
    return problems


def _is_positive(value) -> bool:
    return not _positive("", value)


def _training_problems(training_args) -> list[str]:
    """Batch sizes, learning rate, epochs and steps: refused here rather than inside torch after the data and
    model are built."""
    import math

    problems = []
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        problems += _positive(name, getattr(training_args, name))
    rate = training_args.learning_rate
    # 0 is allowed: a run that only evaluates (and re-cards) a checkpoint through the training pipeline
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
        problems.append(f"learning_rate must be a number >= 0, got {rate!r}")
    epochs, steps = training_args.num_train_epochs, training_args.max_steps
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs >= 0):
        problems.append(f"num_train_epochs must be a number >= 0, got {epochs!r}")
    elif steps <= 0 and epochs <= 0:
        problems.append(f"nothing to train: num_train_epochs is {epochs!r} and max_steps is unset ({steps}); set "
                        "num_train_epochs > 0 or max_steps > 0")
    warmup = training_args.warmup_steps
    if isinstance(warmup, (int, float)) and warmup < 0:
        problems.append(f"warmup_steps must be >= 0 (a fraction of the steps when below 1), got {warmup!r}")
    return problems


def _data_problems(script_args, training_args) -> list[str]:
    problems = []
    for name in ("demo_train_size", "demo_test_size", "demo_image_size"):
        problems += _positive(name, getattr(script_args, name))
    for name in ("max_train_samples", "max_eval_samples", "max_length"):
        problems += _positive(name, getattr(script_args, name), allow_none=True)
    problems += [problem for problem in [missing_local_path(script_args.dataset, "dataset")] if problem]
    step_names = [name for name, _ in script_args.steps()]
    if training_args is not None:
        if "image_embedding_cache" in step_names and not training_args.lock_vision_tower:
            problems.append("the image_embedding_cache data step needs lock_vision_tower: a trained tower's "
                            "embeddings change")
        if training_args.concept_distillation_weight > 0 and "concept_targets" not in step_names:
            problems.append("concept_distillation_weight > 0 needs the concept_targets data step, which stores the "
                            "teacher's outputs per row (data_steps: [{concept_targets: {model: TEACHER}}])")
    if "image_embedding_cache" in step_names:
        from ..data.steps import DATA_STEPS

        after = step_names[step_names.index("image_embedding_cache") + 1:]
        readers = sorted({name for name, step in DATA_STEPS.items() if step.reads_images} - {"image_embedding_cache"})
        if any(DATA_STEPS[name].reads_images for name in after):
            problems.append(f"image_embedding_cache drops the images: steps that read them ({', '.join(readers)}) "
                            "must come before it")
    from ..data.image_preprocessing import RESIZE_BACKENDS

    if script_args.image_fast_path not in (*RESIZE_BACKENDS, None):
        problems.append(f"image_fast_path is one of {RESIZE_BACKENDS} or None, got {script_args.image_fast_path!r}")
    from ..data.shards import BAD_SHARDS

    if getattr(script_args, "bad_shards", "skip") not in BAD_SHARDS:
        problems.append(f"bad_shards is one of {BAD_SHARDS}, got {script_args.bad_shards!r}")
    from ..training.wise_ft import wise_ft_problems  # fine-tuning that does not forget

    problems += wise_ft_problems(script_args) + _positive("anchor_max_samples", script_args.anchor_max_samples,
                                                          allow_none=True)
    problems += _positive("itm_rerank_k", script_args.itm_rerank_k, allow_none=True)
    if script_args.itm_rerank_k and training_args is not None and "itm" not in (training_args.objectives or {}):
        problems.append("itm_rerank_k re-ranks with the ITM head that the itm objective trains: turn it on "
                        "(objectives: {itm: {...}}) or drop itm_rerank_k")
    problems += [problem for problem in [missing_local_path(script_args.anchor_dataset, "anchor_dataset")] if problem]
    for name in ("image_column", "caption_column", "train_split"):
        if not getattr(script_args, name):
            problems.append(f"{name} must be a non-empty string")
    if training_args is not None and script_args.dataset != DEMO and training_args.max_steps <= 0:
        from ..data.shards import is_shard_source

        if is_shard_source(script_args.dataset):
            problems.append(f"dataset {script_args.dataset} is tar shards, read as a stream of unknown length: set "
                            "max_steps (num_train_epochs cannot tell when to stop)")
    if not missing_local_path(script_args.dataset, "dataset"):
        problems += split_problems(script_args)
    return problems


def local_split_names(dataset: str) -> list[str] | None:
    """The split names of the demo or of a local imagefolder / save_to_disk folder, read from the folder layout
    (no data is read); None where that cannot tell (shards, files, Hub datasets)."""
    from pathlib import Path

    from ..data.loading import _is_saved_to_disk, _metadata_files
    from ..data.splits import split_name

    if dataset == DEMO:
        return ["test", "train"]
    path = Path(os.path.expanduser(str(dataset)))
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").exists():
        with open(path / "dataset_dict.json") as file:
            return sorted(json.load(file).get("splits", [])) or None
    if _is_saved_to_disk(path):
        return ["train"]
    files = _metadata_files(path)
    if not files:
        return None
    if any(file.parent == path for file in files):
        return ["train"]
    return sorted({split_name(file.parent.name) for file in files})


def split_problems(script_args) -> list[str]:
    """A train or evaluation split the dataset does not have (for the datasets whose split names the folder
    layout tells: `local_split_names`), with the splits there are."""
    from ..data.splits import split_name

    splits = local_split_names(script_args.dataset)
    if not splits:
        return []
    problems = []
    for flag in ("train_split", "eval_split"):
        name = getattr(script_args, flag)
        if not name or name == AUTO or split_name(name) in {split_name(split) for split in splits}:
            continue
        problems.append(f"{flag} {name!r}: {script_args.dataset} has no such split; its splits are {splits}")
    return problems


def _validate_checkpoint(script_args, model_args, problems: list[str]) -> None:
    from ..dual_encoders import LOADABLE_DUAL_ENCODER_TYPES

    try:
        config = _checkpoint_config(model_args.model_name_or_path, "model_name_or_path")
    except ValueError as error:
        problems.append(str(error))
        return
    if config.model_type not in LOADABLE_DUAL_ENCODER_TYPES:
        problems.append(f"model_name_or_path holds a checkpoint of model type '{config.model_type}'; hf-siglip "
                        f"trains the dual encoders {list(LOADABLE_DUAL_ENCODER_TYPES)}")
        return
    text_config = getattr(config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if script_args.max_length is None:
        script_args.max_length = checkpoint_text_length(model_args.model_name_or_path) or DEFAULT_MAX_LENGTH
    if positions is not None and script_args.max_length > positions:
        problems.append(f"max_length {script_args.max_length} exceeds the checkpoint's text positions ({positions})")
    vision_size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if model_args.image_size is not None and config.model_type == "siglip2":
        logger.warning("image_size %s is ignored: SigLIP 2 NaFlex resizes its position embeddings to each image (its "
                       "processor's max_num_patches sets the resolution)", model_args.image_size)
        model_args.image_size = None
    if model_args.image_size is not None and model_args.image_size != vision_size and \
            _is_positive(model_args.image_size):
        from ..resolution import resolution_problem

        problem = resolution_problem(config, model_args.image_size)
        if problem:
            problems.append(problem)
        else:  # for the start-up summary
            model_args.image_size_source = (f"set by --image_size; the checkpoint's {vision_size} x {vision_size} "
                                            "position embeddings resampled")
    if model_args.bottleneck_dim is not None:
        problems.append("bottleneck_dim applies to a new text tower; for a checkpoint use `hf-siglip convert`")
    if model_args.text_pooling != "auto" and config.model_type != "vision-text-dual-encoder":
        problems.append(f"text_pooling applies to a VisionTextDualEncoder checkpoint or a pretrained non-SigLIP text "
                        f"tower; model_name_or_path is a '{config.model_type}' checkpoint")


def _peft_problems(model_args) -> list[str]:
    """LoRA settings (hf_siglip.lora), checked before any data or weights are read."""
    if not model_args.use_peft:
        return ["merge_adapter merges a LoRA adapter: set use_peft too"] if model_args.merge_adapter else []
    import importlib.util

    from ..dual_encoders import TOWERS

    problems = []
    if importlib.util.find_spec("peft") is None:
        problems.append("use_peft needs the peft package: pip install 'hf-siglip[peft]'")
    if not model_args.model_name_or_path:
        problems.append("use_peft adapts a checkpoint: set model_name_or_path (new towers train in full)")
    problems += _positive("lora_r", model_args.lora_r)
    if not (isinstance(model_args.lora_alpha, (int, float)) and model_args.lora_alpha > 0):
        problems.append(f"lora_alpha must be > 0, got {model_args.lora_alpha!r}")
    if not 0.0 <= model_args.lora_dropout < 1.0:
        problems.append(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout!r}")
    towers = list(model_args.lora_towers or [])
    if not towers or set(towers) - set(TOWERS):
        problems.append(f"lora_towers must name one or both of {list(TOWERS)}, got {towers}")
    if model_args.lora_target_modules is not None and not model_args.lora_target_modules:
        problems.append("lora_target_modules is empty: name the linear layers to adapt, or 'all-linear'")
    return problems


def _text_tower_problems(text_config, script_args, model_args, problems: list[str]) -> None:
    """A pretrained text tower: a non-SigLIP one (BERT-like) takes no bottleneck and pools as text_pooling says; the
    text length must fit its positions."""
    from ..dual_encoders import SIGLIP_TEXT_MODEL_TYPES

    siglip = text_config.model_type in SIGLIP_TEXT_MODEL_TYPES
    if siglip and model_args.text_pooling != "auto":
        problems.append("text_pooling applies to a non-SigLIP text tower; a SigLIP tower pools its last position")
    if not siglip and model_args.bottleneck_dim is not None:
        problems.append(f"bottleneck_dim applies to a SigLIP text tower; text_model_name_or_path is a "
                        f"'{text_config.model_type}' model")
    positions = getattr(getattr(text_config, "text_config", text_config), "max_position_embeddings", None)
    if isinstance(positions, int) and script_args.max_length > positions:
        problems.append(f"max_length {script_args.max_length} exceeds the text tower's positions ({positions})")


def _validate_new_towers(script_args, model_args, problems: list[str]) -> None:
    if script_args.max_length is None:
        script_args.max_length = DEFAULT_MAX_LENGTH
    if model_args.image_size is None and not model_args.vision_model_name_or_path:
        if script_args.dataset == DEMO:
            model_args.image_size = script_args.demo_image_size
            model_args.image_size_source = "the demo's image size"  # for the start-up summary
        else:
            model_args.image_size = DEFAULT_IMAGE_SIZE
            model_args.image_size_source = f"SigLIP's {DEFAULT_IMAGE_SIZE} for a new vision tower: --image_size unset"
            logger.info("image_size not set: the new vision tower takes %d x %d images", DEFAULT_IMAGE_SIZE,
                        DEFAULT_IMAGE_SIZE)
    image_size, patch_size = model_args.image_size, model_args.patch_size
    if not model_args.vision_model_name_or_path and _is_positive(image_size) and _is_positive(patch_size):
        if patch_size > image_size:
            problems.append(f"patch_size {patch_size} is larger than image_size {image_size}: the image would "
                            "hold no patch")
        elif image_size % patch_size:
            seen = image_size // patch_size * patch_size
            problems.append(f"image_size {image_size} is not a multiple of patch_size {patch_size}: the tower would "
                            f"see only {seen} x {seen} pixels of each image; choose an image_size that patch_size "
                            "divides")
    hidden_size = model_args.hidden_size
    if model_args.text_model_name_or_path:
        try:
            text_config = _checkpoint_config(model_args.text_model_name_or_path, "text_model_name_or_path")
            hidden_size = getattr(getattr(text_config, "text_config", text_config), "hidden_size", hidden_size)
            _text_tower_problems(text_config, script_args, model_args, problems)
        except ValueError as error:
            problems.append(str(error))
    elif model_args.text_pooling != "auto":
        problems.append("text_pooling applies to a pretrained non-SigLIP text tower (text_model_name_or_path)")
    if model_args.bottleneck_dim is not None and not 0 < model_args.bottleneck_dim < hidden_size:
        problems.append(f"bottleneck_dim must satisfy 0 < bottleneck_dim < hidden_size (= {hidden_size}), got "
                        f"{model_args.bottleneck_dim}; unset it for a plain token table")


__all__ = ["DEMO", "DEMO_TRAINING_DEFAULTS", "SiglipModelArguments", "SiglipScriptArguments", "checkpoint_text_length",
           "configuration_problems", "local_split_names", "split_problems", "validate_arguments"]
