"""Benchmark: time per forward+backward and peak memory per process of three distributed sigmoid losses.

    PYTHONPATH=. python benchmarks/loss.py                 # both tables and the PNG (several minutes on 2 cores)
    PYTHONPATH=. python benchmarks/loss.py --batches 1024 --curve-worlds  # quick look

Compared, at world size 2 (gloo, CPU, one thread per process), d = 512:
  hf_siglip   hf_siglip.sigmoid_loss (ring, tiles of 1024 x 1024, each tile's gradient in the forward)
  open_clip   open_clip SigLipLoss(dist_impl="bidir") (loaded from its loss.py; import open_clip needs torchvision)
  all-gather  the naive loss: torch.distributed.nn.all_gather of the texts, then the local x global logits
  floor       the three matrix products any exact loss must do (logits, the two gradient products), tiled as
              hf_siglip's, against the global batch's texts held locally: no elementwise work, no communication

Second table (and a PNG, --plot): peak memory per process at 1, 2, 4 and 8 processes (--curve-worlds) at one local
batch (--curve-batch), for hf_siglip, open_clip's SigLipLoss "bidir" (its default, neighbour exchange) and "gather"
(all-gather of the texts). More processes than cores is fine for memory; its times are indicative only.

"k" is the number of captions (positives) per image: a process holds `batch` images and k * batch texts.
open_clip cannot express k > 1 (it pairs image i with text i only), so its k = 5 cells are empty.
"k=5, 1 pos" is hf_siglip on the same shapes with one positive per image (unique text ids): the cost of
multiple positives is the ratio of the two.

Peak memory: growth of the process's peak resident set size (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs before each step) over its resident size before the step. tracemalloc does not
see torch's allocations. glibc is told (MALLOC_MMAP_THRESHOLD_) to serve allocations above 128 KiB with
mmap, so freed tensors leave the resident set and the reading reflects what the step holds, not what
the allocator cached from an earlier step. Inputs (embeddings, t, b) exist before the step; gradients
and everything else the loss allocates are counted.
"""

import argparse
import datetime
import importlib.util
import os
import socket
import statistics
import sys
import time
import warnings

# must be set before the worker processes start (glibc reads it at start-up)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_siglip.loss import sigmoid_loss  # noqa: E402
from hf_siglip.loss_config import DEFAULT_TILE  # noqa: E402

MiB = 1024 * 1024


def _open_clip_siglip():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SigLipLoss


