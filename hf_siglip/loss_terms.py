"""The loss options as per-tile terms (decision 8 in docs/ARCHITECTURE.md): what `sigmoid_loss` computes, written once.

A `Tile` is a block of pairs: some local images (rows) against some texts (columns), with their logits
`l = t x.y + b`, positives, global indices, the row/column statistics the active terms asked for and the
per-image/per-text inputs (soft targets, teacher embeddings) by name. A term is a forward-only function of a tile:

- target terms turn the hard targets (1 for positives, 0 otherwise) into soft ones;
- weight terms give constant per-pair weights (normalisation, negative masking, hard-negative weights);
- the loss term (one per `loss_type`) gives the tile's share of the loss from targets and weights.

Targets and weights are constants; the loss term is differentiated by autograd, tile by tile, or gives its value
and gradient in closed form (`Term.gradient`: the sigmoid loss, fused for speed; the dense reference keeps autograd,
so the tests check one against the other). A statistic is a reduction over a whole row (all texts of the global
batch) or column (all images): a sum, a log-sum-exp or the k-th largest value of a per-pair expression. The ring
engine (`loss_ring`) computes statistics in passes before
the main one; the dense reference (`hf_siglip.loss.dense_sigmoid_loss`) computes everything on one tile holding
the whole batch. A differentiable statistic (the softmax normalisers) gets its part of the gradient from the
engine: the loss term's gradient with respect to it, summed over the row, times the statistic's own gradient.

Imports torch only (copied beside the modeling file for `trust_remote_code` loading).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .positives import tile_mask


def excluded(dtype):
    """Stands for a pair left out of a log-sum-exp: finite, so a row with nothing in it has gradient 0, not NaN."""
    return torch.finfo(dtype).min


class Tile:
    """One block of pairs and what terms may read. `positive` is built on first use (plain losses only
    gather the positives' logits, `positive_logits`)."""

    def __init__(self, logits, positive_index, rows, cols, n_images, n_texts, row=None, col=None, images=None,
                 texts=None, constants=None, cosine=None, mine_image_text=None, mining_cosine=None, positive=None,
                 positive_logits_leaf=False, mined_index=None, mined_image_text=None, mined=None):
        self.logits = logits  # (r, c) t x.y + b; the softmax loss has b = 0
        self.rows, self.cols = rows, cols  # global image / text indices (long)
        self.n_images, self.n_texts = n_images, n_texts  # global batch sizes
        self.row, self.col = row or {}, col or {}  # statistics: (r, 1) per row, (1, c) per column
        self.images, self.texts = images or {}, texts or {}  # inputs: (r, ...) per image, (c, ...) per text
        self.constants = constants or {}  # scalars (teacher logit scale and bias)
        self.cosine = cosine  # (r, c) x.y, constant; only when an active term uses it
        self._pairs = positive_index  # tile-local (rows, cols) of positives by ids and mined lists
        self._mine_image_text = mine_image_text
        self._mining_cosine = cosine if mining_cosine is None else mining_cosine  # the teacher's, with mine_with
        self._positive = positive  # given whole by the dense reference
        # mined_pairs="ignore": positives are the ids' alone; the pairs mining finds are kept apart (`mined`)
        self._mined_index, self._mined_image_text, self._mined = mined_index, mined_image_text, mined
        self._positive_logits_leaf = positive_logits_leaf
        self.positive_logits_leaf = None  # set when a term reads `positive_logits` as a leaf of its own
        self._positive_logits = None  # read once: a loss term with a gradient of its own overwrites the logits

    @property
    def positive(self):
        """(r, c) bool: positive pairs (ids, mining)."""
        if self._positive is None:
            self._positive = tile_mask(self.logits.shape, self._pairs, self._mining_cosine,
                                            self._mine_image_text)
        return self._positive

    @property
    def mined(self):
        """(r, c) bool, with mined_pairs="ignore": the pairs mining found that the ids do not make positive."""
        if self._mined is None:
            found = tile_mask(self.logits.shape, self._mined_index, self._mining_cosine, self._mined_image_text)
            self._mined = found & ~self.positive
        return self._mined

    @property
    def positive_index(self):
        """Tile-local (rows, cols) of every positive."""
        if self._mine_image_text is None:
            return self._pairs
        return tuple(self.positive.nonzero().unbind(1))

    @property
    def positive_logits(self):
        """The positives' logits, in `positive_index` order. With `positive_logits_leaf` (the ring engine) a leaf of
        its own whose gradient the engine adds back at those positions: a sparse read then costs no dense
        gradient tile."""
        if not self._positive_logits_leaf:
            if self._positive_logits is None:
                self._positive_logits = self.logits[self.positive_index]
            return self._positive_logits
        if self.positive_logits_leaf is None:
            self.positive_logits_leaf = self.logits.detach()[self.positive_index].requires_grad_()
        return self.positive_logits_leaf

    def hard_targets(self):
        return self.positive.to(self.logits.dtype)


# ----------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statistic:
    """A reduction over a whole row (axis "row") or column ("col") of `values(tile, config)`: "sum",
    "logsumexp" or "top_k" (per row, the k(row statistics, config)-th largest value; +inf when k = 0)."""

    name: str
    axis: str
    reduce: str
    values: Callable
    differentiable: bool = False  # the loss depends on it through the logits (the engine adds that gradient)
    needs: tuple = ()  # statistics that must be known first (they get an earlier pass)
    k: Callable | None = None
    uses_cosine: bool = False


@dataclass(frozen=True)
class Term:
    name: str
    kind: str  # "target", "weight" or "loss"
    fn: Callable
    active: Callable  # (config, inputs) -> bool; inputs: the names of the given tensor inputs
    statistics: tuple = ()
    uses_cosine: bool = False
    uses_bias: bool = True  # False: logits are t x.y (the bias cancels, its gradient is 0)
    # a loss term's value and gradient in closed form, fn(tile, target, weight, config, workspace) ->
    # (loss, coef, scale) with d loss / d logits = scale * coef; the ring engine then skips autograd
    gradient: Callable | None = None


STATISTICS: dict[str, Statistic] = {}
TERMS: list[Term] = []  # in order of application within a kind


def statistic(name, axis, reduce, **spec):
    def register(values):
        STATISTICS[name] = Statistic(name, axis, reduce, values, **spec)
        return values
    return register


def term(kind, active, **spec):
    def register(fn):
        TERMS.append(Term(fn.__name__, kind, fn, active, **spec))
        return fn
    return register


@dataclass(frozen=True)
class ActiveTerms:
    """The terms a call uses and the statistics they need, in the order they can be computed."""

    targets: tuple
    weights: tuple
    loss: Term
    statistics: tuple  # of tuples: one per pass, each computable once the earlier ones are known
    uses_cosine: bool
    uses_bias: bool

    @property
    def differentiable(self):
        return tuple(s for stage in self.statistics for s in stage if s.differentiable)


def select_terms(config, inputs=()) -> ActiveTerms:
    chosen = [t for t in TERMS if t.active(config, set(inputs))]
    (loss,) = [t for t in chosen if t.kind == "loss"]
    stage_of = {}

    def place(name):
        if name not in stage_of:
            stat = STATISTICS[name]
            stage_of[name] = 1 + max((place(need) for need in stat.needs), default=-1)
        return stage_of[name]

    for name in {name for t in chosen for name in t.statistics}:
        place(name)
    stages = tuple(tuple(STATISTICS[n] for n in sorted(stage_of) if stage_of[n] == s)
                   for s in range(1 + max(stage_of.values(), default=-1)))
    return ActiveTerms(
        targets=tuple(t for t in chosen if t.kind == "target"), weights=tuple(t for t in chosen if t.kind == "weight"),
        loss=loss, statistics=stages,
        uses_cosine=any(t.uses_cosine for t in chosen) or any(STATISTICS[n].uses_cosine for n in stage_of)
        or (config.mine_image_text is not None and config.mine_with == "model"),
        uses_bias=loss.uses_bias)


def _targets_and_weights(tile, config, terms: ActiveTerms):
    with torch.no_grad():
        target = None  # None: the hard targets (positives 1), which the plain loss reads sparsely
        for target_term in terms.targets:
            target = target_term.fn(tile, target, config)
        weight = 1.0
        for weight_term in terms.weights:
            weight = weight * weight_term.fn(tile, config)
    return target, weight


def tile_loss(tile, config, terms: ActiveTerms):
    """The tile's share of the loss and its pair weights (a float when every pair weighs the same)."""
    target, weight = _targets_and_weights(tile, config, terms)
    return terms.loss.fn(tile, target, weight, config), weight


def tile_loss_and_gradient(tile, config, terms: ActiveTerms, workspace):
    """With a loss term that has a closed-form `gradient`: (loss, weight, coef, scale), d loss / d logits = scale *
    coef. The tile's logits are overwritten (coef may be them); `workspace(name, shape)` gives a scratch tensor of that
    shape (at most the tile's), reused from tile to tile."""
    target, weight = _targets_and_weights(tile, config, terms)
    with torch.no_grad():
        loss, coef, scale = terms.loss.gradient(tile, target, weight, config, workspace)
    return loss, weight, coef, scale


# ----------------------------------------------------------------------------------------------------
# Reductions (one code path for the ring's running values and the dense reference's single tile)
# ----------------------------------------------------------------------------------------------------


def initial_value(stat: Statistic, n, dtype, device, k_max=1):
    if stat.reduce == "sum":
        return torch.zeros(n, dtype=dtype, device=device)
    if stat.reduce == "logsumexp":
        return torch.full((n,), excluded(dtype), dtype=dtype, device=device)
    return torch.full((n, k_max), -math.inf, dtype=dtype, device=device)


def reduce_tile(stat: Statistic, running, values):
    """Fold one tile's (r, c) values into the running reduction of its rows (r,) or columns (c,)."""
    dim = 1 if stat.axis == "row" else 0
    if stat.reduce == "sum":
        return running + values.sum(dim)
    if stat.reduce == "logsumexp":
        return torch.logaddexp(running, values.logsumexp(dim))
    return torch.cat([running, values], 1).topk(running.shape[1], dim=1).values


def finish(stat: Statistic, running, k=None):
    if stat.reduce != "top_k":
        return running
    kth = running.gather(1, (k - 1).clamp(min=0, max=running.shape[1] - 1)[:, None])[:, 0]
    return torch.where(k > 0, kth, torch.full_like(kth, math.inf))


def statistic_gradient(stat: Statistic, values, value):
    """d statistic / d values of one tile, for the engine's chain rule (log-sum-exp: the softmax weights)."""
    if stat.reduce == "logsumexp":
        return torch.exp(values - value)
    if stat.reduce == "sum":
        return torch.ones_like(values)
    raise ValueError(f"statistic {stat.name}: a {stat.reduce} reduction has no gradient")


def weighted_sum(weight, values):
    return values.sum() * weight if isinstance(weight, float) else (weight * values).sum()


def uniform_hash(row_index, col_index, seed):
    """Deterministic pseudo-uniform numbers in [0, 1) for every (row, col) pair of global indices, so
    the ring and the dense reference draw the same random negative mask whatever the layout."""
    salt = ((seed & 0xFFFFFFFF) * 0xC2B2AE3D + 0x165667B1) & 0xFFFFFFFF  # stays inside int64 below
    h = row_index[:, None] * 0x9E3779B1 + col_index[None, :] * 0x85EBCA77 + salt
    h = h & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    return h.to(torch.float64) / 4294967296.0


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------


@statistic("positives", "row", "sum")
def _row_positives(tile, config):
    return tile.hard_targets()


@statistic("col_positives", "col", "sum")
def _col_positives(tile, config):
    return tile.hard_targets()


@statistic("hard_negative_lse", "row", "logsumexp", uses_cosine=True)
def _hard_negative_lse(tile, config):
    return (config.sigmoid_hard_negative_beta * tile.cosine).masked_fill(tile.positive, excluded(tile.cosine.dtype))


def _kept_negatives(row, config):
    return (config.negative_ratio * row["positives"]).floor().long()


@statistic("negative_threshold", "row", "top_k", needs=("positives",), k=_kept_negatives)
def _negative_threshold(tile, config):
    """In sign * logit units (sign -1 for easy negatives): the kept negatives are those at or above it."""
    sign = 1.0 if config.negative_selection == "hard" else -1.0
    return (sign * tile.logits).masked_fill(tile.positive, -math.inf)


def _softmax_statistics(axis, prefix):
    """HN-NCE's normalisers along rows or columns: log-sum-exps of l over positives, of (1 + beta) l and of
    beta l over negatives (DiHT's weights w = n_neg exp(beta l) / sum_neg exp(beta l) make the denominator
    alpha sum_pos e^l + n_neg exp(lse_neg((1 + beta) l) - lse_neg(beta l)))."""
    def masked(values, tile, keep_positives):
        return values.masked_fill(~tile.positive if keep_positives else tile.positive, excluded(values.dtype))

    statistic(f"{prefix}softmax_positive_lse", axis, "logsumexp", differentiable=True)(
        lambda tile, config: masked(tile.logits, tile, True))
    statistic(f"{prefix}softmax_negative_lse", axis, "logsumexp", differentiable=True)(
        lambda tile, config: masked((1.0 + config.hn_nce_beta) * tile.logits, tile, False))
    statistic(f"{prefix}softmax_negative_beta_lse", axis, "logsumexp", differentiable=True)(
        lambda tile, config: masked(config.hn_nce_beta * tile.logits, tile, False))


_softmax_statistics("row", "")
_softmax_statistics("col", "col_")


# ----------------------------------------------------------------------------------------------------
# Terms
# ----------------------------------------------------------------------------------------------------


@term("target", lambda config, inputs: "positive_targets" in inputs)
def positive_targets(tile, target, config):
    """Soft targets in [0, 1] for each text's positive pairs (negatives keep 0)."""
    return (tile.hard_targets() if target is None else target) * tile.texts["positive_targets"][None, :]


@term("target", lambda config, inputs: "teacher_text_embeds" in inputs and config.teacher_weight > 0)
def teacher(tile, target, config):
    """ALBEF momentum distillation: (1 - w) target + w sigmoid(teacher logit), w = teacher_weight; the teacher's
    image embeddings come scaled by its t."""
    teacher_logits = torch.addmm(tile.constants["teacher_logit_bias"], tile.images["teacher_image_embeds"],
                                 tile.texts["teacher_text_embeds"].T)
    target = tile.hard_targets() if target is None else target
    return torch.lerp(target, torch.sigmoid(teacher_logits), config.teacher_weight)


def tensor_inputs(dtype, device, positive_targets=None, teacher=None):
    """Per-image inputs, per-text inputs and constants of the target terms, by name, in the compute dtype."""
    images, texts, constants = {}, {}, {}
    if positive_targets is not None:
        texts["positive_targets"] = positive_targets.detach().to(device, dtype)
    if teacher is not None:
        image_embeds, text_embeds, logit_scale, logit_bias = [v.detach().to(device, dtype) for v in teacher]
        images["teacher_image_embeds"] = image_embeds * logit_scale.reshape(())
        texts["teacher_text_embeds"] = text_embeds
        constants["teacher_logit_bias"] = logit_bias.reshape(())
    return images, texts, constants


@term("weight", lambda config, inputs: config.loss_type == "sigmoid")
def normalize(tile, config):
    """The loss divisor: the global image count, or the text count for normalize="text"."""
    return 1.0 / (tile.n_texts if config.normalize == "text" else tile.n_images)


@term("weight", lambda config, inputs: config.normalize == "row", statistics=("positives",))
def row_normalize(tile, config):
    """normalize="row": each image row also divided by its positive count (several positives weigh as one)."""
    return 1.0 / tile.row["positives"].clamp(min=1)


@term("weight", lambda config, inputs: config.ignores_mined_pairs)
def ignore_mined(tile, config):
    """mined_pairs="ignore": the pairs mining found leave the loss (weight 0), neither positive nor negative."""
    return (~tile.mined).to(tile.logits.dtype)


@term("weight", lambda config, inputs: config.sigmoid_hard_negative_beta is not None,
      statistics=("positives", "hard_negative_lse"), uses_cosine=True)
def sigmoid_hard_negative_weights(tile, config):
    """HN-NCE's importance weights adapted to the sigmoid loss: negatives weigh n_neg * softmax(beta cos) over
    the row's negatives (mean 1), positives 1. beta scales the cosine x.y (`tile.cosine`, detached: constant
    weights), where HN-NCE's `hn_nce_beta` scales the logit t x.y."""
    negatives = tile.n_texts - tile.row["positives"]
    weights = negatives * torch.exp(config.sigmoid_hard_negative_beta * tile.cosine - tile.row["hard_negative_lse"])
    return torch.where(tile.positive, torch.ones_like(weights), weights)


@term("weight", lambda config, inputs: config.negative_ratio is not None,
      statistics=("positives", "negative_threshold"))
def negative_mask(tile, config):
    """SigLIP section 4.8: keep floor(ratio * positives) negatives per row (random, hardest or easiest)."""
    if config.negative_selection == "random":
        positives = tile.row["positives"].double()
        keep_probability = (_kept_negatives(tile.row, config).double()
                            / (tile.n_texts - positives).clamp(min=1)).clamp(max=1.0)
        keep = uniform_hash(tile.rows, tile.cols, config.seed) < keep_probability
    else:
        sign = 1.0 if config.negative_selection == "hard" else -1.0
        keep = sign * tile.logits >= tile.row["negative_threshold"]
    return (tile.positive | keep).to(tile.logits.dtype)


_CHUNK = 1 << 18  # elements per row chunk of the fused sigmoid's elementwise passes: its scratch stays in cache


def _rows(value, start, stop):
    """Rows start:stop of a per-pair value of the tile, which may be a float or broadcast along the rows."""
    return value if isinstance(value, float) or value.shape[0] == 1 else value[start:stop]


def _sigmoid_gradient(tile, target, weight, config, workspace):
    """`sigmoid`'s value and its gradient coef = w (sigmoid(l) - y), fused: with u = -l (in place), one log-sigmoid
    pass gives -softplus(l) = log sigmoid(u) and keeps exp(-|u|), from which its backward gives sigmoid(l) without a
    second exp, written over the tile's logits; the same kernels as `F.logsigmoid` and its autograd gradient. The
    passes run on chunks of rows, so their two scratch arrays (`workspace`) stay small and in cache."""
    sparse = target is None and isinstance(weight, float)  # hard targets: only the positives' logits are read
    positive_logits = tile.positive_logits if sparse else None  # read before the logits go
    target = None if sparse else (tile.hard_targets() if target is None else target)
    negated = tile.logits.neg_()
    n_rows, n_cols = negated.shape
    step = max(1, _CHUNK // max(n_cols, 1))
    one = torch.ones((), dtype=negated.dtype, device=negated.device)
    loss = None
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        u = negated[start:stop]
        log_sigmoid, exp_abs = workspace("log_sigmoid", u.shape), workspace("exp_abs", u.shape)
        torch.ops.aten.log_sigmoid_forward.output(u, output=log_sigmoid, buffer=exp_abs)
        if sparse:
            part = log_sigmoid.sum()
        else:  # -(softplus(l) - y l) = log sigmoid(u) - y u
            part = weighted_sum(_rows(weight, start, stop),
                                log_sigmoid.addcmul_(_rows(target, start, stop), u, value=-1))
        loss = part if loss is None else loss + part
        torch.ops.aten.log_sigmoid_backward.grad_input(one.expand(u.shape), u, exp_abs, grad_input=u)
    coef = negated  # now sigmoid(l)
    if sparse:
        loss = (-loss - positive_logits.sum()) * weight
        return loss, coef.index_put_(tile.positive_index, -one, accumulate=True), weight
    coef.sub_(target)
    if isinstance(weight, float):
        return -loss, coef, weight
    return -loss, coef.mul_(weight), 1.0


@term("loss", lambda config, inputs: config.loss_type == "sigmoid", gradient=_sigmoid_gradient)
def sigmoid(tile, target, weight, config):
    """-log sigmoid(z l) = softplus(l) - y l, y the pair's target (z = 2y - 1 for hard targets)."""
    logits = tile.logits
    if target is None and isinstance(weight, float):  # hard targets: only the positives' logits are read
        return (F.softplus(logits).sum() - tile.positive_logits.sum()) * weight
    target = tile.hard_targets() if target is None else target
    return weighted_sum(weight, F.softplus(logits) - target * logits)


def _log_denominator(alpha, positive_lse, negative_lse, negative_beta_lse, n_negatives):
    """log(alpha sum_pos e^l + sum_neg w e^l) from the statistics (-inf parts for empty sets)."""
    negatives = torch.where(n_negatives > 0, torch.log(n_negatives) + negative_lse - negative_beta_lse, -math.inf)
    if alpha == 0:
        return negatives
    return torch.logaddexp(math.log(alpha) + positive_lse, negatives)


@term("loss", lambda config, inputs: config.loss_type == "softmax", uses_bias=False,
      statistics=("positives", "col_positives", "softmax_positive_lse", "softmax_negative_lse",
                  "softmax_negative_beta_lse", "col_softmax_positive_lse", "col_softmax_negative_lse",
                  "col_softmax_negative_beta_lse"))
def softmax(tile, target, weight, config):
    """HN-NCE (DiHT), both directions, InfoNCE at alpha = 1, beta = 0, through ids: for image i,
    sum_{j in P_i} y_ij (log D_i - l_ij) / |P_i| with D_i = alpha sum_{P_i} e^l + sum_{not P_i} w_ij e^l, the same
    per text, averaged over images and texts and the two directions halved (CLIP's convention)."""
    logits = tile.logits
    target = tile.hard_targets() if target is None else target
    alpha = config.hn_nce_alpha
    row, col = tile.row, tile.col
    row_positives, col_positives = row["positives"], col["col_positives"]
    row_denominator = _log_denominator(alpha, row["softmax_positive_lse"], row["softmax_negative_lse"],
                                       row["softmax_negative_beta_lse"], tile.n_texts - row_positives)
    col_denominator = _log_denominator(alpha, col["col_softmax_positive_lse"], col["col_softmax_negative_lse"],
                                       col["col_softmax_negative_beta_lse"], tile.n_images - col_positives)
    row_loss = (target / row_positives.clamp(min=1) * (row_denominator - logits)).sum() / (2 * tile.n_images)
    col_loss = (target / col_positives.clamp(min=1) * (col_denominator - logits)).sum() / (2 * tile.n_texts)
    return row_loss + col_loss


__all__ = [
    "STATISTICS",
    "TERMS",
    "ActiveTerms",
    "Statistic",
    "Term",
    "Tile",
    "select_terms",
    "tensor_inputs",
    "tile_loss",
    "tile_loss_and_gradient",
]
