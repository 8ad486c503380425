"""Single-process tests of the sigmoid loss: the dense reference against a loop over pairs, the tiled
engine against the dense reference for every option (fp64, 1e-10), HN-NCE against InfoNCE and DiHT's formula,
the positive-pair rule against a loop, the returned statistics, open_clip parity, numerics and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import open_clip_siglip_loss_class
from hf_siglip import sigmoid_loss
from hf_siglip.loss import SiglipLossConfig, SigmoidLoss, Teacher, dense_sigmoid_loss
from hf_siglip.positives import positive_pairs

FP64_TOLERANCE = 1e-10


def _open_clip_siglip():
    loss_class = open_clip_siglip_loss_class()
    if loss_class is None:
        pytest.skip("open_clip not installed")
    return loss_class


def _unit(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _leaves(n_images=9, n_texts=9, d=16, seed=0, t=8.0, b=-5.0, dtype=torch.float32):
    x, y = _unit(n_images, d, seed, dtype), _unit(n_texts, d, seed + 1, dtype)
    k = min(n_images, n_texts) // 2
    y[:k] = F.normalize(y[:k] + x[:k], dim=1)  # some close pairs, so mining and hard negatives bite
    return [x.requires_grad_(), y.requires_grad_(), torch.tensor(t, dtype=dtype, requires_grad=True),
            torch.tensor(b, dtype=dtype, requires_grad=True)]


def _loss_and_grads(fn, leaves, *args, **kwargs):
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    loss = fn(*leaves, *args, **kwargs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # the softmax loss has no bias
    return loss.detach(), tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads))


def _assert_close(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=tol, atol=tol), (float(la), float(lb))
    for name, u, v in zip(("image", "text", "t", "b"), ga, gb):
        assert torch.allclose(u, v, rtol=tol, atol=tol), (name, float((u - v).abs().max()))


def test_dense_reference_matches_a_loop_over_pairs():
    x, y, t, b = [leaf.detach().double() for leaf in _leaves(4, 6, d=5)]
    image_ids, text_ids = torch.tensor([3, 1, 4, 1]), torch.tensor([1, 5, 9, 3, 4, 4])
    expected = 0.0
    for i in range(4):
        for j in range(6):
            z = 1.0 if image_ids[i] == text_ids[j] else -1.0
            logit = float(t) * float(x[i] @ y[j]) + float(b)
            expected += math.log1p(math.exp(-z * logit))
    got = dense_sigmoid_loss(x, y, t, b, image_ids, text_ids)
    assert got.dtype == torch.float64  # fp64 inputs are not cast down
    assert abs(float(got) - expected / 4) < FP64_TOLERANCE


def test_matches_open_clip_single_process():
    SigLipLoss = _open_clip_siglip()
    leaves = _leaves(12, 12)
    _assert_close(_loss_and_grads(sigmoid_loss, leaves, tile_size=5), _loss_and_grads(SigLipLoss(), leaves))


@pytest.mark.parametrize("tile_size", [1, 3, 4, 1024])
def test_tiling_does_not_change_the_result(tile_size):
    leaves = _leaves(11, 7)
    image_ids, text_ids = torch.arange(11) % 5, torch.tensor([0, 1, 1, 2, 3, 4, 4])
    _assert_close(_loss_and_grads(sigmoid_loss, leaves, image_ids, text_ids, tile_size=tile_size),
                  _loss_and_grads(dense_sigmoid_loss, leaves, image_ids, text_ids))


def test_ids_give_k_captions_per_image():
    leaves = _leaves(5, 15)
    image_ids = torch.tensor([10, 20, 30, 40, 50])
    text_ids = image_ids.repeat_interleave(3)
    got = _loss_and_grads(sigmoid_loss, leaves, image_ids, text_ids, tile_size=4)
    _assert_close(got, _loss_and_grads(dense_sigmoid_loss, leaves, image_ids, text_ids))
    # and the dense reference's positives are exactly the 3 captions of each image
    x, y, t, b = [leaf.detach() for leaf in leaves]
    logits = t * x @ y.T + b
    labels = torch.block_diag(*[torch.ones(1, 3)] * 5) * 2 - 1
    assert torch.allclose(got[0], -F.logsigmoid(labels * logits).sum() / 5, atol=1e-5)


OPTION_SETS = [
    {"normalize": "text"},
    {"normalize": "row"},
    {"positive_targets": "random"},
    {"negative_ratio": 2, "negative_selection": "random", "seed": 3},
    {"negative_ratio": 2, "negative_selection": "hard"},
    {"negative_ratio": 1.5, "negative_selection": "easy"},
    {"sigmoid_hard_negative_beta": 3.0},
    {"mine_image_text": 0.4},
    {"mine_image_image": 0.3},
    {"mine_text_text": 0.3},
    {"mine_image_text": 0.4, "mine_image_image": 0.3, "mine_text_text": 0.3, "normalize": "row"},
    {"mine_image_image": 0.3, "negative_ratio": 1.5, "negative_selection": "hard"},
    {"sigmoid_hard_negative_beta": 2.0, "negative_ratio": 3, "positive_targets": "random", "normalize": "row"},
    {"teacher": "random"},
    {"teacher": "random", "teacher_weight": 1.0, "positive_targets": "random", "mine_image_text": 0.4},
    {"loss_type": "softmax"},
    {"loss_type": "softmax", "positive_targets": "random"},
    {"loss_type": "softmax", "mine_image_text": 0.4, "mine_text_text": 0.3},
    {"loss_type": "softmax", "hn_nce_alpha": 0.5, "hn_nce_beta": 0.7},
    {"loss_type": "softmax", "hn_nce_alpha": 0.0, "hn_nce_beta": 1.5, "mine_image_image": 0.3},
    {"loss_type": "softmax", "hn_nce_beta": 0.5, "positive_targets": "random", "mine_image_image": 0.3},
]


def _with_tensors(options, n_images, n_texts, dtype):
    """Options with "random" placeholders replaced by tensors of this batch (soft targets, a teacher)."""
    options = dict(options)
    if options.get("positive_targets") == "random":
        options["positive_targets"] = torch.rand(n_texts, generator=torch.Generator().manual_seed(2), dtype=dtype)
    if options.get("teacher") == "random":  # a momentum model's embeddings, of another width
        options["teacher"] = Teacher(_unit(n_images, 5, 7, dtype), _unit(n_texts, 5, 8, dtype),
                                     torch.tensor(6.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype))
    return options


def _option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", OPTION_SETS, ids=_option_id)
def test_options_match_dense_reference(options):
    leaves = _leaves(10, 13, dtype=torch.float64)
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 8])
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 2, 5, 9])
    options = _with_tensors(options, 10, 13, torch.float64)
    got = _loss_and_grads(sigmoid_loss, leaves, image_ids, text_ids, tile_size=4, **options)
    want = _loss_and_grads(dense_sigmoid_loss, leaves, image_ids, text_ids, **options)
    _assert_close(got, want, tol=FP64_TOLERANCE)
    assert got[0].dtype == torch.float64 and all(g.dtype == torch.float64 for g in got[1])
    # an option that is on must change something compared with the plain loss
    plain = _loss_and_grads(dense_sigmoid_loss, leaves, image_ids, text_ids)
    assert not torch.allclose(got[0], plain[0])


def _info_nce(logits):
    """CLIP's loss: cross-entropy of each image over the texts and of each text over the images, halved."""
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _hn_nce_as_published(logits, alpha, beta):
    """DiHT's HN-NCE (one positive, the diagonal), written from the paper: negatives weighted by
    w_ij = (B - 1) exp(beta l_ij) / sum_{k != i} exp(beta l_ik) (per direction), the positive by alpha; the two
    directions halved as in `_info_nce`."""
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    losses = []
    for scores in (logits, logits.T):
        beta_exp = torch.exp(beta * scores).masked_fill(eye, 0.0)
        weights = (n - 1) * beta_exp / beta_exp.sum(1, keepdim=True)
        weights = torch.where(eye, torch.full_like(weights, alpha), weights)
        denominator = torch.log((weights * torch.exp(scores)).sum(1))
        losses.append((denominator - scores.diagonal()).mean())
    return (losses[0] + losses[1]) / 2


