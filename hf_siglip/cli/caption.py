"""`hf-siglip caption`: generate a caption for each held-out image with a trained captioner and score them.

The captioner is the folder the captioning objective saves beside the dual encoder (`output_dir/captioner/`: a
`VisionEncoderDecoderModel` with its tokenizer and image processor, loadable by plain transformers); `--checkpoint`
names the training output folder (or the captioner folder itself). The data arguments default to what the run was
evaluated on (`hf_siglip_eval.json`, as `hf-siglip eval`). It writes every generated caption with its references to
`captions.jsonl` and BLEU-1..4 and CIDEr-D (`hf_siglip.metrics`, through `evaluate`) to `caption_metrics.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..captioner import captioner_folder, generate_captions
from ..data.text import normalize_captions
from ..errors import UsageError, own_messages_as_usage_errors
from .eval_record import EVAL_RECORD_NAME, EvaluationDataError
from .evaluate import SiglipEvalArguments, resolve_eval_arguments
from .startup import quiet_local_loading
from .train import load_named_splits, usable_rows

CAPTIONS_FILE = "captions.jsonl"
METRICS_FILE = "caption_metrics.json"


@dataclass
class SiglipCaptionArguments(SiglipEvalArguments):
    """`hf-siglip eval`'s data arguments plus how to generate."""

    num_beams: int = field(default=1, metadata={"help": "Beam width (1: greedy decoding)."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Longest caption in tokens. Default: the captioner's generation config (its training length)."})
    caption_batch_size: int = field(default=32, metadata={"help": "Images per generate() call."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where captions.jsonl and caption_metrics.json go. Default: CHECKPOINT/captions."})


def score_captions(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D as `caption_*` metrics, through the package's `evaluate` modules."""
    from ..metrics import load_metric

    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise UsageError("scoring captions needs the COCO caption scorers: "
                         "pip install 'hf_siglip[captioning]'") from None
    scores = {**load_metric("caption_bleu").compute(predictions=predictions, references=references),
              **load_metric("caption_cider").compute(predictions=predictions, references=references)}
    return {f"caption_{name}": value for name, value in scores.items()}


def caption_evaluation(folder: str, evaluation, num_beams: int = 1, max_new_tokens: int | None = None,
                       batch_size: int = 32) -> tuple[dict, list[dict]]:
    """Caption every usable row of `evaluation` (canonical columns) and score against its captions:
    `(metrics, rows)`, each row `{row, image_id, generated, references}`."""
    kept, dropped = usable_rows(evaluation)
    if not kept:
        raise EvaluationDataError(f"no row of the evaluation split has a decodable image and a caption: {dropped}")
    evaluation = evaluation.select(kept)
    references = [normalize_captions(cell, row)[0] for row, cell in enumerate(evaluation["caption"])]
    generated = generate_captions(folder, evaluation["image"], num_beams, max_new_tokens, batch_size)
    metrics = {**score_captions(generated, references), "caption_images": len(generated),
               **{f"caption_dropped/{reason}": count for reason, count in dropped.items() if count}}
    rows = [{"row": row, "image_id": image_id, "generated": text, "references": refs}
            for row, image_id, text, refs in zip(kept, evaluation["image_id"], generated, references)]
    return metrics, rows


def write_captions(output_dir: str, metrics: dict, rows: list[dict]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CAPTIONS_FILE), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(output_dir, METRICS_FILE), "w") as handle:
        json.dump(metrics, handle, indent=1)


def caption_problems(args: SiglipCaptionArguments) -> list[str]:
    from .arguments import _positive
    from .evaluate import eval_problems

    problems = eval_problems(args)
    for name in ("num_beams", "caption_batch_size"):
        problems += _positive(name, getattr(args, name))
    problems += _positive("max_new_tokens", args.max_new_tokens, allow_none=True)
    return problems


def run_caption(args: SiglipCaptionArguments) -> tuple[dict, list[dict]]:
    """Caption the evaluation split of `args` (its data settings from the run's record where unset)."""
    folder = captioner_folder(args.checkpoint)
    if folder == args.checkpoint and not os.path.isfile(os.path.join(folder, EVAL_RECORD_NAME)):
        parent = os.path.dirname(os.path.normpath(folder))  # a captioner folder: the run's record is beside it
        if os.path.isfile(os.path.join(parent, EVAL_RECORD_NAME)):
            args.checkpoint = parent
    with own_messages_as_usage_errors():
        args.evaluated_from = resolve_eval_arguments(args)
    with own_messages_as_usage_errors(), quiet_local_loading(args.dataset):
        _, evaluation, args.eval_split = load_named_splits(args)
    if evaluation is None:
        raise EvaluationDataError(f"{args.dataset} has no evaluation split: name one with --eval_split.")
    metrics, rows = caption_evaluation(folder, evaluation, args.num_beams, args.max_new_tokens,
                                       args.caption_batch_size)
    args.captioner = folder
    return metrics, rows


__all__ = ["SiglipCaptionArguments", "caption_evaluation", "captioner_folder", "generate_captions", "run_caption",
           "score_captions", "write_captions"]
