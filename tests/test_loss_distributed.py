"""The ring loss in real gloo process groups (1, 2 and 3 CPU processes) against a dense single-process
reference over the gathered batch (loss, gradients and statistics, fp64 to 1e-10, unequal local batches) and
against open_clip's SigLipLoss (bidir).

One launch per world size runs every case (process start-up dominates the cost); each case's result is
written per rank to a JSON file and checked by its own pytest test.
"""

import datetime
import json
import os
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import open_clip_siglip_loss_class

WORLD_SIZES = (1, 2, 3)
TOLERANCE = 1e-10  # the data are fp64 and the loss keeps fp64
LAUNCH_DEADLINE_S = 150


# ---------------------------------------------------------------------------------------------------
# Cases: each returns the global batch, how it is split over processes, and the loss options.
# ---------------------------------------------------------------------------------------------------


def _unit(n, d, generator):
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)


def _case(world, name):
    """Global data for case `name`: dict with x, y, image_sizes, text_sizes, ids (or None), options."""
    g = torch.Generator().manual_seed(1000 * world + sum(map(ord, name)))
    d = 16
    equal = [6] * world
    unequal = [8 + 3 * ((r * 7) % 4) for r in range(world)]  # 8, 17, 14
    options = {"tile_size": 4}
    ids = None
    if name in ("equal_plain", "equal_plain_default_tile"):
        image_sizes = text_sizes = equal
        if name.endswith("default_tile"):
            options = {}
    elif name == "equal_unique_ids":
        image_sizes = text_sizes = equal
        n = sum(equal)
        perm = torch.randperm(n, generator=g) + 100
        ids = (perm, perm.clone())
    elif name == "unequal_plain":
        image_sizes = text_sizes = unequal
    elif name == "k_captions":  # 3 captions per image on the image's process, unequal
        image_sizes = unequal
        text_sizes = [3 * n for n in unequal]
        image_ids = torch.arange(sum(unequal)) * 2 + 1
        ids = (image_ids, image_ids.repeat_interleave(3))
    elif name.startswith("duplicates"):  # ids repeat within and across processes, n_i != n_t
        image_sizes = unequal
        text_sizes = [n + 2 for n in reversed(unequal)]
        n_ids = 4 * world  # few enough that rows hold several positives
        ids = (torch.randint(0, n_ids, (sum(image_sizes),), generator=g),
               torch.randint(0, n_ids, (sum(text_sizes),), generator=g))
        options.update(_OPTION_CASES.get(name, {}))
    else:
        raise KeyError(name)
    x = _unit(sum(image_sizes), d, g)
    y = _unit(sum(text_sizes), d, g)
    # bring some pairs close so mining and hard negatives have something to find
    y[: min(len(x), len(y)) // 2] = F.normalize(y[: min(len(x), len(y)) // 2] + x[: min(len(x), len(y)) // 2], dim=1)
    if "positive_targets" in options:
        options["positive_targets"] = torch.rand(sum(text_sizes), generator=g, dtype=torch.float64)
    if "teacher" in options:  # a momentum model's embeddings, of another width
        options["teacher"] = (_unit(sum(image_sizes), 7, g), _unit(sum(text_sizes), 7, g),
                              torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))
    return dict(x=x, y=y, image_sizes=image_sizes, text_sizes=text_sizes, ids=ids, options=options,
                t=torch.tensor(7.5, dtype=torch.float64), b=torch.tensor(-4.0, dtype=torch.float64))