def _softmax_logits(leaves):
    x, y, t, _ = leaves
    return t * x @ y.T


def test_hn_nce_at_alpha_one_beta_zero_is_info_nce():
    leaves = _leaves(12, 12, dtype=torch.float64)
    want = _loss_and_grads(lambda x, y, t, b: _info_nce(_softmax_logits([x, y, t, b])), leaves)
    for fn in (sigmoid_loss, dense_sigmoid_loss):
        got = _loss_and_grads(fn, leaves, loss_type="softmax", hn_nce_alpha=1.0, hn_nce_beta=0.0, tile_size=5)
        _assert_close(got, want, tol=FP64_TOLERANCE)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.7), (0.0, 1.5), (1.0, 0.25)])
def test_hn_nce_matches_dihts_formula(alpha, beta):
    leaves = _leaves(12, 12, dtype=torch.float64)
    want = _loss_and_grads(lambda x, y, t, b: _hn_nce_as_published(_softmax_logits([x, y, t, b]), alpha, beta),
                           leaves)
    got = _loss_and_grads(sigmoid_loss, leaves, loss_type="softmax", hn_nce_alpha=alpha, hn_nce_beta=beta,
                          tile_size=5)
    _assert_close(got, want, tol=FP64_TOLERANCE)
    assert not torch.allclose(got[0], _loss_and_grads(sigmoid_loss, leaves, loss_type="softmax")[0])


