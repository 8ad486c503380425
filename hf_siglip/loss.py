"""Sigmoid (SigLIP) loss for image-text pairs: ring-chunked across processes, multi-positive by ids.

`sigmoid_loss` is the training loss; `dense_sigmoid_loss` is a plain single-process reference over a
whole (global) batch, written with ordinary autograd, for tests and for users who want to check. Settings are a
`SiglipLossConfig` (or its fields as keyword arguments); positives follow `hf_siglip.positives.positive_pairs`.

Convention (decision 2 in docs/ARCHITECTURE.md). Image i and text j are a positive pair iff their ids are equal,
wherever they live among the processes (without ids: text j of a process is the positive of image j
of the same process), or mining adds them. With N the global number of images and W the number of processes, the
global loss is `L = -sum_{all i, all j} log sigmoid(z_ij (t x_i.y_j + b)) / N`. Each process returns
`W * (its share: the same sum over its local images and all texts, / N)`, so the mean of the returned values over
processes is L, and with equal local batches the value equals open_clip's `SigLipLoss`. The gradients
a process gets are W times the gradients of its share w.r.t. its local embeddings, and W times its share of
dL/dt and dL/db: averaging over processes (what DDP does to parameter gradients) gives exactly the
gradient of L, also with unequal local batches. Backward assumes every process back-propagates the
same grad_output (1, or one common gradient-accumulation factor), as DDP training does. The loss computes in fp32,
or in the inputs' dtype when it is wider (fp64 stays fp64).

How it runs (`loss_ring`): one autograd Function whose forward carries each text block (with its ids and
per-text inputs) round the ring of processes and, tile by tile, evaluates the loss terms (`loss_terms`) and their
gradient with respect to the tile's logits, turning it into embedding, t and b gradients while it holds the tile;
text gradients ride the ring home with their block. Backward only scales the saved gradients. Memory per process
is O((n_images + n_texts) * d + tile^2), independent of the number of processes.

Adding an option: write one term in `loss_terms` (a forward-only function of a `Tile`: its logits, positives,
row/column statistics and named inputs; a target, a weight or a loss, registered with `@term(kind, active)`, and
any statistic it reads with `@statistic`) and add its setting as one field of `SiglipLossConfig`. The ring
engine, the dense reference, the gradients (autograd, per tile), recipes and the command line pick it up.

Imports torch only: it is copied beside the modeling file for `trust_remote_code` loading.
"""

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .loss_config import NEGATIVE_SELECTIONS, NORMALIZATIONS, SiglipLossConfig
from .loss_ring import Engine, RingContext, _RingLoss
from .loss_terms import (
    Tile,
    finish,
    initial_value,
    reduce_tile,
    select_terms,
    tensor_inputs,
    tile_loss,
)
from .positives import positive_pairs

__all__ = [
    "NEGATIVE_SELECTIONS",
    "NORMALIZATIONS",
    "LossStatistics",
    "SiglipLossConfig",
    "SigmoidLoss",
    "Teacher",
    "dense_sigmoid_loss",
    "sigmoid_loss",
]


class Teacher(NamedTuple):
    """A momentum (EMA) model's outputs for this process's rows: constants for the distillation targets."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor  # t, exponentiated
    logit_bias: torch.Tensor


@dataclass
class LossStatistics:
    """What the loss saw in the global batch (for logging)."""

    positives_per_image: float  # positive pairs per image, mined ones included (unless mined_pairs='ignore')
    mined_positives_per_image: float  # pairs mining added beyond the ids' (positives, or ignored: mined_pairs)
    logit_positive_mean: float  # mean logit of positive pairs (nan without any)
    logit_negative_mean: float  # mean logit of the other pairs (nan without any)
    pairs_per_image: float  # pairs in the loss per image (fewer than the texts under negative masking)


# ----------------------------------------------------------------------------------------------------
# Settings and input checks
# ----------------------------------------------------------------------------------------------------


def _settings(config, settings, caller):
    """The call's SiglipLossConfig: `config` (or the defaults) with keyword settings on top."""
    config = SiglipLossConfig.from_value(config, caller)
    if not settings:
        return config
    SiglipLossConfig.check_names(settings, caller)
    return dataclasses.replace(config, **settings)