_OPTION_CASES = {
    "duplicates": {},
    "duplicates_norm_text": {"normalize": "text"},
    "duplicates_norm_row": {"normalize": "row"},
    "duplicates_positive_targets": {"positive_targets": True},
    "duplicates_negatives_random": {"negative_ratio": 3, "negative_selection": "random", "seed": 5},
    "duplicates_negatives_hard": {"negative_ratio": 2, "negative_selection": "hard"},
    "duplicates_negatives_easy": {"negative_ratio": 1, "negative_selection": "easy"},
    "duplicates_sigmoid_hard_negative_weights": {"sigmoid_hard_negative_beta": 4.0},
    "duplicates_mine_image_text": {"mine_image_text": 0.45},
    "duplicates_mine_image_image": {"mine_image_image": 0.4},
    "duplicates_mine_text_text": {"mine_text_text": 0.3},
    "duplicates_mine_all_row_hard": {"mine_image_text": 0.45, "mine_image_image": 0.4, "mine_text_text": 0.4,
                                     "normalize": "row", "negative_ratio": 2, "negative_selection": "hard"},
    "duplicates_weights_targets_random": {"sigmoid_hard_negative_beta": 2.0, "positive_targets": True,
                                          "negative_ratio": 4, "seed": 1},
    "duplicates_teacher": {"teacher": True, "teacher_weight": 0.6, "normalize": "row"},
    # mining on the teacher's embeddings (another width), with and without its soft targets
    "duplicates_teacher_mining": {"teacher": True, "teacher_weight": 0.0, "mine_with": "teacher",
                                  "mine_image_text": 0.5, "mine_image_image": 0.5, "mine_text_text": 0.5},
    "duplicates_teacher_mining_distilled": {"teacher": True, "teacher_weight": 0.4, "mine_with": "teacher",
                                            "mine_image_text": 0.5, "normalize": "row"},
    # mined pairs left out of the loss (false-negative elimination), by the model's or the teacher's similarities
    "duplicates_ignore_mined": {"mine_image_text": 0.45, "mine_image_image": 0.4, "mine_text_text": 0.4,
                                "mined_pairs": "ignore", "normalize": "row"},
    "duplicates_teacher_ignore_mined_hard": {"teacher": True, "teacher_weight": 0.3, "mine_with": "teacher",
                                             "mine_image_image": 0.5, "mine_text_text": 0.5, "mined_pairs": "ignore",
                                             "negative_ratio": 2, "negative_selection": "hard"},
    "duplicates_softmax": {"loss_type": "softmax"},
    "duplicates_softmax_targets_mining": {"loss_type": "softmax", "positive_targets": True,
                                          "mine_image_image": 0.4, "mine_text_text": 0.4},
    "duplicates_hn_nce": {"loss_type": "softmax", "hn_nce_alpha": 0.6, "hn_nce_beta": 0.8},
    "duplicates_hn_nce_mining_targets": {"loss_type": "softmax", "hn_nce_alpha": 0.0, "hn_nce_beta": 1.2,
                                         "mine_image_text": 0.45, "positive_targets": True},
}

OPEN_CLIP_CASES = ("equal_plain", "equal_plain_default_tile", "equal_unique_ids")
PARITY_CASES = OPEN_CLIP_CASES + ("unequal_plain", "k_captions") + tuple(_OPTION_CASES)
ERROR_CASES = ("error_dim_mismatch", "error_zero_rows", "error_float_ids", "error_option_mismatch")


# ---------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------


