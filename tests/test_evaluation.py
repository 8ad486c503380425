"""Evaluation metrics against hand-computed examples, and the linear probe on real digits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_siglip.evaluation import (
    chance_recall,
    few_shot_indices,
    linear_probe,
    retrieval_metrics,
    zero_shot_metrics,
)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_retrieval_recall_with_several_captions_per_image():
    # 3 images on the axes; 5 texts: image 0 has captions 0 and 1, image 1 has 2, image 2 has 3 and 4.
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([0.1, 1, 0],      # caption of image 0 that looks like image 1
                 [1, 0.2, 0],      # good caption of image 0
                 [1, 0.9, 0],      # caption of image 1 that looks more like image 0
                 [0, 0, 1],        # good caption of image 2
                 [0, 1, 0.5])      # caption of image 2 that looks like image 1
    image_ids, text_ids = torch.tensor([10, 11, 12]), torch.tensor([10, 10, 11, 12, 12])
    metrics = retrieval_metrics(images, texts, image_ids, text_ids, ks=(1, 2))
    # image->text: image 0's best text is text 1 (its own): hit@1. Image 1 ranks text 0 (0.995) first, then
    # text 4 (0.894), then its own text 2 (0.669): miss@1, miss@2. Image 2's best is text 3 (its own): hit@1.
    assert metrics["i2t_recall@1"] == pytest.approx(2 / 3)
    assert metrics["i2t_recall@2"] == pytest.approx(2 / 3)
    # text->image: text0 -> image 1 first (miss@1, hit@2); text1 -> image 0 (hit); text2 -> image 0 first then
    # image 1 (miss@1, hit@2); text3 -> image 2 (hit); text4 -> image 1 first then image 2 (miss@1, hit@2).
    assert metrics["t2i_recall@1"] == pytest.approx(2 / 5)
    assert metrics["t2i_recall@2"] == pytest.approx(1.0)
    assert metrics["i2t_unmatched"] == metrics["t2i_unmatched"] == 0


def test_unmatched_rows_are_counted_not_scored():
    images, texts = unit([1, 0], [0, 1]), unit([1, 0])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]), torch.tensor([0]), ks=(1,))
    assert metrics["i2t_unmatched"] == 1 and metrics["i2t_recall@1"] == 1.0


def test_zero_shot_top_k_by_hand():
    classifier = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = unit([0.9, 0.5, 0], [0.2, 0.1, 1], [0.6, 0.8, 0.1])
    labels = torch.tensor([0, 2, 0])  # third image is closest to class 1, second choice class 0
    metrics = zero_shot_metrics(images, labels, classifier, ks=(1, 2))
    assert metrics["zero_shot_top1"] == pytest.approx(2 / 3)
    assert metrics["zero_shot_top2"] == pytest.approx(1.0)


def test_chance_recall():
    assert chance_recall(10, 1, 1) == pytest.approx(0.1)
    assert chance_recall(10, 2, 1) == pytest.approx(0.2)
    assert chance_recall(10, 1, 5) == pytest.approx(0.5)


def test_linear_probe_on_real_digits_and_zero_shot_init():
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = F.normalize(torch.tensor(digits.data, dtype=torch.float32), dim=-1)
    labels = torch.tensor(digits.target)
    train = torch.tensor(few_shot_indices(labels.tolist(), shots=5, seed=0))
    assert len(train) == 50 and torch.bincount(labels[train]).tolist() == [5] * 10
    test = torch.tensor(sorted(set(range(len(labels))) - set(train.tolist())))

    probe = linear_probe(features[train], labels[train], features[test], labels[test], n_classes=10)
    assert probe["linear_probe_top1"] > 0.8  # 5-shot on raw digit pixels

    # class means as a "zero-shot" classifier: with no training steps the probe is exactly that classifier
    class_means = F.normalize(torch.stack([features[labels == c].mean(0) for c in range(10)]), dim=-1)
    untrained = linear_probe(features[train], labels[train], features[test], labels[test], n_classes=10,
                             init_classifier=class_means, steps=0)
    zero_shot = zero_shot_metrics(features[test], labels[test], class_means)
    assert untrained["linear_probe_top1"] == pytest.approx(zero_shot["zero_shot_top1"])
    trained = linear_probe(features[train], labels[train], features[test], labels[test], n_classes=10,
                           init_classifier=class_means)
    assert trained["linear_probe_top1"] >= 0.8


def test_metrics_table_reads_in_order_rounded_with_a_legend():
    from hf_siglip.evaluation import format_metrics

    table = format_metrics({"i2t_recall@10": 0.9, "i2t_recall@5": 0.18799999356269836, "i2t_recall@1": 0.1,
                            "i2t_unmatched": 0, "note": "text"}).splitlines()
    assert [line.split()[0] for line in table[:4]] == ["i2t_recall@1", "i2t_recall@5", "i2t_recall@10",
                                                       "i2t_unmatched"]
    assert table[1].split()[1] == "0.1880" and table[3].split()[1] == "0"
    assert table[4].startswith("(recall@k:") and "unmatched" in table[4]


# --- ties: neither hits nor misses -------------------------------------------------------------------------------

def test_collapsed_model_scores_chance_not_a_perfect_recall():
    # every embedding equal: each image's 3 captions tie with all 24 texts, each text's image with all 8 images
    images, texts = torch.ones(8, 4) / 2, torch.ones(24, 4) / 2
    image_ids, text_ids = torch.arange(8), torch.arange(8).repeat_interleave(3)
    metrics = retrieval_metrics(images, texts, image_ids, text_ids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert metrics[f"i2t_recall@{k}"] == pytest.approx(chance_recall(24, 3, k))
        assert metrics[f"t2i_recall@{k}"] == pytest.approx(chance_recall(8, 1, k))
    assert metrics["i2t_recall@1"] == pytest.approx(3 / 24)
    assert metrics["i2t_queries_with_ties"] == 8 and metrics["t2i_queries_with_ties"] == 24


def test_random_embeddings_score_near_chance():
    generator = torch.Generator().manual_seed(0)
    images, texts = F.normalize(torch.randn(400, 32, generator=generator), dim=-1), \
        F.normalize(torch.randn(400, 32, generator=generator), dim=-1)
    metrics = retrieval_metrics(images, texts, torch.arange(400), torch.arange(400), ks=(10,))
    assert metrics["i2t_recall@10"] == pytest.approx(10 / 400, abs=0.03)  # 3 standard deviations of 400 draws
    assert metrics["i2t_queries_with_ties"] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_raise_instead_of_scoring(bad):
    images, texts = unit([1, 0], [0, 1]), unit([1, 0], [0, 1])
    images[1, 0] = bad
    with pytest.raises(ValueError, match="1 of 2 image embeds are not finite"):
        retrieval_metrics(images, texts, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not finite"):
        zero_shot_metrics(images, torch.tensor([0, 1]), unit([1, 0], [0, 1]))


def _random_tie_break_recall(scores, positives, k, draws, rng):
    """Independent count: rank candidates by argsort on (score, random key), the best positive's position < k."""
    scores, positives = scores.double().numpy(), positives.numpy()
    hits = 0.0
    for _ in range(draws):
        noise = rng.random(scores.shape)
        order = np.lexsort((noise, -scores), axis=1)  # by score descending, ties by a random key
        ranked_positive = np.take_along_axis(positives, order, axis=1)
        hits += (ranked_positive.argmax(axis=1) < k).mean()
    return hits / draws