def test_positive_pairs_follow_the_rule():
    """The shared helper against the rule written as a loop over pairs."""
    x, y = _unit(7, 6, 1, torch.float64), _unit(9, 6, 2, torch.float64)
    y[:4] = F.normalize(y[:4] + x[:4], dim=1)
    image_ids, text_ids = torch.tensor([0, 1, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 2, 3, 6, 7, 8, 5])
    thresholds = {"mine_image_text": 0.5, "mine_image_image": 0.2, "mine_text_text": 0.3}
    got = positive_pairs(image_ids, text_ids, x, y, **thresholds)
    for i in range(7):
        for j in range(9):
            want = (image_ids[i] == text_ids[j] or float(x[i] @ y[j]) >= 0.5
                    or any(image_ids[k] == text_ids[j] and float(x[i] @ x[k]) >= 0.2 for k in range(7))
                    or any(text_ids[k] == image_ids[i] and float(y[k] @ y[j]) >= 0.3 for k in range(9)))
            assert bool(got[i, j]) == bool(want), (i, j)
    assert torch.equal(positive_pairs(image_ids, text_ids), image_ids[:, None] == text_ids[None, :])


@pytest.mark.parametrize("options", [{}, {"mine_image_text": 0.4, "mine_text_text": 0.3},
                                     {"negative_ratio": 2, "negative_selection": "hard"}], ids=_option_id)
def test_loss_returns_its_statistics(options):
    x, y, t, b = [leaf.detach() for leaf in _leaves(10, 13, dtype=torch.float64)]
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 8])
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 2, 5, 9])
    loss, statistics = sigmoid_loss(x, y, t, b, image_ids, text_ids, tile_size=4, return_statistics=True, **options)
    positive = positive_pairs(image_ids, text_ids, x, y, **SiglipLossConfig(**options).mining)
    logits = t * x @ y.T + b
    assert statistics.positives_per_image == pytest.approx(positive.sum().item() / 10, abs=FP64_TOLERANCE)
    by_ids = (image_ids[:, None] == text_ids[None, :]).sum().item()
    assert statistics.mined_positives_per_image == pytest.approx((positive.sum().item() - by_ids) / 10)
    assert statistics.logit_positive_mean == pytest.approx(logits[positive].mean().item(), abs=FP64_TOLERANCE)
    assert statistics.logit_negative_mean == pytest.approx(logits[~positive].mean().item(), abs=FP64_TOLERANCE)
    if "negative_ratio" in options:  # per row: its positives and twice as many negatives
        assert statistics.pairs_per_image == pytest.approx(3 * positive.sum().item() / 10)
    else:
        assert statistics.pairs_per_image == 13
    assert torch.equal(loss, sigmoid_loss(x, y, t, b, image_ids, text_ids, tile_size=4, **options))