def _local(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


def _check_parity(name, rank, world, group, SigLipLoss):
    from hf_siglip.loss import SiglipLossConfig, dense_sigmoid_loss, sigmoid_loss
    from hf_siglip.positives import positive_pairs

    case = _case(world, name)
    x, y, t, b = case["x"], case["y"], case["t"], case["b"]
    options = dict(case["options"])
    image_ids = text_ids = local_image_ids = local_text_ids = None
    if case["ids"] is not None:
        image_ids, text_ids = case["ids"]
        local_image_ids = _local(image_ids, case["image_sizes"], rank)
        local_text_ids = _local(text_ids, case["text_sizes"], rank)
    local_options = dict(options)
    if "positive_targets" in options:
        local_options["positive_targets"] = _local(options["positive_targets"], case["text_sizes"], rank)
    if "teacher" in options:
        teacher_images, teacher_texts, teacher_scale, teacher_bias = options["teacher"]
        local_options["teacher"] = (_local(teacher_images, case["image_sizes"], rank),
                                    _local(teacher_texts, case["text_sizes"], rank), teacher_scale, teacher_bias)

    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), t.clone().requires_grad_(),
              b.clone().requires_grad_()]
    dense_options = {k: v for k, v in options.items() if k != "tile_size"}
    dense = dense_sigmoid_loss(*leaves, image_ids, text_ids, **dense_options)
    dense_grads = torch.autograd.grad(dense, leaves, allow_unused=True)  # the softmax loss has no bias
    dense_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, dense_grads)]

    local_leaves = [_local(x, case["image_sizes"], rank).clone().requires_grad_(),
                    _local(y, case["text_sizes"], rank).clone().requires_grad_(),
                    t.clone().requires_grad_(), b.clone().requires_grad_()]
    loss, statistics = sigmoid_loss(*local_leaves, local_image_ids, local_text_ids, group=group,
                                    return_statistics=True, **local_options)
    grads = torch.autograd.grad(loss, local_leaves)

    if set(options) - {"tile_size"}:  # an option that is on must matter on this data
        plain = dense_sigmoid_loss(x, y, t, b, image_ids, text_ids)
        if abs(float(plain) - float(dense)) < 1e-4:
            return f"option changed nothing: {float(plain)} vs {float(dense)}"

    # DDP view: the process average of loss, dt and db; each process's embedding gradient / world
    summed = torch.stack([loss.detach(), grads[2], grads[3]]).double()
    dist.all_reduce(summed, group=group)
    mean_loss, mean_dt, mean_db = (summed / world).tolist()
    problems = []
    errors = {
        "loss": abs(mean_loss - float(dense)),
        "d_image": _max_diff(grads[0] / world, _local(dense_grads[0], case["image_sizes"], rank)),
        "d_text": _max_diff(grads[1] / world, _local(dense_grads[1], case["text_sizes"], rank)),
        "d_t": abs(mean_dt - float(dense_grads[2])),
        "d_b": abs(mean_db - float(dense_grads[3])),
    }
    settings = SiglipLossConfig(**{k: v for k, v in options.items() if k not in ("positive_targets", "teacher")})
    global_ids = (image_ids, text_ids) if image_ids is not None else (torch.arange(len(x)), torch.arange(len(y)))
    mined_with = (options["teacher"][0], options["teacher"][1]) if settings.mine_with == "teacher" else (x, y)
    found = positive_pairs(*global_ids, *mined_with, **settings.mining)
    by_ids = global_ids[0][:, None] == global_ids[1][None, :]
    positive = by_ids if settings.mined_pairs == "ignore" else found
    logits = t * x @ y.T + (b if settings.loss_type == "sigmoid" else 0.0)
    errors["positives_per_image"] = abs(statistics.positives_per_image - positive.sum().item() / len(x))
    errors["mined_positives_per_image"] = abs(statistics.mined_positives_per_image
                                              - (found & ~by_ids).sum().item() / len(x))
    errors["logit_positive_mean"] = abs(statistics.logit_positive_mean - logits[positive].mean().item())
    errors["logit_negative_mean"] = abs(statistics.logit_negative_mean - logits[~positive].mean().item())
    for key, err in errors.items():
        if not err <= TOLERANCE * max(1.0, abs(float(dense)) if key == "loss" else 1.0):
            problems.append(f"dense {key} differs by {err:.3g}")

    if name in OPEN_CLIP_CASES and SigLipLoss is not None:
        oc_leaves = [leaf.detach().clone().requires_grad_() for leaf in local_leaves]
        oc_loss = SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")(*oc_leaves)
        oc_grads = torch.autograd.grad(oc_loss, oc_leaves)
        oc_errors = {"loss": abs(float(oc_loss) - float(loss)),
                     **{f"grad{i}": _max_diff(a, c) for i, (a, c) in enumerate(zip(grads, oc_grads))}}
        for key, err in oc_errors.items():
            if not err <= TOLERANCE * max(1.0, abs(float(loss)) if key == "loss" else 1.0):
                problems.append(f"open_clip {key} differs by {err:.3g}")
    return "ok" if not problems else "; ".join(problems)


