"""The inputs the COCO caption scorers (pycocoevalcap) take, from plain lists of captions."""

import re

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_tokens(caption: str) -> str:
    """Lower-cased word tokens joined by spaces (punctuation dropped), as the COCO evaluation's tokenizer leaves a
    caption for its scorers."""
    return " ".join(_WORD.findall(caption.lower()))


def coco_inputs(predictions, references) -> tuple[dict, dict]:
    """`(references by image, prediction by image)` for `compute_score`: one list of references and a one-element
    list of the prediction per image, keyed by position."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    empty = [index for index, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"image(s) {empty[:5]} have no reference caption")
    gts = {index: [caption_tokens(ref) for ref in refs] for index, refs in enumerate(references)}
    res = {index: [caption_tokens(prediction)] for index, prediction in enumerate(predictions)}
    return gts, res