def test_mined_positives_count_in_the_statistics():
    """A threshold every pair passes makes every pair positive: the statistics say so (not the ids' count)."""
    x, y, t, b = [leaf.detach() for leaf in _leaves(6, 6)]
    _, plain = sigmoid_loss(x, y, t, b, return_statistics=True)
    _, mined = sigmoid_loss(x, y, t, b, return_statistics=True, mine_image_text=-1.0)
    assert plain.positives_per_image == 1.0 and mined.positives_per_image == 6.0
    assert plain.mined_positives_per_image == 0.0 and mined.mined_positives_per_image == 5.0
    assert math.isnan(mined.logit_negative_mean)


def test_random_negative_mask_keeps_about_the_ratio():
    n = 200
    leaves = _leaves(n, n, d=8)
    x, y, t, b = [leaf.detach() for leaf in leaves]
    ratio = 10
    masked = dense_sigmoid_loss(x, y, t * 0, b * 0, negative_ratio=ratio)  # every pair costs log 2
    kept_pairs = float(masked) * n / math.log(2)
    assert abs(kept_pairs - n * (ratio + 1)) < 0.1 * n * ratio


def test_module_wrapper_fixes_options():
    leaves = _leaves(6, 6)
    loss_fn = SigmoidLoss(SiglipLossConfig(normalize="text"), tile_size=2)
    _assert_close(_loss_and_grads(loss_fn, leaves), _loss_and_grads(dense_sigmoid_loss, leaves, normalize="text"))


@pytest.mark.parametrize("scale", [1e4, 1e6])
def test_extreme_logits_stay_finite(scale):
    leaves = _leaves(6, 6)
    loss, grads = _loss_and_grads(sigmoid_loss, leaves[:2] + [torch.tensor(scale), torch.tensor(-scale / 2)])
    want, want_grads = _loss_and_grads(dense_sigmoid_loss, leaves[:2] + [torch.tensor(scale), torch.tensor(-scale / 2)])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.allclose(loss, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-3)


def test_bf16_autocast_accumulates_in_fp32():
    leaves = _leaves(16, 16)
    x, y, t, b = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_loss(x.bfloat16(), y.bfloat16(), t, b)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    want = dense_sigmoid_loss(x.detach().bfloat16().float(), y.detach().bfloat16().float(), t.detach(), b.detach())
    assert torch.allclose(loss.detach(), want, rtol=1e-5)