def _compute_dtype(*tensors):
    dtype = torch.float32
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _local_problem(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids, positive_targets,
                   teacher):
    """The first thing wrong with this process's inputs, as a message, or None."""
    if not (torch.is_tensor(image_embeds) and image_embeds.dim() == 2):
        return "image_embeds must be a 2-d tensor (n_images x d)"
    if not (torch.is_tensor(text_embeds) and text_embeds.dim() == 2):
        return "text_embeds must be a 2-d tensor (n_texts x d)"
    if image_embeds.shape[1] != text_embeds.shape[1]:
        return f"image and text embedding dims differ: {image_embeds.shape[1]} vs {text_embeds.shape[1]}"
    if not (image_embeds.is_floating_point() and text_embeds.is_floating_point()):
        return "embeddings must be floating point"
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if not (torch.is_tensor(value) and value.numel() == 1):
            return f"{name} must be a tensor with one element"
    if (image_ids is None) != (text_ids is None):
        return "pass both image_ids and text_ids, or neither"
    if image_ids is None:
        if image_embeds.shape[0] != text_embeds.shape[0]:
            return (f"without ids, text j is the positive of image j, so the local counts must match "
                    f"(got {image_embeds.shape[0]} images and {text_embeds.shape[0]} texts); pass ids")
    else:
        for name, ids, n in (("image_ids", image_ids, image_embeds.shape[0]),
                             ("text_ids", text_ids, text_embeds.shape[0])):
            if not torch.is_tensor(ids) or ids.dim() != 1:
                return f"{name} must be a 1-d tensor"
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                return f"{name} must hold integers, got {ids.dtype}"
            if ids.shape[0] != n:
                return f"{name} has {ids.shape[0]} entries for {n} embeddings"
    if positive_targets is not None and not (torch.is_tensor(positive_targets) and positive_targets.dim() == 1
                                             and positive_targets.shape[0] == text_embeds.shape[0]):
        return "positive_targets must be a 1-d tensor with one value per local text"
    if teacher is not None:
        if not (isinstance(teacher, tuple) and len(teacher) == 4):
            return "teacher must be a Teacher(image_embeds, text_embeds, logit_scale, logit_bias)"
        t_images, t_texts, t_scale, t_bias = teacher
        if not (torch.is_tensor(t_images) and torch.is_tensor(t_texts) and t_images.dim() == 2
                and t_texts.dim() == 2 and t_images.shape[1] == t_texts.shape[1]):
            return "teacher embeddings must be two 2-d tensors with the same dim"
        if t_images.shape[0] != image_embeds.shape[0] or t_texts.shape[0] != text_embeds.shape[0]:
            return "teacher embeddings must have one row per local image / text"
        if not all(torch.is_tensor(v) and v.numel() == 1 for v in (t_scale, t_bias)):
            return "teacher logit_scale and logit_bias must be one-element tensors"
    return None


def _handshake(ring, image_embeds, text_embeds, image_ids, fingerprint, problem):
    """Exchange sizes and checks; raise the same error on every process if any process is wrong."""
    d = image_embeds.shape[1] if problem is None else -1
    n_i = image_embeds.shape[0] if problem is None else -1
    n_t = text_embeds.shape[0] if problem is None else -1
    device = image_embeds.device if torch.is_tensor(image_embeds) else "cpu"
    meta = ring.all_gather_ints([int(problem is not None), n_i, n_t, d, int(image_ids is not None), fingerprint],
                                device).tolist()
    bad = [r for r, m in enumerate(meta) if m[0]]
    if bad:
        if problem is not None:
            raise ValueError(f"sigmoid_loss: process {ring.rank}: {problem}")
        raise ValueError(f"sigmoid_loss: invalid inputs on process(es) {bad} (see their error)")
    reasons = []
    if len({m[3] for m in meta}) > 1:
        reasons.append(f"embedding dims differ across processes: {[m[3] for m in meta]}")
    if len({m[4] for m in meta}) > 1:
        reasons.append("some processes passed ids and others did not")
    if len({m[5] for m in meta}) > 1:
        reasons.append("loss settings or inputs (positive_targets, teacher) differ across processes")
    empty = [r for r, m in enumerate(meta) if m[1] == 0 or m[2] == 0]
    if empty:
        reasons.append(f"process(es) {empty} have zero images or texts; every process needs at least one row")
    if reasons:
        raise ValueError("sigmoid_loss: " + "; ".join(reasons))
    return [m[1] for m in meta], [m[2] for m in meta]


