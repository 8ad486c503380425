"""Zero-shot top-k accuracy, ties counted as the expected hit (an `evaluate` module of hf_siglip)."""

import datasets
import evaluate
import torch

_DESCRIPTION = """Top-k accuracy of classifying each image by its most similar class embedding (a zero-shot
classifier: the mean normalised text embedding of each class's prompts). A tie between the label and other classes
counts as the chance of winning it under a random order, so constant embeddings score chance."""
_KWARGS_DESCRIPTION = """
Args:
    image_embeds: one embedding per image.
    labels: the class index of each image.
    class_embeds: one embedding per class (a keyword argument of `compute`).
    ks: the k of top-k (default 1, 5).
Returns:
    zero_shot_top{k} for each k that is at most the number of classes, and zero_shot_ties.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"image_embeds": datasets.Sequence(datasets.Value("float32")),
                                        "labels": datasets.Value("int64")}))

    def _compute(self, image_embeds, labels, class_embeds=None, ks=(1, 5)):
        from hf_siglip.evaluation import zero_shot_metrics

        if class_embeds is None:
            raise ValueError("zero_shot_accuracy needs class_embeds (a keyword argument of compute)")
        return zero_shot_metrics(torch.as_tensor(image_embeds, dtype=torch.float32), torch.as_tensor(labels),
                                 torch.as_tensor(class_embeds, dtype=torch.float32), ks=tuple(ks))
