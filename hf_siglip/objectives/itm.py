"""Image-text matching with hard negatives (ALBEF, Li et al. 2021, arXiv 2107.07651, section 3.2; BLIP, Li et al.
2022, arXiv 2201.12086) as a training objective.

The fusion encoder (`hf_siglip.objectives.fusion`) reads a caption while cross-attending to an image's patch tokens;
a 2-way linear head on its [CLS] output says whether they match. Pairs per step: every caption with its own image
(label 1), and for each image `negatives_per_sample` captions and for each caption as many images (label 0), drawn in
proportion to softmax(cosine similarity / temperature) of the dual encoder's embeddings among the NON-positives.
Positives are defined by ids as for the pair loss (k captions per image, groups, duplicates), and a caption whose
tokens equal one of the image's captions is a positive too (short captions such as "a red circle" recur across
images; as negatives they were 9 % of the same-colour-and-shape candidates on the demo, wrong labels): neither is
ever drawn; a row with no non-positive candidate left gets fewer negatives. Several negatives of one row
are drawn without replacement. The term is the cross-entropy summed over pairs; the trainer divides by the global
number of pairs (the objectives' rule), times `weight`.

The draw uses the whole optimizer step (`prepare_step`, before any loss): one generator seeded by (seed, step)
draws uniform numbers for every row of the global batch (rows in the order: processes by rank, each its accumulation
window's micro-batches in order), and each process turns its own rows' numbers into draws by inverting the cumulative
weights of its rows. So 2 processes x 8 rows draw what 1 process x 16 does, accumulation 8 x 2 what 16 does, and a
resumed run what the uninterrupted one did.

`negatives_from: global` (default) draws among the whole global batch, within the ring's memory bound: no process
gathers patch tokens. What travels, once per step: every process's (normalised) image and text embeddings, ids and
caption token ids (an all-gather of B x D, T x D, B + T ids and T x L tokens), and each caption's drawn images'
global indices (T x n). Every pair is then evaluated where its image lives: a process builds its images' pairs with
any caption (positive, drawn for the image, or drawn by another process's caption for it) from the gathered tokens,
so similarities are (local rows x global batch) and only tokens travel to the image. `local` draws among the
process's own step (its accumulation window) and gathers nothing but the logged means.

Logged: `itm_loss`, `itm_negative_similarity` (mean cosine of the drawn negatives) and `itm_uniform_similarity` (mean
cosine over every non-positive candidate pair: what uniform draws would average); hard negatives score higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..captioner import caption_image_index, patch_tokens_of
from ..errors import UsageError
from . import register_objective
from .base import Objective, ObjectiveConfig, attach_module
from .fusion import (
    FusionSettings,
    attach_fusion_encoder,
    describe,
    fusion_and_head_state,
    fusion_settings,
    load_fusion_and_head_state,
    save_fusion,
    unsupported,
)

HEAD_NAME = "itm_head"
WEIGHTS_NAME = "itm.safetensors"
NEGATIVE_SOURCES = ("global", "local")


@dataclass
class ItmConfig(ObjectiveConfig, FusionSettings):
    """Settings of image-text matching (`objectives: {itm: {...}}`); the fusion encoder's sizes are shared with mlm."""

    negatives_per_sample: int = field(default=1, metadata={
        "help": "Hard negatives per image and per caption (ALBEF, BLIP: 1)."})
    temperature: float = field(default=0.07, metadata={
        "help": "Sampling temperature: negatives are drawn in proportion to softmax(cosine / temperature) (ALBEF: "
                "its contrastive temperature, initially 0.07)."})
    negatives_from: str = field(default="global", metadata={
        "help": "'global': among every process's batch (nothing but embeddings, ids and tokens travel); 'local': "
                "among this process's step."})

    def validate(self, name: str) -> None:
        super().validate(name)
        self.validate_fusion(name)
        if not (isinstance(self.negatives_per_sample, int) and self.negatives_per_sample >= 1):
            raise ValueError(f"objectives.{name}.negatives_per_sample must be an integer >= 1, got "
                             f"{self.negatives_per_sample!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"objectives.{name}.temperature must be > 0, got {self.temperature!r}")
        if self.negatives_from not in NEGATIVE_SOURCES:
            raise ValueError(f"objectives.{name}.negatives_from must be one of {NEGATIVE_SOURCES}, got "
                             f"{self.negatives_from!r}")


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, optimizer step, stream): the same on every process and device."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def draw_negatives(similarity: torch.Tensor, positive: torch.Tensor, uniforms: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `similarity` `(R, C)`, `uniforms.shape[1]` candidates drawn without replacement in proportion to
    exp(similarity / temperature) among the non-`positive` ones, by inverting the cumulative weights at `uniforms`
    `(R, n)` in [0, 1). Returns (indices `(R, n)`, valid `(R, n)`: False where a row had no candidate left)."""
    logits = similarity.double() / temperature
    logits = logits.masked_fill(positive, float("-inf"))
    top = logits.max(dim=1, keepdim=True).values
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    indices = torch.zeros(uniforms.shape, dtype=torch.long, device=similarity.device)
    valid = torch.zeros(uniforms.shape, dtype=torch.bool, device=similarity.device)
    rows = torch.arange(len(weights), device=similarity.device)
    for draw in range(uniforms.shape[1]):
        available = weights > 0
        cumulative = weights.cumsum(dim=1)
        total = cumulative[:, -1:]
        targets = uniforms[:, draw:draw + 1].to(weights) * total
        chosen = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
        last = available.long().cumsum(1).argmax(1)  # the last candidate with weight (rounding at the top end)
        chosen = torch.minimum(chosen, last)
        ok = available.any(dim=1)
        indices[:, draw], valid[:, draw] = chosen, ok
        weights[rows[ok], chosen[ok]] = 0.0  # without replacement
    return indices, valid


def positives_with_identical_captions(image_ids: torch.Tensor, candidate_text_ids: torch.Tensor,
                                      candidate_image_ids: torch.Tensor, candidate_tokens: torch.Tensor,
                                      own_texts: int, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (image, candidate caption) and (caption, candidate image) pairs are positives: those sharing an id, and
    those where the caption's tokens equal a caption of the image's id (a caption two images both have describes
    both; drawn as a negative it would teach the head that a true description does not match). `candidate_tokens`
    `(C, L)` are the candidate captions' ids, this process's `texts` captions at rows `own_texts` onwards. Returns
    `(B, C)` and `(T, candidate images)`: the similarity matrices' sizes, nothing larger is built."""
    _, content = torch.unique(candidate_tokens, dim=0, return_inverse=True)
    # ids made dense (0..n-1) so that id * contents + content is a key that cannot overflow or collide
    _, dense = torch.unique(torch.cat([candidate_text_ids, image_ids, candidate_image_ids]), return_inverse=True)
    text_id, image_id, candidate_image_id = dense.split([len(candidate_text_ids), len(image_ids),
                                                         len(candidate_image_ids)])
    contents = int(content.max()) + 1 if len(content) else 1
    said = text_id * contents + content  # one key per (id, caption text) the batch holds
    i2t_positive = torch.isin(image_id[:, None] * contents + content[None, :], said)
    own = content[own_texts:own_texts + texts]
    t2i_positive = torch.isin(candidate_image_id[None, :] * contents + own[:, None], said)
    return i2t_positive, t2i_positive


