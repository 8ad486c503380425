"""`hf-siglip eval`: retrieval recall@k, zero-shot top-1/5 and a few-shot linear probe for a checkpoint."""

from dataclasses import dataclass, field

import torch

from ..data.demo import DEMO_CLASSES, DEMO_TEMPLATES
from ..data.embedding import embed_images, embed_texts
from ..data.images import decode_decodable
from ..data.text import normalize_captions
from ..evaluation import (
    few_shot_indices,
    linear_probe,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_metrics,
)
from .arguments import DEFAULT_MAX_LENGTH, DEMO, SiglipScriptArguments, checkpoint_text_length
from .train import load_splits


@dataclass
class SiglipEvalArguments(SiglipScriptArguments):
    """Data arguments of `hf-siglip train` plus what to evaluate."""

    checkpoint: str = field(default="outputs/siglip-demo", metadata={"help": "Checkpoint folder (or Hub id)."})
    few_shot: int | None = field(default=None, metadata={
        "help": "k examples per class from the training split for a linear probe (None: no probe)."})
    probe_from_zero_shot: bool = field(default=True, metadata={
        "help": "Initialise the linear probe from the zero-shot classifier (DiHT)."})
    output_file: str | None = field(default=None, metadata={"help": "Write the metrics as JSON here."})


def usable_rows(evaluation, args) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows with a decodable image and at least one caption; the others are counted by reason."""
    _, decodable = decode_decodable(evaluation[args.image_column])
    decodable = set(decodable)
    kept, dropped = [], {"rows_with_undecodable_image": 0, "rows_without_caption": 0}
    for row, cell in enumerate(evaluation[args.caption_column]):
        if row not in decodable:
            dropped["rows_with_undecodable_image"] += 1
        elif not normalize_captions(cell, row)[0]:
            dropped["rows_without_caption"] += 1
        else:
            kept.append(row)
    return kept, dropped


def run_eval(args: SiglipEvalArguments) -> dict[str, float]:
    """Metrics of `args.checkpoint` on the evaluation split. Texts are padded to the length the checkpoint was
    trained with (its tokenizer's `model_max_length`) unless `--max_length` says otherwise: SigLIP pools the last
    position, so another length changes every text embedding. Dropped rows are counted in `dropped/<reason>`."""
    from transformers import AutoModel, AutoProcessor

    if args.max_length is None:
        args.max_length = checkpoint_text_length(args.checkpoint) or DEFAULT_MAX_LENGTH
    model = AutoModel.from_pretrained(args.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    train, evaluation = load_splits(args)
    if evaluation is None:
        raise ValueError(f"{args.dataset} has no evaluation split: name one with --eval_split.")
    kept, dropped = usable_rows(evaluation, args)
    if not kept:
        raise ValueError(f"no row of the evaluation split has a decodable image and a caption: {dropped}")
    evaluation = evaluation.select(kept)

    image_embeds = embed_images(model, processor, evaluation[args.image_column])
    texts, text_ids = [], []
    for row, (image_id, cell) in enumerate(zip(evaluation["image_id"], evaluation[args.caption_column])):
        captions = normalize_captions(cell, row)[0]
        texts += captions
        text_ids += [image_id] * len(captions)
    text_embeds = embed_texts(model, processor, texts, max_length=args.max_length)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor(evaluation["image_id"]), torch.tensor(text_ids))
    metrics["max_length"] = args.max_length
    metrics.update({f"dropped/{reason}": count for reason, count in dropped.items()})

    classes = args.zero_shot_classes or (DEMO_CLASSES if args.dataset == DEMO else None)
    if classes and args.label_column in evaluation.column_names:
        templates = args.zero_shot_templates or DEMO_TEMPLATES
        classifier = zero_shot_classifier(model, processor, classes, templates, max_length=args.max_length)
        labels = torch.tensor(evaluation[args.label_column])
        metrics.update(zero_shot_metrics(image_embeds, labels, classifier))
        if args.few_shot:
            chosen = few_shot_indices(train[args.label_column], args.few_shot, seed=args.few_shot)
            shots = train.select(chosen)
            probe = linear_probe(
                embed_images(model, processor, shots[args.image_column]),
                torch.tensor(shots[args.label_column]), image_embeds, labels, n_classes=len(classes),
                init_classifier=classifier if args.probe_from_zero_shot else None)
            metrics.update({f"{name}_{args.few_shot}shot": value for name, value in probe.items()})
    return metrics


__all__ = ["SiglipEvalArguments", "run_eval"]