def test_model_call_signature_single_process():
    # what the model's forward calls: logit_scale is the log parameter, exponentiated by the caller
    leaves = _leaves(4, 4)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = sigmoid_loss(leaves[0], leaves[1], log_scale.exp(), leaves[3])
    loss.backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(image_embeds=a["image_embeds"][:, :5]), "dims differ"),
        (lambda a: a.update(image_embeds=a["image_embeds"][0]), "2-d"),
        (lambda a: a.update(text_ids=a["text_ids"][:3]), "text_ids has 3 entries"),
        (lambda a: a.update(image_ids=a["image_ids"].float()), "must hold integers"),
        (lambda a: a.update(text_ids=None), "both image_ids and text_ids"),
        (lambda a: a.update(image_ids=None, text_ids=None, text_embeds=a["text_embeds"][:3]), "local counts"),
        (lambda a: a.update(logit_scale=torch.ones(2)), "one element"),
        (lambda a: a.update(image_embeds=a["image_embeds"][:0], image_ids=a["image_ids"][:0]), "zero"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    x, y, t, b = [leaf.detach() for leaf in _leaves(4, 4)]
    args = dict(image_embeds=x, text_embeds=y, logit_scale=t, logit_bias=b, image_ids=torch.arange(4),
                text_ids=torch.arange(4))
    change(args)
    with pytest.raises(ValueError, match=message):
        sigmoid_loss(**args)


@pytest.mark.parametrize("options", [{"normalize": "mean"}, {"tile_size": 0}, {"negative_ratio": 0},
                                     {"negative_selection": "medium"}, {"mine_image_text": 2.0},
                                     {"loss_type": "hinge"}, {"loss_type": "softmax", "normalize": "row"},
                                     {"loss_type": "softmax", "negative_ratio": 2}, {"teacher_weight": 1.5},
                                     {"teacher": (1, 2)}, {"hn_nce_beta": 0.5}, {"hn_nce_alpha": -1.0},
                                     {"loss_type": "softmax", "sigmoid_hard_negative_beta": 1.0},
                                     {"match_pairs_seen": True},
                                     {"loss_type": "softmax", "teacher": "random"}])
def test_bad_options_raise(options):
    x, y, t, b = [leaf.detach() for leaf in _leaves(4, 4)]
    options = _with_tensors(options, 4, 4, torch.float32)
    with pytest.raises(ValueError):
        sigmoid_loss(x, y, t, b, **options)


def test_group_without_torch_distributed_is_an_error():
    x, y, t, b = [leaf.detach() for leaf in _leaves(4, 4)]
    with pytest.raises(ValueError, match="not initialised"):
        sigmoid_loss(x, y, t, b, group=object())


def test_large_random_seed_is_accepted():
    leaves = _leaves(6, 6)
    options = {"negative_ratio": 2, "seed": 2**40 + 7}
    _assert_close(_loss_and_grads(sigmoid_loss, leaves, tile_size=4, **options),
                  _loss_and_grads(dense_sigmoid_loss, leaves, **options))


def test_no_bias_means_zero_bias():
    x, y, t, _ = _leaves(5, 5)
    got = sigmoid_loss(x.detach(), y.detach(), t.detach(), None)
    assert torch.allclose(got, sigmoid_loss(x.detach(), y.detach(), t.detach(), torch.tensor(0.0)))


@pytest.mark.parametrize("options", [{}, {"normalize": "row", "negative_ratio": 2}, {"loss_type": "softmax"}])
def test_without_gradients_the_value_is_unchanged(options):
    x, y, t, b = [leaf.detach() for leaf in _leaves(7, 9)]
    image_ids, text_ids = torch.arange(7), torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1])
    with torch.no_grad():
        evaluated = sigmoid_loss(x, y, t, b, image_ids, text_ids, tile_size=4, **options)
    trained = sigmoid_loss(x, y.clone().requires_grad_(), t, b, image_ids, text_ids, tile_size=4, **options)
    assert torch.allclose(evaluated, trained.detach(), rtol=1e-6)
    assert not evaluated.requires_grad and trained.requires_grad


def test_unknown_option_is_named():
    x, y, t, b = [leaf.detach() for leaf in _leaves(4, 4)]
    with pytest.raises(TypeError, match="negative_ration.*known: loss_type, normalize"):
        sigmoid_loss(x, y, t, b, negative_ration=2)


def test_renamed_option_points_to_its_successors():
    x, y, t, b = [leaf.detach() for leaf in _leaves(4, 4)]
    with pytest.raises(ValueError, match="hard_negative_beta.*sigmoid_hard_negative_beta.*hn_nce_beta"):
        sigmoid_loss(x, y, t, b, hard_negative_beta=0.5)


def test_mining_waits_for_its_start_step():
    config = SiglipLossConfig(mine_image_text=0.9, mine_text_text=0.8, mining_start_step=100)
    assert config.at_step(99).mining == {} and config.at_step(99).normalize == config.normalize
    assert config.at_step(100) == config


def test_config_from_a_recipe_mapping_or_json():
    assert SiglipLossConfig.from_value({"normalize": "row"}) == SiglipLossConfig(normalize="row")
    assert SiglipLossConfig.from_value('{"loss_type": "softmax", "hn_nce_beta": 0.5}').hn_nce_beta == 0.5
    assert SiglipLossConfig.from_value(None) == SiglipLossConfig()
    with pytest.raises(ValueError, match="not valid JSON"):
        SiglipLossConfig.from_value("{normalize: row")
