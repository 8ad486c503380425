"""CIDEr-D of generated captions against reference captions, with the COCO caption evaluation's scorer (an
`evaluate` module of hf_siglip)."""

import datasets
import evaluate

_DESCRIPTION = """CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it (pycocoevalcap's Cider
scorer: TF-IDF weighted n-gram cosine, n = 1..4, Gaussian length penalty, clipping, x10). Its document frequencies
come from the references given, so scores are comparable only on the same reference set. Captions are lower-cased
and split into word tokens first."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: one generated caption per image.
    references: the reference captions of each image (one or more).
Returns:
    cider.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionCider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        from pycocoevalcap.cider.cider import Cider

        from hf_siglip.metrics.coco import coco_inputs

        score, _ = Cider().compute_score(*coco_inputs(predictions, references))
        return {"cider": float(score)}
