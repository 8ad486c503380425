"""`hf-siglip eval`: retrieval recall@k, zero-shot top-1/5 and a few-shot linear probe for a checkpoint.

By default it evaluates on what the checkpoint was trained and evaluated with: the dataset, evaluation split,
columns, text length and zero-shot classes and templates that `hf-siglip train` records in `hf_siglip_eval.json`
(:mod:`hf_siglip.cli.eval_record`); flags override them one by one. A checkpoint without that file (a native
transformers model, say) needs `--dataset`. The images are decoded in full and prepared by the checkpoint's processor,
as the trainer's evaluation does, so both give the same numbers on the same weights.
"""

from dataclasses import dataclass, field, fields

import torch

from ..data.demo import DEMO_TEMPLATES
from ..data.embedding import embed_images, embed_texts
from ..data.text import normalize_captions
from ..dual_encoders import as_dual_encoder
from ..errors import UsageError, error_message, own_messages_as_usage_errors
from ..evaluation import few_shot_indices, linear_probe, retrieval_metrics, zero_shot_classifier
from ..training.finite import check_finite_weights
from .arguments import DEFAULT_MAX_LENGTH, SiglipScriptArguments, checkpoint_text_length
from .eval_record import EVAL_RECORD_NAME, EvaluationDataError, apply_evaluation_record, read_evaluation_record
from .startup import quiet_local_loading
from .train import load_named_splits, usable_rows, zero_shot_classes, zero_shot_evaluation

_FROM_RECORD = f"Default: what the checkpoint's {EVAL_RECORD_NAME} records, else "


@dataclass
class SiglipEvalArguments(SiglipScriptArguments):
    """Data arguments of `hf-siglip train` plus what to evaluate. The data fields left unset (None) come from the
    checkpoint's `hf_siglip_eval.json`, else take `hf-siglip train`'s defaults (`dataset` has none: a checkpoint
    without the record needs `--dataset`)."""

    dataset: str | None = field(default=None, metadata={
        "help": f"{_FROM_RECORD}required. Anything `hf-siglip train --dataset` takes ('demo', a folder, shards...)."})
    train_split: str | None = field(default=None, metadata={"help": f"{_FROM_RECORD}'train' (few-shot probe)."})
    eval_split: str | None = field(default=None, metadata={
        "help": f"{_FROM_RECORD}'auto' ('test', else 'validation')."})
    image_column: str | None = field(default=None, metadata={"help": f"{_FROM_RECORD}'image'."})
    caption_column: str | None = field(default=None, metadata={"help": f"{_FROM_RECORD}'caption'."})
    label_column: str | None = field(default=None, metadata={"help": f"{_FROM_RECORD}'label'."})
    demo_train_size: int | None = field(default=None, metadata={"help": f"{_FROM_RECORD}4000 (demo only)."})
    demo_test_size: int | None = field(default=None, metadata={"help": f"{_FROM_RECORD}500 (demo only)."})
    demo_image_size: int | None = field(default=None, metadata={"help": f"{_FROM_RECORD}32 (demo only)."})
    checkpoint: str = field(default="outputs/siglip-demo", metadata={"help": "Checkpoint folder (or Hub id)."})
    few_shot: int | None = field(default=None, metadata={
        "help": "k examples per class from the training split for a linear probe (None: no probe)."})
    probe_from_zero_shot: bool = field(default=True, metadata={
        "help": "Initialise the linear probe from the zero-shot classifier (DiHT)."})
    output_file: str | None = field(default=None, metadata={"help": "Write the metrics as JSON here."})


