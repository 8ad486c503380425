"""The package's metrics as local `evaluate` modules: they load offline, from the installed package.

    from hf_siglip.metrics import load_metric
    recall = load_metric("retrieval_recall")
    recall.compute(image_embeds=..., image_ids=..., text_embeds=..., text_ids=...)

`retrieval_recall` and `zero_shot_accuracy` count ties as the expected hit under a random order of the tied
candidates (`hf_siglip.evaluation`, the numbers training and `hf-siglip eval` report); `caption_bleu` (BLEU-1..4) and
`caption_cider` (CIDEr-D) score generated captions against each image's reference captions with the COCO caption
evaluation's scorers (`pycocoevalcap`, the `captioning` extra) on lower-cased word tokens.
"""

from pathlib import Path

METRICS = ("retrieval_recall", "zero_shot_accuracy", "caption_bleu", "caption_cider")


def metric_path(name: str) -> str:
    """The path of the metric's `evaluate` script (what `evaluate.load` takes)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the package's metrics are {list(METRICS)}")
    return str(Path(__file__).with_name(f"{name}.py"))


def load_metric(name: str, **kwargs):
    """`evaluate.load` of one of the package's metrics, offline."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
