"""Sigmoid (SigLIP) loss for image-text pairs: ring-chunked across processes, multi-positive by ids.

`sigmoid_loss` is the training loss; `dense_sigmoid_loss` is a plain single-process reference over a
whole (global) batch, written with ordinary autograd, for tests and for users who want to check.

Convention (DESIGN.md decision 2). Image i and text j are a positive pair iff their ids are equal,
wherever they live among the processes (without ids: text j of a process is the positive of image j
of the same process). With N the global number of images and W the number of processes, the global
loss is `L = -sum_{all i, all j} log sigmoid(z_ij (t x_i.y_j + b)) / N`. Each process returns
`W / N * (the same sum over its local images and all texts)`, so the mean of the returned values over
processes is L, and with equal local batches the value equals open_clip's `SigLipLoss`. The gradients
a process gets are W times the gradients of L w.r.t. its local embeddings, and W times its share of
dL/dt and dL/db: averaging over processes (what DDP does to parameter gradients) gives exactly the
gradient of L, also with unequal local batches. Backward assumes every process back-propagates the
same grad_output (1, or one common gradient-accumulation factor), as DDP training does.

How it runs: one autograd Function whose forward passes the text block (with its ids and whatever
options need) round the ring of processes, computes every (image tile x text tile) of logits in turn
and, while it holds the tile, the closed-form gradients w.r.t. image embeddings, text embeddings,
t and b; text gradients ride the ring with their block and end at their home process. Backward only
scales the saved gradients, so no collective runs inside autograd's backward. Memory per process is
O((n_images + n_texts) * d + tile^2), independent of the number of processes.

Imports torch only: it is copied beside the modeling file for `trust_remote_code` loading.
"""

import math
import zlib

import torch
import torch.nn.functional as F

from .loss_ring import Engine, RingContext, uniform_hash

__all__ = ["sigmoid_loss", "dense_sigmoid_loss", "SigmoidLoss", "NORMALIZATIONS", "NEGATIVE_SELECTIONS"]

NORMALIZATIONS = ("image", "text", "row")
NEGATIVE_SELECTIONS = ("random", "hard", "easy")
LOSS_TYPES = ("sigmoid", "softmax")
_DEFAULT_TILE = 1024


# ----------------------------------------------------------------------------------------------------
# Options and input checks
# ----------------------------------------------------------------------------------------------------


def _parse_options(options, caller="sigmoid_loss"):
    try:
        return _Options(**options)
    except TypeError as error:  # an unknown keyword: name it and list the known ones
        code = _Options.__init__.__code__
        known = code.co_varnames[1:code.co_argcount]
        raise TypeError(f"{caller}: {error}; known options: {', '.join(known)}, group") from None


class _Options:
    """The keyword options of `sigmoid_loss`, validated; `fingerprint` must agree across processes."""

    def __init__(
        self,
        normalize="image",
        tile_size=_DEFAULT_TILE,
        positive_targets=None,
        teacher=None,
        teacher_weight=0.4,
        negative_ratio=None,
        negative_selection="random",
        seed=0,
        mine_image_text=None,
        mine_image_image=None,
        mine_text_text=None,
        hard_negative_beta=None,
        loss_type="sigmoid",
    ):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not (isinstance(tile_size, int) and tile_size > 0):
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        if negative_ratio is not None and not negative_ratio > 0:
            raise ValueError(f"negative_ratio (kept negatives per positive) must be > 0, got {negative_ratio!r}")
        if negative_selection not in NEGATIVE_SELECTIONS:
            raise ValueError(f"negative_selection must be one of {NEGATIVE_SELECTIONS}, "
                             f"got {negative_selection!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        for name, value in (("mine_image_text", mine_image_text), ("mine_image_image", mine_image_image),
                            ("mine_text_text", mine_text_text)):
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} is a cosine-similarity threshold in [-1, 1] or None, got {value!r}")
        self.normalize = normalize
        self.tile_size = tile_size
        self.positive_targets = positive_targets
        if teacher is not None and not (isinstance(teacher, (tuple, list)) and len(teacher) == 4):
            raise ValueError("teacher must be (image_embeds, text_embeds, logit_scale, logit_bias) or None")
        if not 0.0 <= float(teacher_weight) <= 1.0:
            raise ValueError(f"teacher_weight must be in [0, 1], got {teacher_weight!r}")
        if teacher is not None and loss_type == "softmax":
            raise ValueError("teacher (momentum distillation) targets apply to loss_type='sigmoid' only")
        self.teacher = None if teacher is None else tuple(teacher)
        self.teacher_weight = float(teacher_weight)
        self.negative_ratio = None if negative_ratio is None else float(negative_ratio)
        self.negative_selection = negative_selection
        self.seed = int(seed)
        self.mine_image_text = None if mine_image_text is None else float(mine_image_text)
        self.mine_image_image = None if mine_image_image is None else float(mine_image_image)
        self.mine_text_text = None if mine_text_text is None else float(mine_text_text)
        self.hard_negative_beta = None if hard_negative_beta is None else float(hard_negative_beta)
        self.loss_type = loss_type
        if loss_type == "softmax" and (negative_ratio is not None or hard_negative_beta is not None
                                       or normalize != "image"):
            raise ValueError("negative masking, hard-negative weights and normalize apply to loss_type='sigmoid' "
                             "only (the softmax loss averages each row over its positives, then over rows)")

    @property
    def mining(self):
        return any(v is not None for v in (self.mine_image_text, self.mine_image_image, self.mine_text_text))

    def fingerprint(self):
        """A process-independent hash of every option that changes the math (not tile_size)."""
        key = repr((self.normalize, self.positive_targets is not None, self.teacher is not None,
                    self.teacher_weight if self.teacher is not None else None, self.negative_ratio,
                    self.negative_selection, self.seed, self.mine_image_text, self.mine_image_image,
                    self.mine_text_text, self.hard_negative_beta, self.loss_type))
        return zlib.crc32(key.encode())