def eval_problems(args: SiglipEvalArguments) -> list[str]:
    """Problems of the flags that need no data: a local-looking checkpoint or dataset path that does not exist
    (said at once, not after the Hub's retries), counts that are not positive."""
    import os

    from ..paths import missing_local_path
    from .arguments import _positive

    problems = [problem for problem in (missing_local_path(args.checkpoint, "checkpoint"),
                                        missing_local_path(args.dataset, "dataset")) if problem]
    default = next(f.default for f in fields(SiglipEvalArguments) if f.name == "checkpoint")
    if args.checkpoint == default and not os.path.isdir(default) and not problems:
        problems.append(f"checkpoint {default}: no such folder (the default, where `hf-siglip train` saves the demo "
                        "model); name one with --checkpoint")
    for name in ("few_shot", "max_length", "max_eval_samples", "max_train_samples", "anchor_max_samples",
                 "itm_rerank_k"):
        problems += _positive(name, getattr(args, name), allow_none=True)
    if getattr(args, "itm_rerank_k", None) and os.path.isdir(args.checkpoint):
        from ..objectives.fusion import FOLDER, ITM_HEAD_FILE

        if not os.path.isfile(os.path.join(args.checkpoint, FOLDER, ITM_HEAD_FILE)):
            problems.append(f"itm_rerank_k: checkpoint {args.checkpoint} has no {FOLDER}/{ITM_HEAD_FILE} (train "
                            "with the itm objective to re-rank with its head)")
    problems += [problem for problem in [missing_local_path(args.anchor_dataset, "anchor_dataset")] if problem]
    if args.wise_ft_alphas is not None:
        problems.append("wise_ft_alphas is a `hf-siglip train` setting (the sweep mixes a run's start and end); "
                        "evaluate each saved folder instead")
    return problems


def resolve_eval_arguments(args: SiglipEvalArguments) -> str:
    """Fill the unset data fields of `args` from the checkpoint's record, then `hf-siglip train`'s defaults, and the
    text length from the record, else the checkpoint's tokenizer; returns where the settings came from."""
    source = apply_evaluation_record(args, read_evaluation_record(args.checkpoint), SiglipScriptArguments())
    if args.max_length is None:
        args.max_length = checkpoint_text_length(args.checkpoint) or DEFAULT_MAX_LENGTH
    return source


def run_eval(args: SiglipEvalArguments) -> dict[str, float]:
    """Metrics of `args.checkpoint` on the evaluation split (by default the one recorded at training: see the
    module docstring; `args` is filled in place, `args.eval_split` with the split's name). Texts are padded to the
    length the checkpoint was trained with unless `--max_length` says otherwise: SigLIP pools the last position, so
    another length changes every text embedding. Dropped rows are counted in `dropped/<reason>`; `images`, `texts`
    (captions) and `zero_shot_classes` count what was evaluated."""
    from transformers import AutoModel, AutoProcessor

    with own_messages_as_usage_errors():  # a checkpoint neither here nor on the Hub: one line
        args.evaluated_from = resolve_eval_arguments(args)
    try:
        # the adapter pools a VisionTextDualEncoder's text as it was trained (config.json's text_pooling)
        model = as_dual_encoder(AutoModel.from_pretrained(args.checkpoint)).eval()
    except OSError as error:  # neither a model folder nor a model on the Hub
        raise UsageError(f"checkpoint {args.checkpoint}: {error_message(error).splitlines()[0]}") from error
    check_finite_weights(model, args.checkpoint, "not evaluated")  # corrupt weights: refused, naming file and tensor
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    # a missing split or column, a malformed metadata line: one line; a local folder: no progress bars
    with own_messages_as_usage_errors(), quiet_local_loading(args.dataset):
        train, evaluation, args.eval_split = load_named_splits(args)
    if evaluation is None:
        raise EvaluationDataError(f"{args.dataset} has no evaluation split: name one with --eval_split.")
    kept, dropped = usable_rows(evaluation)
    if not kept:
        raise EvaluationDataError(f"no row of the evaluation split has a decodable image and a caption: {dropped}")
    evaluation = evaluation.select(kept)

    image_embeds = embed_images(model, processor, evaluation["image"])
    texts, text_ids = captions_and_ids(evaluation)
    text_embeds = embed_texts(model, processor, texts, max_length=args.max_length)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor(evaluation["image_id"]), torch.tensor(text_ids))
    metrics.update(images=len(evaluation), texts=len(texts), max_length=args.max_length)
    if args.itm_rerank_k:  # ALBEF / BLIP: the embeddings' top k re-scored by the ITM head
        metrics.update(itm_rerank_evaluation(args.checkpoint, evaluation["image"], texts, image_embeds, text_embeds,
                                             torch.tensor(evaluation["image_id"]), torch.tensor(text_ids),
                                             args.itm_rerank_k, args.max_length))
    metrics.update({f"dropped/{reason}": count for reason, count in dropped.items()})

    zero_shot = zero_shot_evaluation(model, processor, evaluation, args, image_embeds=image_embeds)
    metrics.update({"zero_shot_classes": 0, **zero_shot})
    if zero_shot and args.few_shot:
        classes = zero_shot_classes(args)
        classifier = zero_shot_classifier(model, processor, classes, args.zero_shot_templates or DEMO_TEMPLATES,
                                          max_length=args.max_length)
        chosen = few_shot_indices(train[args.label_column], args.few_shot, seed=args.few_shot)
        shots = train.select(chosen)
        probe = linear_probe(
            embed_images(model, processor, shots["image"]), torch.tensor(shots[args.label_column]), image_embeds,
            torch.tensor(evaluation[args.label_column]), n_classes=len(classes),
            init_classifier=classifier if args.probe_from_zero_shot else None)
        metrics.update({f"{name}_{args.few_shot}shot": value for name, value in probe.items()})
    if args.anchor_dataset:  # as `hf-siglip train --anchor_dataset` logs it: anchor_zero_shot_top1...
        from .anchor import AnchorEvaluation

        with own_messages_as_usage_errors(), quiet_local_loading(args.anchor_dataset):
            anchor = AnchorEvaluation(args, processor)
        metrics.update(anchor(model))
    return metrics