class _TinyDualEncoder(torch.nn.Module):
    """Two linear towers, t and b: enough for DDP to average real parameter gradients."""

    def __init__(self):
        super().__init__()
        self.image_tower = torch.nn.Linear(12, 8)
        self.text_tower = torch.nn.Linear(10, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.bias = torch.nn.Parameter(torch.tensor(-4.0))

    def forward(self, images, texts):
        return (F.normalize(self.image_tower(images), dim=-1), F.normalize(self.text_tower(texts), dim=-1),
                self.log_scale.exp(), self.bias)


def _check_ddp(rank, world, options):
    """DDP's averaged parameter gradients equal the dense global loss's, with unequal local batches,
    k captions and duplicate ids across processes."""
    from hf_siglip.loss import dense_sigmoid_loss, sigmoid_loss

    g = torch.Generator().manual_seed(world)
    image_sizes = [3 + 2 * r for r in range(world)]
    text_sizes = [2 * n + (r % 2) for r, n in enumerate(image_sizes)]
    images = torch.randn(sum(image_sizes), 12, generator=g, dtype=torch.float64)
    texts = torch.randn(sum(text_sizes), 10, generator=g, dtype=torch.float64)
    image_ids = torch.randint(0, 9, (sum(image_sizes),), generator=g)
    text_ids = torch.randint(0, 9, (sum(text_sizes),), generator=g)
    torch.manual_seed(0)
    reference = _TinyDualEncoder().double()
    model = _TinyDualEncoder().double()
    model.load_state_dict(reference.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = ddp(_local(images, image_sizes, rank), _local(texts, text_sizes, rank))
    sigmoid_loss(*local, _local(image_ids, image_sizes, rank), _local(text_ids, text_sizes, rank),
                 tile_size=3, **options).backward()
    dense_sigmoid_loss(*reference(images, texts), image_ids, text_ids, **options).backward()
    def grad(parameter):  # the softmax loss leaves the bias without a gradient
        return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad

    problems = [f"{name} differs by {_max_diff(grad(p), grad(q)):.3g}"
                for (name, p), q in zip(model.named_parameters(), reference.parameters())
                if not _max_diff(grad(p), grad(q)) <= TOLERANCE]
    return "ok" if not problems else "; ".join(problems)


DDP_CASES = {"ddp": {}, "ddp_row_mining": {"normalize": "row", "mine_image_text": 0.3, "mine_text_text": 0.3},
             "ddp_hn_nce": {"loss_type": "softmax", "hn_nce_alpha": 0.5, "hn_nce_beta": 0.5}}


def _check_error(name, rank, world, group):
    """Every process must raise ValueError (not hang) when one process's inputs are wrong."""
    from hf_siglip.loss import sigmoid_loss

    g = torch.Generator().manual_seed(7)
    n, d = 4, 8
    x, y = _unit(n, d, g), _unit(n, d, g)
    ids = torch.arange(n) + n * rank
    image_ids, text_ids = ids, ids
    options = {}
    if name == "error_dim_mismatch" and rank == world - 1:
        x, y = _unit(n, d + 1, g), _unit(n, d + 1, g)
    if name == "error_zero_rows" and rank == 0:
        x, y, image_ids, text_ids = x[:0], y[:0], ids[:0], ids[:0]
    if name == "error_float_ids" and rank == 1:
        image_ids = ids.float()
    if name == "error_option_mismatch" and rank == 0:
        options = {"normalize": "text"}
    try:
        sigmoid_loss(x, y, torch.tensor(10.0), torch.tensor(-10.0), image_ids, text_ids, group=group, **options)
    except ValueError as error:
        return "raised: " + str(error)
    return "did not raise"


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    results = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        SigLipLoss = open_clip_siglip_loss_class()
        for name in PARITY_CASES:
            try:
                results[name] = _check_parity(name, rank, world, None, SigLipLoss)
            except Exception:  # recorded, and the other cases still run
                results[name] = "exception: " + traceback.format_exc()
        for name, options in DDP_CASES.items():
            try:
                results[name] = _check_ddp(rank, world, options)
            except Exception:
                results[name] = "exception: " + traceback.format_exc()
        for name in ERROR_CASES if world >= 2 else ():  # they need a second process to disagree with
            results[name] = _check_error(name, rank, world, None)
        if world >= 2:  # a sub-group of the first world-1 processes (every process must create it)
            members = list(range(max(2, world - 1)))
            subgroup = dist.new_group(members)
            if rank in members:
                results["subgroup"] = _check_parity("unequal_plain", rank, len(members), subgroup, SigLipLoss)
                dist.destroy_process_group(subgroup)
        dist.barrier()
        # written before teardown: a 3-process world aborted once in CI ("terminate called without an active
        # exception", a C++ thread left running; where is unknown; Gloo's threads at interpreter exit are a known
        # SIGABRT source, pytorch/pytorch#179291), and a crash after this point must not lose the results (see
        # _results; a crash before it still fails the test)
        temporary = os.path.join(out_dir, f"rank{rank}.json.tmp")
        with open(temporary, "w") as handle:
            json.dump(results, handle)
        os.replace(temporary, os.path.join(out_dir, f"rank{rank}.json"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Launcher side
# ---------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RESULTS = {}


def _results(world, tmp_path_factory):
    if world not in _RESULTS:
        out_dir = str(tmp_path_factory.mktemp(f"world{world}"))
        context = mp.start_processes(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + LAUNCH_DEADLINE_S
        result_files = [os.path.join(out_dir, f"rank{r}.json") for r in range(world)]
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world {world}: processes still running after {LAUNCH_DEADLINE_S}s")
        except mp.ProcessExitedException as error:
            # a crash before every process wrote its results fails; one in process-group teardown after them is
            # torch's, not the loss's: reported, and the results are checked as usual
            if not all(os.path.exists(path) for path in result_files):
                raise
            warnings.warn(f"world {world}: {error} after all results were written (process-group teardown)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        _RESULTS[world] = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
    return _RESULTS[world]


@pytest.mark.parametrize("name", PARITY_CASES)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ring_matches_dense_and_open_clip(world, name, tmp_path_factory):
    if name in OPEN_CLIP_CASES and open_clip_siglip_loss_class() is None:
        pytest.skip("open_clip not installed (the oracle half of this case)")
    per_rank = [r[name] for r in _results(world, tmp_path_factory)]
    assert per_rank == ["ok"] * world, per_rank


@pytest.mark.parametrize("name", DDP_CASES)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ddp_averaged_parameter_gradients_equal_the_global_loss(world, name, tmp_path_factory):
    per_rank = [r[name] for r in _results(world, tmp_path_factory)]
    assert per_rank == ["ok"] * world, per_rank


@pytest.mark.parametrize("world", [w for w in WORLD_SIZES if w >= 2])
def test_ring_on_a_subgroup(world, tmp_path_factory):
    results = _results(world, tmp_path_factory)
    members = max(2, world - 1)
    assert [r.get("subgroup") for r in results[:members]] == ["ok"] * members


@pytest.mark.parametrize("name", ERROR_CASES)
@pytest.mark.parametrize("world", [w for w in WORLD_SIZES if w >= 2])
def test_bad_input_on_one_process_raises_everywhere(world, name, tmp_path_factory):
    messages = [r[name] for r in _results(world, tmp_path_factory)]
    assert all(m.startswith("raised: sigmoid_loss") for m in messages), messages
