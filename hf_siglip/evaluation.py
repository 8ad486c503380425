"""Evaluation that papers report, computed from embeddings.

- `retrieval_metrics`: image-text recall@k both ways with several captions per image (Flickr30k / MSCOCO
  protocol: image->text is a hit if any of the image's captions is in the top k).
- `zero_shot_classifier` + `zero_shot_metrics`: template-averaged class embeddings, top-1 / top-5.
- `linear_probe`: few-shot (k per class) logistic regression, optionally initialised from the zero-shot
  classifier (DiHT).
Batched, L2-normalised embeddings come from `hf_siglip.data.embedding` (also home of `add_image_embeddings`,
the SigLiT embedding cache).

Everything returns plain dicts of floats; `to_json` writes them for papers' tables.
"""

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.embedding import embed_images, embed_texts
from .positives import positive_pairs


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
    Images or texts with no match are excluded from their direction (counted in `*_unmatched`).
    """
    similarity = image_embeds.float() @ text_embeds.float().T
    matches = positive_pairs(image_ids, text_ids)
    metrics = {}
    for prefix, scores, positives in (("i2t", similarity, matches), ("t2i", similarity.T, matches.T)):
        has_match = positives.any(dim=1)
        scores, positives = scores[has_match], positives[has_match]
        # rank of the best-ranked positive: number of candidates scoring strictly higher than it
        best_positive = scores.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
        rank = (scores > best_positive).sum(dim=1)
        for k in ks:
            metrics[f"{prefix}_recall@{k}"] = (rank < k).float().mean().item() if len(rank) else float("nan")
        metrics[f"{prefix}_unmatched"] = int((~has_match).sum())
    return metrics


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
    return _topk_accuracy(image_embeds.float() @ classifier.float().T, labels, ks, prefix="zero_shot")


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    labels = torch.as_tensor(labels)
    ranking = scores.argsort(dim=1, descending=True)
    metrics = {}
    for k in ks:
        if k <= scores.shape[1]:
            metrics[f"{prefix}_top{k}"] = (ranking[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
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
    "the set, left out of recall; zero_shot_top1/5: classification accuracy from class-name prompts; "
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
    """Metrics as pretty JSON; also written to `path` when given."""
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if path is not None:
        with open(path, "w") as file:
            file.write(text + "\n")
    return text


__all__ = [
    "METRICS_LEGEND",
    "chance_recall",
    "format_metrics",
    "few_shot_indices",
    "linear_probe",
    "retrieval_metrics",
    "to_json",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