def _local_problem(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids, options):
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
    targets = options.positive_targets
    if targets is not None:
        if not (torch.is_tensor(targets) and targets.dim() == 1 and targets.shape[0] == text_embeds.shape[0]):
            return "positive_targets must be a 1-d tensor with one value per local text"
    if options.teacher is not None:
        t_images, t_texts, t_scale, t_bias = options.teacher
        if not (torch.is_tensor(t_images) and torch.is_tensor(t_texts) and t_images.dim() == 2
                and t_texts.dim() == 2 and t_images.shape[1] == t_texts.shape[1]):
            return "teacher embeddings must be two 2-d tensors with the same dim"
        if t_images.shape[0] != image_embeds.shape[0] or t_texts.shape[0] != text_embeds.shape[0]:
            return "teacher embeddings must have one row per local image / text"
        if not all(torch.is_tensor(v) and v.numel() == 1 for v in (t_scale, t_bias)):
            return "teacher logit_scale and logit_bias must be one-element tensors"
    return None


def _handshake(ctx, image_embeds, text_embeds, image_ids, options, problem):
    """Exchange sizes and checks; raise the same error on every process if any process is wrong."""
    d = image_embeds.shape[1] if problem is None else -1
    n_i = image_embeds.shape[0] if problem is None else -1
    n_t = text_embeds.shape[0] if problem is None else -1
    meta = ctx.all_gather_ints([int(problem is not None), n_i, n_t, d, int(image_ids is not None),
                                options.fingerprint()], image_embeds.device if torch.is_tensor(image_embeds)
                               else "cpu").tolist()
    bad = [r for r, m in enumerate(meta) if m[0]]
    if bad:
        if problem is not None:
            raise ValueError(f"sigmoid_loss: process {ctx.rank}: {problem}")
        raise ValueError(f"sigmoid_loss: invalid inputs on process(es) {bad} (see their error)")
    reasons = []
    if len({m[3] for m in meta}) > 1:
        reasons.append(f"embedding dims differ across processes: {[m[3] for m in meta]}")
    if len({m[4] for m in meta}) > 1:
        reasons.append("some processes passed ids and others did not")
    if len({m[5] for m in meta}) > 1:
        reasons.append("loss options differ across processes")
    empty = [r for r, m in enumerate(meta) if m[1] == 0 or m[2] == 0]
    if empty:
        reasons.append(f"process(es) {empty} have zero images or texts; every process needs at least one row")
    if reasons:
        raise ValueError("sigmoid_loss: " + "; ".join(reasons))
    return [m[1] for m in meta], [m[2] for m in meta]


# ----------------------------------------------------------------------------------------------------
# Dense reference
# ----------------------------------------------------------------------------------------------------