def _prepare(caller, config, settings, image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids,
             positive_targets, teacher):
    config = _settings(config, settings, caller)
    if logit_bias is None and torch.is_tensor(logit_scale):  # a model without a learnt bias
        logit_bias = torch.zeros((), dtype=logit_scale.dtype, device=logit_scale.device)
    if teacher is not None and isinstance(teacher, (tuple, list)) and len(teacher) == 4:
        teacher = Teacher(*teacher)
    problem = _local_problem(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids,
                             positive_targets, teacher)
    if problem is None and teacher is not None and config.loss_type != "sigmoid" and config.teacher_weight > 0:
        problem = "teacher (momentum distillation) targets are sigmoid probabilities: loss_type='sigmoid' only"
    if problem is None and teacher is None and config.mining and config.mine_with == "teacher":
        problem = "loss_config.mine_with='teacher' mines with the teacher's embeddings: pass `teacher`"
    return config, logit_bias, teacher, problem


def _mining_embeddings(config, teacher, dtype):
    """The (image, text) embeddings the mining rules compare when they are the teacher's (None: the inputs)."""
    if not (config.mining and config.mine_with == "teacher"):
        return None
    return teacher.image_embeds.detach().to(dtype), teacher.text_embeds.detach().to(dtype)


# ----------------------------------------------------------------------------------------------------
# Dense reference
# ----------------------------------------------------------------------------------------------------


def dense_sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None, *,
                       config=None, positive_targets=None, teacher=None, **settings):
    """Reference loss over one whole batch in one process: the same terms on one tile holding every pair, the
    statistics reduced over it, gradients by ordinary autograd (through the softmax normalisers too).

    Same arguments as `sigmoid_loss` (no `group`), but the embeddings are the global batch. Returns the global
    loss L (see the module docstring). Quadratic memory: for tests and checks, not for training.
    """
    config, logit_bias, teacher, problem = _prepare(
        "dense_sigmoid_loss", config, settings, image_embeds, text_embeds, logit_scale, logit_bias, image_ids,
        text_ids, positive_targets, teacher)
    if problem is not None:
        raise ValueError(f"dense_sigmoid_loss: {problem}")
    dtype = _compute_dtype(image_embeds, text_embeds, logit_scale, logit_bias)
    x, y = image_embeds.to(dtype), text_embeds.to(dtype)
    t, b = logit_scale.to(dtype).reshape(()), logit_bias.to(dtype).reshape(())
    n_i, n_t, device = x.shape[0], y.shape[0], x.device
    if image_ids is None:
        image_ids = text_ids = torch.arange(n_i, device=device)
    images, texts, constants = tensor_inputs(dtype, device, positive_targets, teacher)
    terms = select_terms(config, {**images, **texts})
    cosine = x @ y.T
    logits = t * cosine + b if terms.uses_bias else t * cosine
    with torch.no_grad():
        found = positive_pairs(image_ids, text_ids, *(_mining_embeddings(config, teacher, dtype) or (x, y)),
                               **config.mining)
        positive, mined = found, None
        if config.ignores_mined_pairs:
            positive = positive_pairs(image_ids, text_ids)
            mined = found & ~positive
    tile = Tile(logits, tuple(positive.nonzero().unbind(1)), torch.arange(n_i, device=device),
                torch.arange(n_t, device=device), n_i, n_t, images=images, texts=texts, constants=constants,
                cosine=cosine.detach(), positive=positive, mined=mined)
    row_values = {}
    for stage in terms.statistics:
        for stat in stage:
            values = stat.values(tile, config)
            values = values if stat.differentiable else values.detach()
            k = stat.k(row_values, config) if stat.reduce == "top_k" else None
            k_max = max(1, min(int(k.max()), n_t)) if k is not None else 1
            running = initial_value(stat, n_i if stat.axis == "row" else n_t, dtype, device, k_max)
            value = finish(stat, reduce_tile(stat, running, values), k)
            if stat.axis == "row":
                row_values[stat.name] = value
                tile.row[stat.name] = value[:, None]
            else:
                tile.col[stat.name] = value[None, :]
    loss, _ = tile_loss(tile, config, terms)
    return loss


