"""Evaluation that papers report, computed from embeddings.

- `retrieval_metrics`: image-text recall@k both ways with several captions per image (Flickr30k / MSCOCO
  protocol: image->text is a hit if any of the image's captions is in the top k).
- `zero_shot_classifier` + `zero_shot_metrics`: template-averaged class embeddings, top-1 / top-5.
- `linear_probe`: few-shot (k per class) logistic regression, optionally initialised from the zero-shot
  classifier (DiHT).
Batched, L2-normalised embeddings come from `hf_siglip.data.embedding` (also home of `add_image_embeddings`,
the SigLiT embedding cache).

Ties are neither hits nor misses: a query scores the expected hit under a random order of the tied candidates
(decision 12 in docs/ARCHITECTURE.md), so a collapsed model gets chance, and NaN embeddings raise instead of scoring.
Everything returns plain dicts of floats; `to_json` writes them for papers' tables.
"""

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.embedding import embed_texts
from .positives import positive_pairs
from .training.finite import NonFiniteError, finite_or_none


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways. Text j matches image i iff their ids are equal (`hf_siglip.positives.positive_pairs`, the
    rule the loss uses; no mining at evaluation).

    image->text: an image scores a hit at k if any matching text is among its k most similar texts.
    text->image: a text scores a hit at k if any matching image is among its k most similar images.
    Ties are neither hits nor misses: each query counts the probability of a hit when tied candidates come in a
    random order (`expected_hits`), so a collapsed model (every score equal) gets chance recall, not 1.0, and a
    duplicate caption of another image ties with, rather than loses to, the image's own caption.
    `*_queries_with_ties`: queries whose best match ties with a non-matching candidate. Images or texts with no
    match are excluded from their direction (counted in `*_unmatched`). Non-finite embeddings raise ValueError.
    """
    check_finite_embeddings(image_embeds=image_embeds, text_embeds=text_embeds)
    similarity = tie_exact_scores(image_embeds, text_embeds)
    matches = positive_pairs(image_ids, text_ids)
    metrics = {}
    for prefix, scores, positives in (("i2t", similarity, matches), ("t2i", similarity.T, matches.T)):
        metrics.update(recall_at(scores, positives, ks, prefix))
        metrics[f"{prefix}_unmatched"] = int((~positives.any(dim=1)).sum())
    return metrics


def recall_at(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """`<prefix>_recall@k` of queries (rows of `scores`) ranking their candidates, tie-aware (`expected_hits`), and
    `<prefix>_queries_with_ties`; queries without a positive are left out (also used by ITM re-ranking)."""
    has_match = positives.any(dim=1)
    scores, positives = scores[has_match], positives[has_match]
    best_positive = scores.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
    hits, tied = expected_hits(scores, positives, best_positive, ks)
    metrics = {f"{prefix}_recall@{k}": hits[k].mean().item() if len(scores) else float("nan") for k in ks}
    metrics[f"{prefix}_queries_with_ties"] = int(tied.sum())
    return metrics


def check_finite_embeddings(**embeddings: torch.Tensor) -> None:
    """`NonFiniteError` (a ValueError) naming the embeddings that hold NaN or infinity: a metric on them would mean
    nothing."""
    for name, tensor in embeddings.items():
        bad_rows = (~torch.isfinite(tensor.reshape(len(tensor), -1))).any(dim=1)
        if bad_rows.any():
            raise NonFiniteError(f"{int(bad_rows.sum())} of {len(tensor)} {name.replace('_', ' ')} are not finite "
                                 f"(NaN or infinity; first at row {int(bad_rows.nonzero()[0])}): the model has "
                                 "diverged or its weights are corrupt, so it is not evaluated")


def tie_exact_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """`queries @ candidates.T` in float32 where equal vectors get bit-identical scores (a matrix product may round
    two equal columns differently, which would break a tie between duplicate captions by rounding noise)."""
    unique_queries, query_index = torch.unique(queries.float(), dim=0, return_inverse=True)
    unique_candidates, candidate_index = torch.unique(candidates.float(), dim=0, return_inverse=True)
    return (unique_queries @ unique_candidates.T)[query_index][:, candidate_index]


def expected_hits(scores: torch.Tensor, positives: torch.Tensor, target_score: torch.Tensor,
                  ks: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per query, the probability that a positive is among the k best when ties are ordered at random.

    `target_score` (queries, 1) is the score of the query's best positive. With `above` non-positives scoring
    higher, and `q` positives and `a` non-positives tied at `target_score`, the first of the tied positives lands
    within the first k unless the first r = k - above tied places all go to non-positives: probability
    C(a, r) / C(a + q, r). Returns ({k: hit probabilities}, whether each query's target ties with a non-positive).
    """
    above = ((scores > target_score) & ~positives).sum(dim=1)
    at_target = scores == target_score
    tied_negatives = (at_target & ~positives).sum(dim=1).double()
    tied_positives = (at_target & positives).sum(dim=1).double()
    hits = {}
    for k in ks:
        places = k - above  # tied places left within the top k
        all_negative = torch.ones_like(tied_negatives)
        for i in range(max(k, 0)):
            factor = (tied_negatives - i).clamp(min=0) / (tied_negatives + tied_positives - i).clamp(min=1)
            all_negative = torch.where(places > i, all_negative * factor, all_negative)
        hits[k] = torch.where(places > 0, 1.0 - all_negative, torch.zeros_like(all_negative))
    return hits, tied_negatives > 0


