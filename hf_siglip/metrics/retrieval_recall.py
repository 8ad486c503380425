"""Image-text retrieval recall@k both ways, ties counted as the expected hit (an `evaluate` module of hf_siglip)."""

import datasets
import evaluate
import torch

_DESCRIPTION = """Recall@k image->text and text->image. Text j matches image i iff their ids are equal (k captions per
image, duplicates and groups share an id). A query whose best match ties with non-matching candidates counts the
probability of a hit under a random order of the tied candidates, so constant embeddings score chance, not 1."""
_KWARGS_DESCRIPTION = """
Args:
    image_embeds: one embedding per image (the features, one row per image).
    image_ids: one id per image.
    text_embeds: one embedding per text (a keyword argument of `compute`).
    text_ids: one id per text (a keyword argument of `compute`).
    ks: the k of recall@k (default 1, 5, 10).
Returns:
    i2t_recall@k, t2i_recall@k for each k, *_unmatched, *_queries_with_ties.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"image_embeds": datasets.Sequence(datasets.Value("float32")),
                                        "image_ids": datasets.Value("int64")}))

    def _compute(self, image_embeds, image_ids, text_embeds=None, text_ids=None, ks=(1, 5, 10)):
        from hf_siglip.evaluation import retrieval_metrics

        if text_embeds is None or text_ids is None:
            raise ValueError("retrieval_recall needs text_embeds and text_ids (keyword arguments of compute)")
        return retrieval_metrics(torch.as_tensor(image_embeds, dtype=torch.float32),
                                 torch.as_tensor(text_embeds, dtype=torch.float32),
                                 torch.as_tensor(image_ids), torch.as_tensor(text_ids), ks=tuple(ks))