# ----------------------------------------------------------------------------------------------------
# The training loss
# ----------------------------------------------------------------------------------------------------


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None, *,
                 config=None, group=None, positive_targets=None, teacher=None, return_statistics=False,
                 **settings):
    """SigLIP sigmoid loss of this process's images against the texts of every process.

    Args:
        image_embeds: (n_images, d) local, L2-normalised image embeddings.
        text_embeds: (n_texts, d) local, L2-normalised text embeddings.
        logit_scale: t, already exponentiated (one-element tensor). logit_bias: b (one-element tensor,
            or None for no bias).
        image_ids, text_ids: integer ids (1-d, one per row). Image i and text j are positives iff their
            ids are equal, on whichever processes they live (or mining adds them: see `positive_pairs`).
            Without ids, text j of a process is the positive of image j of the same process (n_images must
            equal n_texts).
        config: a `SiglipLossConfig` (or a mapping of its fields); keyword `settings` (its field names, e.g.
            `normalize="row"`) override it.
        group: the process group to run the ring on (default: the default group when
            torch.distributed is initialised; without it the loss is a plain single-process loss).
            Every process of the group must make the call, with the same settings (checked: a
            mismatch, a bad input or an empty process raises the same ValueError everywhere).
        positive_targets: (n_texts,) soft targets in [0, 1] for each text's positive pairs (1 = hard
            positive); negatives keep target 0.
        teacher: momentum distillation (ALBEF): a `Teacher(image_embeds, text_embeds, logit_scale, logit_bias)`
            of this process's rows from a momentum/EMA model (constants); every pair's target becomes
            (1 - w) * its target + w * sigmoid(teacher logit), w = config.teacher_weight. The teacher's text
            embeddings travel with the text block.
        return_statistics: also return a `LossStatistics` of the global batch (one more small all-reduce).

    Returns the scalar `W * (this process's share of the loss)` (see the module docstring), in the compute dtype,
    and with `return_statistics` a `(loss, LossStatistics)` pair.
    """
    config, logit_bias, teacher, problem = _prepare(
        "sigmoid_loss", config, settings, image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids,
        positive_targets, teacher)
    ring = RingContext(group)
    inputs_given = [name for name, value in (("positive_targets", positive_targets), ("teacher", teacher))
                    if value is not None]
    if ring.world == 1:
        if problem is not None:
            raise ValueError(f"sigmoid_loss: {problem}")
        image_sizes, text_sizes = [image_embeds.shape[0]], [text_embeds.shape[0]]
        if image_sizes[0] == 0 or text_sizes[0] == 0:
            raise ValueError("sigmoid_loss: zero images or texts")
    else:
        fingerprint = zlib.crc32(repr((config.fingerprint(), inputs_given)).encode())
        image_sizes, text_sizes = _handshake(ring, image_embeds, text_embeds, image_ids, fingerprint, problem)
    device = image_embeds.device
    if image_ids is None:  # classic pairing: positions become global ids
        image_ids = torch.arange(image_sizes[ring.rank], device=device) + sum(image_sizes[: ring.rank])
        text_ids = image_ids
    dtype = _compute_dtype(image_embeds, text_embeds, logit_scale, logit_bias)
    inputs = tensor_inputs(dtype, device, positive_targets, teacher)
    terms = select_terms(config, {**inputs[0], **inputs[1]})
    leaves = (image_embeds, text_embeds, logit_scale, logit_bias)
    # without gradients (evaluation) only the logits product runs: a third of the work
    needs_grads = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    embeddings = (image_embeds.detach().to(dtype), text_embeds.detach().to(dtype),
                  logit_scale.detach().to(dtype).reshape(()), logit_bias.detach().to(dtype).reshape(()))
    engine = Engine(ring, config, terms, image_sizes, text_sizes, image_ids.to(device, torch.long),
                    text_ids.to(device, torch.long), embeddings, inputs, needs_grads, return_statistics,
                    (_mining_embeddings(config, teacher, dtype) or (None,))[0])
    loss = _RingLoss.apply(*leaves, engine)
    if not return_statistics:
        return loss
    return loss, _statistics(ring.all_reduce_sum(engine.statistics), sum(image_sizes), sum(text_sizes))


def _statistics(totals, n_images, n_texts):
    positives, positive_logits, all_logits, pairs, _, mined = totals.tolist()
    negatives = n_images * n_texts - positives
    return LossStatistics(positives_per_image=positives / n_images,
                          mined_positives_per_image=mined / n_images,
                          logit_positive_mean=positive_logits / positives if positives else math.nan,
                          logit_negative_mean=(all_logits - positive_logits) / negatives if negatives else math.nan,
                          pairs_per_image=pairs / n_images)


class SigmoidLoss(torch.nn.Module):
    """`sigmoid_loss` with its settings fixed at construction (open_clip's `SigLipLoss` style)."""

    def __init__(self, config=None, group=None, **settings):
        super().__init__()
        self.config = _settings(config, settings, "SigmoidLoss")  # fails early on bad settings
        self.group = group

    def forward(self, image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None, **inputs):
        return sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids,
                            config=self.config, group=self.group, **inputs)