def captions_and_ids(evaluation) -> tuple[list[str], list[int]]:
    """Every caption of the rows, in row order, with its row's image id."""
    texts, text_ids = [], []
    for row, (image_id, cell) in enumerate(zip(evaluation["image_id"], evaluation["caption"])):
        captions = normalize_captions(cell, row)[0]
        texts += captions
        text_ids += [image_id] * len(captions)
    return texts, text_ids


def itm_rerank_of_checkpoint(checkpoint: str, evaluation, rerank_k: int, max_length: int) -> dict[str, float]:
    """ITM re-ranked recall of the model saved in `checkpoint` on `evaluation`'s usable rows, as `hf-siglip eval
    --itm_rerank_k` computes it (`hf-siglip train --itm_rerank_k` calls it on its output folder)."""
    from transformers import AutoModel, AutoProcessor

    model = as_dual_encoder(AutoModel.from_pretrained(checkpoint)).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    evaluation = evaluation.select(usable_rows(evaluation)[0])
    texts, text_ids = captions_and_ids(evaluation)
    image_embeds = embed_images(model, processor, evaluation["image"])
    text_embeds = embed_texts(model, processor, texts, max_length=max_length)
    return itm_rerank_evaluation(checkpoint, evaluation["image"], texts, image_embeds, text_embeds,
                                 torch.tensor(evaluation["image_id"]), torch.tensor(text_ids), rerank_k, max_length)


def itm_rerank_evaluation(checkpoint: str, images, texts: list[str], image_embeds, text_embeds, image_ids, text_ids,
                          rerank_k: int, max_length: int, seed: int = 0) -> dict[str, float]:
    """`hf_siglip.itm_scoring.itm_rerank_metrics` with the ITM head saved in `checkpoint`, on the same similarity
    (`tie_exact_scores`) and positives (ids) as `retrieval_metrics`."""
    from ..evaluation import tie_exact_scores
    from ..itm_scoring import ItmPairScorer, itm_rerank_metrics
    from ..positives import positive_pairs

    with own_messages_as_usage_errors():
        scorer = ItmPairScorer(checkpoint, max_length=max_length)
    return itm_rerank_metrics(scorer, images, texts, tie_exact_scores(image_embeds, text_embeds),
                              positive_pairs(image_ids, text_ids), rerank_k, seed=seed)


def evaluation_summary(args: SiglipEvalArguments, metrics: dict) -> str:
    """One line saying what `run_eval` evaluated on (after it ran: `args` holds the resolved settings)."""
    classes = int(metrics.get("zero_shot_classes", 0))
    return (f"Evaluated {args.checkpoint} on {args.dataset}, split '{args.eval_split}': {int(metrics['images']):,} "
            f"images, {int(metrics['texts']):,} captions, "
            + (f"{classes} zero-shot classes" if classes else "no zero-shot classes")
            + f" (settings from {getattr(args, 'evaluated_from', 'flags')})")


__all__ = ["SiglipEvalArguments", "captions_and_ids", "eval_problems", "evaluation_summary",
           "itm_rerank_evaluation", "itm_rerank_of_checkpoint", "resolve_eval_arguments", "run_eval"]