def test_duplicate_captions_match_an_independent_count_with_random_tie_breaking():
    # 12 images with 2 captions each; many captions are copies of other images' captions ("a red circle"),
    # which the text tower embeds identically: the copies tie exactly with the image's own caption
    generator, rng = torch.Generator().manual_seed(1), np.random.default_rng(0)
    phrases = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)  # 5 distinct caption texts
    caption_phrase = torch.randint(0, 5, (24,), generator=generator)
    texts = phrases[caption_phrase]
    images = F.normalize(phrases[caption_phrase[::2]] + 0.3 * torch.randn(12, 8, generator=generator), dim=-1)
    image_ids, text_ids = torch.arange(12), torch.arange(12).repeat_interleave(2)
    metrics = retrieval_metrics(images, texts, image_ids, text_ids, ks=(1, 3, 5))
    similarity = images @ texts.T
    positives = image_ids[:, None] == text_ids[None, :]
    assert metrics["i2t_queries_with_ties"] > 0 and metrics["t2i_queries_with_ties"] == 0
    for k in (1, 3, 5):
        counted = _random_tie_break_recall(similarity, positives, k, draws=4000, rng=rng)
        assert metrics[f"i2t_recall@{k}"] == pytest.approx(counted, abs=0.01)
        assert metrics[f"t2i_recall@{k}"] == pytest.approx(
            _random_tie_break_recall(similarity.T, positives.T, k, draws=1, rng=rng))  # no ties: one draw is exact
    # and strictly between the flattering count (ties are hits) and the punishing one (ties are misses)
    best = similarity.masked_fill(~positives, -2).max(dim=1, keepdim=True).values
    flattering = ((similarity > best).sum(dim=1) < 1).float().mean().item()
    punishing = (((similarity >= best) & ~positives).sum(dim=1) < 1).float().mean().item()
    assert punishing < metrics["i2t_recall@1"] < flattering


def test_duplicate_vectors_tie_exactly_whatever_the_matrix_product_rounds():
    from hf_siglip.evaluation import tie_exact_scores

    generator = torch.Generator().manual_seed(2)
    queries, candidate = torch.randn(37, 300, generator=generator), torch.randn(1, 300, generator=generator)
    candidates = torch.cat([torch.randn(50, 300, generator=generator), candidate.expand(29, -1)])
    scores = tie_exact_scores(queries, candidates)
    assert (scores[:, 50:] == scores[:, 50:51]).all()
    assert torch.allclose(scores, queries @ candidates.T, atol=1e-4)


def test_zero_shot_ties_between_classes_are_not_hits():
    # two classes with the same prompt embedding: an image of either scores 1/2 at top-1, 1 at top-2
    classifier = unit([1, 0, 0], [1, 0, 0], [0, 0, 1])
    images = unit([1, 0.1, 0], [1, 0, 0.1], [0, 0.1, 1])
    metrics = zero_shot_metrics(images, torch.tensor([0, 1, 2]), classifier, ks=(1, 2))
    assert metrics["zero_shot_top1"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert metrics["zero_shot_top2"] == pytest.approx(1.0)
    assert metrics["zero_shot_ties"] == 2
    constant = zero_shot_metrics(torch.ones(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), classifier, ks=(1,))
    assert constant["zero_shot_top1"] == pytest.approx(1 / 3)  # every class ties: chance