def dense_sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None,
                       **options):
    """Reference loss over one whole batch in one process, with the full logits matrix and autograd.

    Same arguments and options as `sigmoid_loss` (no `group`), but the embeddings are the global
    batch. Returns the global loss L (see the module docstring). Quadratic memory: for tests and
    checks, not for training.
    """
    opts = _parse_options({k: v for k, v in options.items() if k != "tile_size"}, "dense_sigmoid_loss")
    if logit_bias is None and torch.is_tensor(logit_scale):
        logit_bias = torch.zeros((), dtype=logit_scale.dtype, device=logit_scale.device)
    problem = _local_problem(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids, opts)
    if problem is not None:
        raise ValueError(f"dense_sigmoid_loss: {problem}")
    x, y = image_embeds.float(), text_embeds.float()
    t, b = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    n_i, n_t = x.shape[0], y.shape[0]
    if image_ids is None:
        image_ids = torch.arange(n_i, device=x.device)
        text_ids = torch.arange(n_t, device=x.device)
    image_ids, text_ids = image_ids.long(), text_ids.long()
    cosine = x @ y.T
    logits = t * cosine + b
    positive = image_ids[:, None] == text_ids[None, :]
    with torch.no_grad():
        if opts.mine_image_text is not None:
            positive = positive | (cosine >= opts.mine_image_text)
        if opts.mine_image_image is not None:
            # image i meets text j if i resembles an image that carries j's id
            similar = (x @ x.T) >= opts.mine_image_image
            owner = image_ids[:, None] == text_ids[None, :]
            positive = positive | ((similar.double() @ owner.double()) > 0)
        if opts.mine_text_text is not None:
            # image i meets text j if j resembles a text that carries i's id
            similar = (y @ y.T) >= opts.mine_text_text
            owner = image_ids[:, None] == text_ids[None, :]
            positive = positive | ((owner.double() @ similar.double()) > 0)
    target = positive.float()
    if opts.positive_targets is not None:
        target = target * opts.positive_targets.float()[None, :]
    if opts.teacher is not None:
        with torch.no_grad():
            t_images, t_texts, t_scale, t_bias = [v.detach().float() for v in opts.teacher]
            teacher_probability = torch.sigmoid(t_scale.reshape(()) * t_images @ t_texts.T + t_bias.reshape(()))
        target = (1.0 - opts.teacher_weight) * target + opts.teacher_weight * teacher_probability
    row_positives = positive.sum(1).clamp(min=1).float()

    if opts.loss_type == "softmax":
        col_positives = positive.sum(0).clamp(min=1).float()
        logits = t * cosine  # the bias cancels in a softmax
        row_term = -(target * F.log_softmax(logits, dim=1)).sum(1) / row_positives
        col_term = -(target * F.log_softmax(logits, dim=0)).sum(0) / col_positives
        return 0.5 * (row_term.sum() / n_i + col_term.sum() / n_t)

    weight = torch.ones_like(logits)
    with torch.no_grad():
        negative = ~positive
        if opts.hard_negative_beta is not None:
            # HN-NCE importance weights on negatives, mean 1 over each row's negatives; constants
            scores = (opts.hard_negative_beta * cosine).masked_fill(positive, -math.inf)
            n_neg = negative.sum(1, keepdim=True).float()
            weight = torch.where(negative, n_neg * torch.softmax(scores, dim=1), weight)
            weight = torch.nan_to_num(weight, nan=1.0)
        if opts.negative_ratio is not None:
            quota = (opts.negative_ratio * positive.sum(1)).floor().long()  # kept negatives per row
            if opts.negative_selection == "random":
                n_neg = negative.sum(1).clamp(min=1)
                keep_prob = (quota.double() / n_neg.double()).clamp(max=1.0)
                draw = uniform_hash(torch.arange(n_i, device=x.device), torch.arange(n_t, device=x.device),
                                     opts.seed)
                keep = draw < keep_prob[:, None]
            else:
                sign = 1.0 if opts.negative_selection == "hard" else -1.0
                ranked = (sign * logits).masked_fill(positive, -math.inf)
                order = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
                keep = order < quota[:, None]
            weight = weight * (positive | (negative & keep)).float()
    if opts.normalize == "row":
        weight = weight / row_positives[:, None]
    per_pair = weight * (F.softplus(logits) - target * logits)
    denominator = n_t if opts.normalize == "text" else n_i
    return per_pair.sum() / denominator


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None, *,
                 group=None, **options):
    """SigLIP sigmoid loss of this process's images against the texts of every process.

    Args:
        image_embeds: (n_images, d) local, L2-normalised image embeddings.
        text_embeds: (n_texts, d) local, L2-normalised text embeddings.
        logit_scale: t, already exponentiated (one-element tensor). logit_bias: b (one-element tensor,
            or None for no bias).
        image_ids, text_ids: integer ids (1-d, one per row). Image i and text j are positives iff their
            ids are equal, on whichever processes they live. Without ids, text j of a process is the
            positive of image j of the same process (n_images must equal n_texts).
        group: the process group to run the ring on (default: the default group when
            torch.distributed is initialised; without it the loss is a plain single-process loss).
            Every process of the group must make the call, with the same options (checked: a
            mismatch, a bad input or an empty process raises the same ValueError everywhere).
        normalize: "image" (default; divide by the global image count, the paper's form), "text"
            (by the global text count) or "row" (each image row also divided by its positive count).
        tile_size: side of the logits tiles held at once (default 1024); does not change the result.
        positive_targets: (n_texts,) soft targets in [0, 1] for each text's positive pairs (1 = hard
            positive), e.g. momentum-distillation confidences; negatives keep target 0.
        teacher, teacher_weight: momentum distillation (ALBEF): teacher = (image_embeds, text_embeds,
            logit_scale, logit_bias) of this process's rows from a momentum/EMA model (constants);
            every pair's target becomes (1 - w) * its target + w * sigmoid(teacher logit), w =
            teacher_weight (default 0.4). The teacher's text embeddings travel with the text block.
        negative_ratio, negative_selection, seed: keep only floor(ratio * positives) negatives per
            image row (SigLIP sec. 4.8), chosen "random" (hash of global indices and seed), "hard"
            (highest logits) or "easy" (lowest logits); the others are masked out of the loss.
        mine_image_text, mine_image_image, mine_text_text: FFF in-batch positive mining thresholds on
            cosine similarity (None = off), over the whole global batch: (i, j) also becomes positive
            if cos(x_i, y_j) >= mine_image_text; if some image i' carrying j's id has
            cos(x_i, x_i') >= mine_image_image; if some text j' carrying i's id has
            cos(y_j', y_j) >= mine_text_text. Mined positives count everywhere ids do (row counts,
            masking, softmax). Image-image and text-text mining each cost one extra ring pass.
        hard_negative_beta: HN-NCE style importance weights on negatives, w_ij proportional to
            exp(beta * cos_ij), mean 1 over each row's negatives (constants, no gradient through them).
        loss_type: "sigmoid" (default) or "softmax": symmetric InfoNCE through the same ids,
            `(mean_i -sum_{j in P_i} log softmax_j(t x_i.y_j) / |P_i| + the same per text) / 2`;
            it ignores logit_bias (zero gradient) and takes no normalize/masking/weights option.
            Options that need row statistics (row counts under mining, hard/easy masking,
            hard-negative weights, softmax) add one ring pass of logits each.

    Returns the fp32 scalar `W / N * sum_{local images i, all texts j} loss_ij`; see the module
    docstring for why its process average and gradients equal those of the global loss.
    """
    opts = _parse_options(options)
    if logit_bias is None and torch.is_tensor(logit_scale):  # a model without a learnt bias
        logit_bias = torch.zeros((), dtype=logit_scale.dtype, device=logit_scale.device)
    ring = RingContext(group)
    problem = _local_problem(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids, opts)
    if ring.world == 1:
        if problem is not None:
            raise ValueError(f"sigmoid_loss: {problem}")
        image_sizes, text_sizes = [image_embeds.shape[0]], [text_embeds.shape[0]]
        if image_sizes[0] == 0 or text_sizes[0] == 0:
            raise ValueError("sigmoid_loss: zero images or texts")
    else:
        image_sizes, text_sizes = _handshake(ring, image_embeds, text_embeds, image_ids, opts, problem)
    if image_ids is None:  # classic pairing: positions become global ids
        offset = sum(image_sizes[: ring.rank])
        image_ids = torch.arange(image_sizes[ring.rank], device=image_embeds.device) + offset
        text_ids = image_ids
    device = image_embeds.device
    engine = Engine(ring, opts, image_sizes, text_sizes, image_ids.to(device, torch.long),
                    text_ids.to(device, torch.long))
    return engine.apply(image_embeds, text_embeds, logit_scale, logit_bias)


class SigmoidLoss(torch.nn.Module):
    """`sigmoid_loss` with its options fixed at construction (open_clip's `SigLipLoss` style)."""

    def __init__(self, group=None, **options):
        super().__init__()
        _parse_options(options, "SigmoidLoss")  # fail early on bad options
        self.group, self.options = group, options

    def forward(self, image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None):
        return sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids,
                            group=self.group, **self.options)