def _status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def naive_all_gather_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids, text_ids):
    """Every process gathers every text (with gradient) and builds its local x global logits."""
    all_texts = torch.cat(torch.distributed.nn.all_gather(text_embeds))
    gathered_ids = [torch.empty_like(text_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_ids, text_ids)
    labels = 2.0 * (image_ids[:, None] == torch.cat(gathered_ids)[None, :]).float() - 1.0
    logits = logit_scale * image_embeds @ all_texts.T + logit_bias
    return -F.logsigmoid(labels * logits).sum() / image_embeds.shape[0]


def matmul_floor(image_embeds, all_texts, logit_scale, logit_bias, tile=DEFAULT_TILE):
    """The three matrix products any exact loss step must do, and nothing else: per tile of the local images
    against every text of the global batch (here one tensor, no communication), the logits (with the bias), then
    the two gradient products (the logits stand in for the gradient coefficients), accumulated into the two
    gradients (zeroed tensors allocated in the step, as any loss must return gradients)."""
    x, y = image_embeds.detach(), all_texts
    bias = logit_bias.detach()
    grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
    for c0 in range(0, y.shape[0], tile):
        y_tile = y[c0:c0 + tile]
        for r0 in range(0, x.shape[0], tile):
            logits = torch.addmm(bias, x[r0:r0 + tile], y_tile.T)
            grad_x[r0:r0 + tile].addmm_(logits, y_tile)
            grad_y[c0:c0 + tile].addmm_(logits.T, x[r0:r0 + tile])
    return _NoBackward()


class _NoBackward:
    def backward(self):
        pass


def _measure(steps, leaves, reps):
    """One warm-up round, then `reps` rounds; each round runs every method once, interleaved, so that
    load from other work on the machine spreads over all methods alike. Returns {method: (median wall
    seconds, median CPU seconds of this process, max peak growth in MiB)}."""
    wall = {method: [] for method in steps}
    cpu = {method: [] for method in steps}
    peaks = {method: [] for method in steps}
    for rep in range(reps + 1):
        for method, step in steps.items():
            for leaf in leaves:
                leaf.grad = None
            dist.barrier()
            _reset_peak()
            base = _status_kib("VmRSS")
            start, start_cpu = time.perf_counter(), time.process_time()
            step().backward()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            peak = (_status_kib("VmHWM") - base) / 1024
            if rep:
                wall[method].append(elapsed)
                cpu[method].append(elapsed_cpu)
                peaks[method].append(peak)
    return {method: (statistics.median(wall[method]), statistics.median(cpu[method]), max(peaks[method]))
            for method in steps}


def _worker(rank, world, port, configs, reps, results):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn.all_gather's notice
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    SigLipLoss = _open_clip_siglip()
    rows = []
    try:
        for batch, k, methods in configs:
            g = torch.Generator().manual_seed(rank)
            d = 512
            x = F.normalize(torch.randn(batch, d, generator=g), dim=1).requires_grad_()
            y = F.normalize(torch.randn(k * batch, d, generator=g), dim=1).requires_grad_()
            t = torch.tensor(10.0, requires_grad=True)
            b = torch.tensor(-10.0, requires_grad=True)
            image_ids = torch.arange(batch) + rank * batch
            text_ids = image_ids.repeat_interleave(k)
            unique_text_ids = torch.arange(k * batch) + world * batch * (rank + 1)
            unique_text_ids[:batch] = image_ids  # one positive per image, the other texts have none
            leaves = [x, y, t, b]
            all_texts = None
            if "floor" in methods:  # the global batch's texts in one tensor
                all_texts = F.normalize(torch.randn(world * k * batch, d, generator=g), dim=1)
            steps = {
                "floor": lambda: matmul_floor(x, all_texts, t, b),
                "hf_siglip": lambda: sigmoid_loss(x, y, t, b, image_ids, text_ids),
                "hf_siglip 1 pos": lambda: sigmoid_loss(x, y, t, b, image_ids, unique_text_ids),
                "open_clip": lambda: SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")(x, y, t, b),
                "open_clip gather": lambda: SigLipLoss(rank=rank, world_size=world, dist_impl="gather")(x, y, t, b),
                "all-gather": lambda: naive_all_gather_loss(x, y, t, b, image_ids, text_ids),
            }
            chosen = {method: steps[method] for method in methods
                      if not (method.startswith("open_clip") and (k != 1 or SigLipLoss is None))}
            measured = _measure(chosen, leaves, reps if batch * k <= 4096 else 1)
            for method, (seconds, cpu_seconds, peak) in measured.items():
                rows.append((world, batch, k, method, seconds, cpu_seconds, peak))
            x = y = leaves = steps = all_texts = None  # freed before the next setting is measured
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            # a step takes as long as its slowest process; report the largest peak too
            merged = {}
            for per_rank in gathered:
                for world_, batch, k, method, seconds, cpu_seconds, peak in per_rank:
                    key = (world_, batch, k, method)
                    old = merged.get(key, (0.0, 0.0, 0.0))
                    merged[key] = (max(old[0], seconds), max(old[1], cpu_seconds), max(old[2], peak))
            results.update(merged)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world, configs, reps):
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), configs, reps, results), nprocs=world,
                       start_method="spawn", join=True)
    out = dict(results)
    manager.shutdown()
    return out