def chance_recall(n_candidates: int, n_positives: float, k: int) -> float:
    """Expected recall@k of random ranking with `n_positives` positives among `n_candidates`."""
    if k >= n_candidates:
        return 1.0
    return 1.0 - math.comb(n_candidates - round(n_positives), k) / math.comb(n_candidates, k)


@torch.no_grad()
def zero_shot_classifier(model, processor, class_names: Sequence[str], templates: Sequence[str],
                         max_length: int = 64) -> torch.Tensor:
    """(n_classes, d) class embeddings: each class's prompts embedded, averaged, re-normalised (CLIP style)."""
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = embed_texts(model, processor, prompts, max_length=max_length)
    return F.normalize(embeds.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


def zero_shot_metrics(image_embeds: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of classifying images by their most similar class embedding."""
    check_finite_embeddings(image_embeds=image_embeds, class_embeds=classifier)
    return _topk_accuracy(tie_exact_scores(image_embeds, classifier), labels, ks, prefix="zero_shot")


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Top-k accuracy where a tie between the label and other classes counts as the chance of a random order
    winning it (`expected_hits`), not as a hit; `<prefix>_ties`: images whose label ties with another class."""
    labels = torch.as_tensor(labels, device=scores.device)
    if not torch.isfinite(scores).all():
        raise ValueError(f"{prefix}: scores are not finite (NaN or infinity): the embeddings or the classifier have "
                         "diverged or come from corrupt weights, so they are not evaluated")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < scores.shape[1]:
        raise ValueError(f"{prefix}: labels run from {int(labels.min())} to {int(labels.max())} but there are "
                         f"{scores.shape[1]} classes (labels index the class list, from 0)")
    is_label = torch.zeros_like(scores, dtype=torch.bool)
    is_label[torch.arange(len(labels)), labels] = True
    ks = [k for k in ks if k <= scores.shape[1]]
    hits, tied = expected_hits(scores, is_label, scores.gather(1, labels[:, None]), ks)
    metrics = {f"{prefix}_top{k}": hits[k].mean().item() for k in ks}
    metrics[f"{prefix}_ties"] = int(tied.sum())
    return metrics


def few_shot_indices(labels: Sequence[int], shots: int, seed: int = 0) -> np.ndarray:
    """Indices of `shots` examples per class (all of a class if it has fewer), reproducible given `seed`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def linear_probe(
    train_embeds: torch.Tensor,
    train_labels: torch.Tensor,
    test_embeds: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    init_classifier: torch.Tensor | None = None,
    init_scale: float = 10.0,
    weight_decay: float = 1e-3,
    steps: int = 300,
    learning_rate: float = 0.1,
) -> dict[str, float]:
    """Multinomial logistic regression on frozen embeddings, full-batch Adam with L2 penalty.

    With `init_classifier` (the zero-shot class embeddings) the weights start at `init_scale * classifier`
    and the penalty pulls towards that start instead of 0 (DiHT's zero-shot-initialised probe), so with
    few shots the probe stays close to the zero-shot classifier.
    """
    train_embeds, test_embeds = train_embeds.float(), test_embeds.float()
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    dim = train_embeds.shape[1]
    anchor = torch.zeros(n_classes, dim) if init_classifier is None else init_scale * init_classifier.float()
    weight = anchor.clone().requires_grad_(True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(train_embeds @ weight.T + bias, train_labels)
        loss = loss + weight_decay * (weight - anchor).square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = test_embeds @ weight.T + bias
    return _topk_accuracy(scores, test_labels, (1, 5), prefix="linear_probe")


METRICS_LEGEND = (
    "recall@k: share of queries whose match is among their k most similar candidates (i2t: an image finds one of "
    "its captions among all captions; t2i: a caption finds its image); *_unmatched: queries without any match in "
    "the set, left out of recall; ties count as the chance that a random order of the tied candidates puts the match "
    "first (never as sure hits); *_queries_with_ties / *_ties: queries whose match ties with another candidate; "
    "zero_shot_top1/5: classification accuracy from class-name prompts; "
    "*chance*: the same metric for random embeddings."
)


def _natural_key(name: str):
    """'recall@5' before 'recall@10': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_metrics(metrics: dict, legend: bool = True) -> str:
    """A readable table: names in natural order, values to 4 decimals (counts as integers), then a legend line."""
    rows = []
    for name in sorted(metrics, key=_natural_key):
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append(f"{name:<36} {value:>10}" if isinstance(value, int) else f"{name:<36} {value:>10.4f}")
    return "\n".join(rows + ([f"({METRICS_LEGEND})"] if legend and rows else []))


def to_json(metrics: dict, path=None) -> str:
    """Metrics as pretty JSON; also written to `path` when given. Always valid JSON: a value that is not finite (NaN,
    infinity; e.g. recall with no query) is written as `null`, never as the bare `NaN` that strict parsers refuse."""
    text = json.dumps(finite_or_none(metrics), indent=2, sort_keys=True, allow_nan=False)
    if path is not None:
        with open(path, "w") as file:
            file.write(text + "\n")
    return text


__all__ = [
    "METRICS_LEGEND",
    "chance_recall",
    "check_finite_embeddings",
    "expected_hits",
    "format_metrics",
    "few_shot_indices",
    "linear_probe",
    "recall_at",
    "retrieval_metrics",
    "tie_exact_scores",
    "to_json",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