def pad_tokens(parts: list[torch.Tensor], length: int, pad: int) -> torch.Tensor:
    return torch.cat([F.pad(part, (0, length - part.shape[1]), value=pad) for part in parts])


class _Plan:
    """The pairs one micro-batch evaluates: its image positions, rows of the token table, labels."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor):
        self.images, self.texts, self.labels = images, texts, labels


@register_objective
class Itm(Objective):
    """ITM head `itm_head` on the shared `fusion_encoder`; units are pairs (positives and drawn negatives)."""

    name = "itm"
    config_class = ItmConfig
    side_file = WEIGHTS_NAME

    def __init__(self, config: ItmConfig, model, args, processing_class=None, train_dataset=None):
        super().__init__(config, model, args)
        self.problem = unsupported(model, train_dataset)
        if self.problem is not None:  # check() refuses the run
            return
        settings = fusion_settings(config, args)
        self.seed = settings["seed"]
        self.fusion = attach_fusion_encoder(model, config, args, processing_class)
        width = self.fusion.config.hidden_size
        self.head = attach_module(model, HEAD_NAME, lambda: torch.nn.Linear(width, 2), seed=self.seed + 1,
                                 learning_rate=settings["learning_rate"])
        self.plans: dict[int, _Plan] = {}
        self.tokens = None

    def check(self, model) -> None:
        if self.problem is not None:
            raise UsageError(f"the itm objective {self.problem}")

    # --- the step's pairs ------------------------------------------------------------------------------------

    def prepare_step(self, trainer, image_embeds, text_embeds, batches) -> dict[str, float]:
        pad = self.fusion.vocabulary.pad
        device = image_embeds.device
        image_ids = torch.cat([batch["image_ids"] for batch in batches])
        text_ids = torch.cat([batch["text_ids"] for batch in batches])
        image_sizes = [len(batch["image_ids"]) for batch in batches]
        length = max(batch["input_ids"].shape[1] for batch in batches)
        accelerator = getattr(trainer, "accelerator", None)
        world = accelerator.num_processes if accelerator is not None else 1
        counts = torch.tensor([[len(image_ids), len(text_ids), length]], device=device)
        if world > 1:
            counts = accelerator.gather(counts)
        rank = accelerator.process_index if world > 1 else 0
        image_offset, text_offset = int(counts[:rank, 0].sum()), int(counts[:rank, 1].sum())
        global_images, global_texts = int(counts[:, 0].sum()), int(counts[:, 1].sum())
        tokens = pad_tokens([batch["input_ids"] for batch in batches], int(counts[:, 2].max()), pad)

        # uniform numbers of every row of the global batch, from one generator; this process takes its rows'
        n = self.config.negatives_per_sample
        step = trainer.state.global_step if trainer is not None else 0
        generator = step_generator(self.seed, step, 0)
        image_uniforms = torch.rand((global_images, n), generator=generator, dtype=torch.float64)
        text_uniforms = torch.rand((global_texts, n), generator=generator, dtype=torch.float64)
        image_uniforms = image_uniforms[image_offset:image_offset + len(image_ids)].to(device)
        text_uniforms = text_uniforms[text_offset:text_offset + len(text_ids)].to(device)

        every = self.config.negatives_from == "global" and world > 1
        if every:  # the (small) embeddings, ids and tokens of the global batch; never patch tokens
            candidate_images, candidate_image_ids = trainer._gather_rows(image_embeds), trainer._gather_rows(image_ids)
            candidate_texts, candidate_text_ids = trainer._gather_rows(text_embeds), trainer._gather_rows(text_ids)
            self.tokens = trainer._gather_rows(tokens)
            own_images, own_texts = image_offset, text_offset  # where this process's rows sit among the candidates
        else:
            candidate_images, candidate_image_ids = image_embeds, image_ids
            candidate_texts, candidate_text_ids = text_embeds, text_ids
            self.tokens = tokens
            own_images = own_texts = 0

        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
        i2t = image_embeds @ candidate_texts.float().T
        i2t_positive, t2i_positive = positives_with_identical_captions(
            image_ids, candidate_text_ids, candidate_image_ids, self.tokens, own_texts, len(text_ids))
        texts_drawn, texts_valid = draw_negatives(i2t, i2t_positive, image_uniforms, self.config.temperature)
        t2i = text_embeds @ candidate_images.float().T
        images_drawn, images_valid = draw_negatives(t2i, t2i_positive, text_uniforms, self.config.temperature)

        # pairs, by the image's position in this process's step: (image, token row, label)
        own_text_rows = torch.arange(len(text_ids), device=device) + own_texts
        image_starts = np.cumsum([0, *image_sizes])
        positive_images = torch.cat([caption_image_index(batch["image_ids"], batch["text_ids"]) + int(start)
                                     for batch, start in zip(batches, image_starts)])
        image_rows = torch.arange(len(image_ids), device=device)[:, None].expand(-1, n)
        images = [positive_images, image_rows[texts_valid]]
        texts = [own_text_rows, texts_drawn[texts_valid]]
        text_rows = own_text_rows[:, None].expand(-1, n)
        drawn_images, drawn_for = images_drawn[images_valid], text_rows[images_valid]
        if every:  # a caption's drawn image may live on another process: each keeps the pairs of its own images
            pairs = trainer._gather_rows(torch.stack([drawn_images, drawn_for], dim=1))
            mine = (pairs[:, 0] >= own_images) & (pairs[:, 0] < own_images + len(image_ids))
            drawn_images, drawn_for = pairs[mine, 0] - own_images, pairs[mine, 1]
        images.append(drawn_images)
        texts.append(drawn_for)
        labels = torch.cat([torch.ones(len(positive_images), dtype=torch.long, device=device),
                            torch.zeros(len(images[1]) + len(images[2]), dtype=torch.long, device=device)])
        images, texts = torch.cat(images), torch.cat(texts)
        self.plans = {}
        for index, batch in enumerate(batches):
            start, end = int(image_starts[index]), int(image_starts[index + 1])
            keep = (images >= start) & (images < end)
            self.plans[id(batch)] = _Plan(images[keep] - start, texts[keep], labels[keep])

        # hard negatives against uniform ones: the mean cosine of the drawn pairs and of every non-positive pair
        negative = torch.cat([i2t.gather(1, texts_drawn)[texts_valid], t2i.gather(1, images_drawn)[images_valid]])
        values = torch.stack([negative.double().sum(), torch.tensor(float(len(negative)), device=device),
                              i2t.double()[~i2t_positive].sum(), (~i2t_positive).sum().double()])
        if world > 1:  # global: the processes' image rows make up the whole matrix; local: each its own block
            values = accelerator.reduce(values, reduction="sum")
        metrics = {}
        if values[1] > 0:
            metrics["itm_negative_similarity"] = (values[0] / values[1]).item()
        if values[3] > 0:
            metrics["itm_uniform_similarity"] = (values[2] / values[3]).item()
        return metrics

    def _plan(self, batch) -> _Plan:
        plan = self.plans.get(id(batch))
        if plan is None:
            raise RuntimeError("the itm objective's pairs are drawn in prepare_step, once per optimizer step, before "
                               "count / loss_sum of the step's batches (SiglipTrainer calls it)")
        return plan

    def count(self, batch) -> int:
        return len(self._plan(batch).labels)

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        plan = self._plan(batch)
        patches = patch_tokens_of(outputs.vision_model_output)
        if patches is None:
            raise UsageError("the itm objective needs the vision tower's patch tokens, and this batch's forward gave "
                             "none (cached image_embeds?)")
        tokens = self.tokens[plan.texts]
        hidden = self.fusion(patches[plan.images], tokens)
        logits = self.head(hidden[:, 0])
        return F.cross_entropy(logits.float(), plan.labels, reduction="sum")

    # --- files and card --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return fusion_and_head_state(self.fusion, self.head, HEAD_NAME)

    def load_state_dict(self, state) -> None:
        load_fusion_and_head_state(self.fusion, self.head, HEAD_NAME, state)

    def card(self) -> dict:
        return {"itm_weight": self.weight, "itm_negatives_per_sample": self.config.negatives_per_sample,
                "itm_temperature": self.config.temperature, "itm_negatives_from": self.config.negatives_from,
                "fusion_encoder": describe(self.fusion),
                "itm_scorer": "fusion_encoder/ (BlipTextModel + itm_head.safetensors; usage in its README.md)"}

    def save_pretrained(self, model, output_dir: str, processing_class=None) -> None:
        save_fusion(model, output_dir)


__all__ = ["WEIGHTS_NAME", "Itm", "ItmConfig", "draw_negatives", "step_generator"]
