"""BLEU-1..4 of generated captions against reference captions, with the COCO caption evaluation's scorer (an
`evaluate` module of hf_siglip)."""

import datasets
import evaluate

_DESCRIPTION = """Corpus BLEU-1 to BLEU-4 (Papineni et al. 2002) as the COCO caption evaluation computes it
(pycocoevalcap's Bleu scorer: clipped n-gram precision over the corpus, brevity penalty from the closest reference
length). Captions are lower-cased and split into word tokens first (pycocoevalcap's own PTB tokenizer needs Java)."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: one generated caption per image.
    references: the reference captions of each image (one or more).
Returns:
    bleu1, bleu2, bleu3, bleu4.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        from pycocoevalcap.bleu.bleu import Bleu

        from hf_siglip.metrics.coco import coco_inputs

        scores, _ = Bleu(4).compute_score(*coco_inputs(predictions, references), verbose=0)
        return {f"bleu{n}": float(score) for n, score in enumerate(scores, 1)}
