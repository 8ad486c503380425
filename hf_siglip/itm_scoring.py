"""Image-caption pairs scored by a trained ITM head: BLIP's CapFilt filter and ALBEF / BLIP's re-ranking of retrieval.

The scorer is what the itm objective saves beside the dual encoder (`output_dir/fusion_encoder/`: the fusion encoder
and `itm_head.safetensors`), put together by `hf_siglip.objectives.fusion.load_itm_scorer`: the dual encoder's vision
tower gives the patch tokens the fusion encoder attends to, its tokenizer the caption ids (padded to the length it
was trained with, as the collator pads them), and the head's class 1 is "the caption matches the image".

`ItmPairScorer.score_pairs` evaluates any list of (image, caption) pairs with each image's patch tokens computed once
(re-ranking scores k captions per image and k images per caption: the vision tower runs once per image, not per
pair) and a bounded memory: images are taken `batch_size` at a time, only their pairs scored.

`itm_rerank_metrics` is the ALBEF / BLIP protocol (ALBEF section 5, BLIP section 5.1): for each query the k best
candidates by the embeddings' cosine are re-scored by the ITM head and placed in front, in the order of their match
probability; the rest keep their cosine order behind them. Recall@k of that ranking is tie-aware as
`hf_siglip.evaluation` counts it (`recall_at`, `expected_hits`): ties between the re-scored candidates'
probabilities, or among the rest's cosines, count the chance of a random order; ties at the cut between the k-th and
the (k+1)-th cosine are broken at random by a seeded permutation (which of the tied candidates are re-scored is a
fair draw, the same on every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from .data.images import decode_image
from .errors import UsageError


class _PatchTable(nn.Module):
    """Stands in for the vision tower inside `ItmScorer`: "pixel values" are rows of precomputed patch tokens, so the
    scorer's own forward (its [CLS] and mask convention) scores each pair without a second copy of that logic."""

    def __init__(self, patches: torch.Tensor):
        super().__init__()
        self.patches = patches

    def forward(self, pixel_values: torch.Tensor):
        return SimpleNamespace(last_hidden_state=self.patches[pixel_values])