def _table(results):
    """The world-size 2 (and 4) table: time and memory of every method per (world, batch, k)."""
    methods = ("hf_siglip", "open_clip", "all-gather", "hf_siglip 1 pos", "floor")
    header = ("world", "batch", "k", "hf_siglip s", "open_clip s", "all-gather s", "hf_siglip k=5, 1 pos s",
              "floor s", "hf_siglip MiB", "open_clip MiB", "all-gather MiB", "time vs open_clip (CPU)",
              "mem vs open_clip", "hf_siglip vs floor (CPU)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted({key[:3] for key in results}):
        cell = {method: results.get(key + (method,)) for method in methods}
        ours, oc, one, floor = cell["hf_siglip"], cell["open_clip"], cell["hf_siglip 1 pos"], cell["floor"]
        times = ["-" if cell[m] is None else f"{cell[m][0]:.2f} ({cell[m][1]:.2f})" for m in methods]
        memory = ["-" if cell[m] is None else f"{cell[m][2]:.0f}" for m in methods[:3]]
        ratio_t = f"{ours[0] / oc[0]:.2f}x ({ours[1] / oc[1]:.2f}x)" if ours and oc else "-"
        if ours and one:
            ratio_t = f"k={key[2]} vs 1 pos: {ours[0] / one[0]:.2f}x ({ours[1] / one[1]:.2f}x)"
        ratio_m = f"{ours[2] / oc[2]:.2f}x" if ours and oc and oc[2] > 0 else "-"
        ratio_f = f"{ours[0] / floor[0]:.2f}x ({ours[1] / floor[1]:.2f}x)" if ours and floor else "-"
        lines.append("| " + " | ".join([str(v) for v in key] + times + memory + [ratio_t, ratio_m, ratio_f]) + " |")
    return "\n".join(lines)


CURVE_METHODS = ("hf_siglip", "open_clip", "open_clip gather")


def _curve(worlds, batch, reps):
    """Peak memory growth per process (largest process) and CPU seconds per step at each world size, at one local
    batch: {method: {world: (wall, cpu, MiB)}}."""
    curve = {method: {} for method in CURVE_METHODS}
    for world in worlds:
        for (world_, _, _, method), value in run(world, [(batch, 1, CURVE_METHODS)], reps).items():
            curve[method][world_] = value
    return curve


def _curve_table(curve, worlds):
    names = [{"open_clip": "open_clip bidir"}.get(m, m) for m in CURVE_METHODS]
    header = ["processes"] + [f"{m} MiB" for m in names] + [f"{m} CPU s" for m in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for world in worlds:
        cells = [curve[m].get(world) for m in CURVE_METHODS]
        lines.append("| " + " | ".join([str(world)] + ["-" if c is None else f"{c[2]:.1f}" for c in cells]
                                       + ["-" if c is None else f"{c[1]:.2f}" for c in cells]) + " |")
    return "\n".join(lines)


def _plot(curve, worlds, batch, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"hf_siglip": "hf_siglip (ring)", "open_clip": "open_clip SigLipLoss bidir",
              "open_clip gather": "open_clip SigLipLoss gather"}
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in CURVE_METHODS:
        points = [(w, curve[method][w][2]) for w in worlds if w in curve[method]]
        if points:
            axis.plot(*zip(*points), marker="o", label=labels[method])
    axis.set_xscale("log", base=2)
    axis.set_xticks(worlds, [str(w) for w in worlds])
    axis.set_ylim(bottom=0)
    axis.set_xlabel("processes (gloo, CPU)")
    axis.set_ylabel("peak memory growth per process (MiB)")
    axis.set_title(f"one loss step, local batch {batch}, d=512")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1024, 4096],
                        help="local batches of the world-size 2 rows (none: only the world-size 4 row)")
    parser.add_argument("--positives", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--reps", type=int, default=2, help="timed steps after one warm-up (1 for big k=5 cells)")
    parser.add_argument("--flat-batch", type=int, default=1024,
                        help="local batch of the world-size 4 row, for memory against world size 2 (0 = skip)")
    parser.add_argument("--curve-worlds", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="process counts of the memory curve (none: skip it)")
    parser.add_argument("--curve-batch", type=int, default=1024, help="local batch of the memory curve")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "loss_memory_processes.png"),
                        help="where the memory curve's PNG goes (empty: no plot)")
    args = parser.parse_args()

    all_methods = ("hf_siglip", "open_clip", "all-gather", "floor")
    configs = []
    for batch in args.batches:
        for k in args.positives:
            methods = all_methods + (("hf_siglip 1 pos",) if k > 1 else ())
            configs.append((batch, k, methods))
    results = run(2, configs, args.reps) if configs else {}
    if args.flat_batch:
        results.update(run(4, [(args.flat_batch, 1, all_methods)], args.reps))
    # memory is the point of the curve: one timed round after the warm-up (times are indicative only)
    curve = _curve(args.curve_worlds, args.curve_batch, 1) if args.curve_worlds else None

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, gloo, 1 thread per process, d=512; "
          f"time = wall (CPU) seconds per forward+backward, slowest process; memory = VmHWM growth, "
          f"largest process; floor = the three matrix products alone; "
          f"load average at the end {open('/proc/loadavg').read().split()[0]}")
    if results:
        print(_table(results))
    if curve:
        print(f"\nMemory against the number of processes, local batch {args.curve_batch}, k=1 (peak resident growth "
              f"of the largest process, MiB; CPU seconds per step of the slowest)")
        print(_curve_table(curve, args.curve_worlds))
        if args.plot:
            _plot(curve, args.curve_worlds, args.curve_batch, args.plot)
            print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