class ItmPairScorer:
    """The ITM scorer of a training output folder with its processor (`folder` must hold `fusion_encoder/` with
    `itm_head.safetensors`: trained with the itm objective; otherwise a one-line `UsageError`)."""

    def __init__(self, folder: str, max_length: int | None = None, batch_size: int = 64):
        from transformers import AutoProcessor

        from .objectives.fusion import load_itm_scorer

        self.folder = folder
        self.scorer = load_itm_scorer(folder)
        self.processor = AutoProcessor.from_pretrained(folder)
        positions = self.scorer.fusion.config.max_position_embeddings - 1  # one position holds [CLS]
        if max_length is None:  # what the run trained with: `hf-siglip train` records it as model_max_length
            recorded = getattr(self.processor.tokenizer, "model_max_length", None)
            max_length = recorded if recorded is not None and 0 < recorded <= positions else positions
        if max_length > positions:
            raise UsageError(f"max_length {max_length}: the ITM head in {folder} reads at most {positions} caption "
                             "tokens")
        self.max_length, self.batch_size = int(max_length), batch_size

    @property
    def device(self) -> torch.device:
        return next(self.scorer.parameters()).device

    def to(self, device) -> ItmPairScorer:
        self.scorer.to(device)
        return self

    def input_ids(self, captions: Sequence[str]) -> torch.LongTensor:
        """Caption ids as the collator makes them (padded to `max_length`, truncated)."""
        return self.processor.tokenizer(list(captions), padding="max_length", truncation=True,
                                        max_length=self.max_length, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def patch_tokens(self, images: Sequence) -> torch.Tensor:
        """`(N, P, D)` patch tokens of `images` (anything `decode_image` takes)."""
        pixel_values = self.processor.image_processor(images=[decode_image(image) for image in images],
                                                      return_tensors="pt")["pixel_values"]
        return self.scorer.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state

    @torch.no_grad()
    def score_pairs(self, images: Sequence, input_ids: torch.LongTensor, image_index: torch.LongTensor,
                    text_index: torch.LongTensor) -> torch.Tensor:
        """Match probability (float32, CPU) of each pair (`images[image_index[p]]`, `input_ids[text_index[p]]`)."""
        image_index, text_index = torch.as_tensor(image_index).long(), torch.as_tensor(text_index).long()
        probabilities = torch.empty(len(image_index), dtype=torch.float32)
        tower = self.scorer.vision_model
        try:
            for start in range(0, len(images), self.batch_size):
                pairs = ((image_index >= start) & (image_index < start + self.batch_size)).nonzero().flatten()
                if not len(pairs):
                    continue
                self.scorer.vision_model = tower
                patches = self.patch_tokens(images[start:start + self.batch_size])
                self.scorer.vision_model = _PatchTable(patches)
                for chunk in pairs.split(self.batch_size):
                    probabilities[chunk] = self.scorer(
                        (image_index[chunk] - start).to(self.device),
                        input_ids[text_index[chunk]].to(self.device)).float().cpu()
        finally:
            self.scorer.vision_model = tower
        return probabilities


def top_k_candidates(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.LongTensor:
    """Per row, the `k` highest-scoring columns; ties (at the cut too) broken by a random permutation from
    `generator`, so that which of several tied candidates gets re-scored is a fair draw, not the lowest index."""
    permutation = torch.randperm(scores.shape[1], generator=generator)
    shuffled = scores[:, permutation]
    # a stable sort of the shuffled columns: equal scores keep the random order
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices[:, :k]
    return permutation[order]


def itm_rerank_metrics(scorer: ItmPairScorer, images: Sequence, captions: Sequence[str], similarity: torch.Tensor,
                       positives: torch.Tensor, rerank_k: int, ks: Sequence[int] = (1, 5, 10),
                       seed: int = 0) -> dict[str, float]:
    """`i2t_itm_recall@k` / `t2i_itm_recall@k`: recall after re-ranking each query's `rerank_k` best candidates by
    cosine (`similarity` `(images, texts)`) with the ITM head; `positives` `(images, texts)` marks the matches (ids
    equal). Queries without a match are left out, as `retrieval_metrics` does; `itm_rerank_k` and
    `itm_scored_pairs` say what ran. See the module docstring for the ranking and its ties."""
    from .evaluation import recall_at

    if rerank_k < 1:
        raise UsageError(f"itm_rerank_k must be >= 1, got {rerank_k}")
    similarity = similarity.float().cpu()
    positives = positives.cpu()
    generator = torch.Generator().manual_seed(seed)
    k_images = min(rerank_k, similarity.shape[1])
    k_texts = min(rerank_k, similarity.shape[0])
    text_candidates = top_k_candidates(similarity, k_images, generator)  # (images, k) caption columns
    image_candidates = top_k_candidates(similarity.T, k_texts, generator)  # (texts, k) image rows
    # every pair either direction asks for, scored once
    pairs = torch.cat([torch.stack([torch.arange(len(similarity)).repeat_interleave(k_images),
                                    text_candidates.flatten()], dim=1),
                       torch.stack([image_candidates.flatten(),
                                    torch.arange(similarity.shape[1]).repeat_interleave(k_texts)], dim=1)])
    pairs, where = torch.unique(pairs, dim=0, return_inverse=True)
    probability = scorer.score_pairs(images, scorer.input_ids(captions), pairs[:, 0], pairs[:, 1])
    if not torch.isfinite(probability).all():  # decision 12: a corrupt head is refused, not ranked
        from .training.finite import NonFiniteError

        raise NonFiniteError(f"the ITM head in {scorer.folder} gives non-finite match probabilities (NaN or "
                             "infinity): its weights are corrupt or diverged, so nothing is re-ranked")
    i2t = probability[where[:len(similarity) * k_images]].view(len(similarity), k_images)
    t2i = probability[where[len(similarity) * k_images:]].view(similarity.shape[1], k_texts)

    metrics = {"itm_rerank_k": rerank_k, "itm_scored_pairs": len(pairs)}
    for prefix, candidates, scored, matches in (("i2t", text_candidates, i2t, positives),
                                                ("t2i", image_candidates, t2i, positives.T)):
        # re-ranked scores: the re-scored candidates above all others (probability in [0, 1], plus 2), the rest
        # below in their cosine order (cosine in [-1, 1], minus 3), their ties kept as ties
        scores = (similarity if prefix == "i2t" else similarity.T).double() - 3.0
        scores.scatter_(1, candidates, scored.double() + 2.0)
        metrics.update(recall_at(scores, matches, ks, f"{prefix}_itm"))
    return metrics


__all__ = ["ItmPairScorer", "itm_rerank_metrics", "top_k_candidates"]
