"""One GPU benchmark run (issue 25): the loss, a ViT-B/16 SigLIP training step, the largest batch, the data path.

    python benchmarks/gpu.py --out results/            # one H100/H200, < 8 minutes (bash benchmarks/run_gpu.sh)
    python benchmarks/gpu.py --tiny --out /tmp/tiny    # CPU, tiny sizes, ~30 s (tests/test_benchmark_gpu_tiny.py)
    python benchmarks/gpu.py --sections loss,data      # a subset

Sections (each prints its elapsed time; every row is in the JSON, `gpu_results.json` in --out):
  loss       fwd+bwd time and peak memory of the loss alone, one device, local batch 16k and 64k, d 768, bf16
             embeddings: hf_siglip.sigmoid_loss (tiles of 1024, and of 4096), open_clip's SigLipLoss, and
             siglip-kernel's fused_siglip_loss (Triton: CUDA only). The loss column checks they compute one thing.
  step       a ViT-B/16 SigLIP step (random weights: transformers.SiglipConfig built here, 224 px, 64 tokens, sdpa,
             bf16 autocast, fp32 master weights, AdamW) at one batch through SiglipTrainer (trainer.train() with
             max_steps, steps timed after warm-up by a callback), a plain loop (model + hf_siglip loss + AdamW), and
             open_clip's own ViT-B-16-SigLIP (create_model without pretrained weights) with its SigLipLoss.
             Batches are made once on the device: this section measures the step, `data` the input side.
             pairs/s, and the fraction of the GPU's dense bf16 peak: FLOPs per pair counted with
             torch.utils.flop_counter.FlopCounterMode over one fwd+bwd of each model (matmuls and attention; the
             optimizer and elementwise work are not counted, as in the usual MFU).
  max_batch  the largest batch whose training step (fwd + bwd + AdamW) fits, ours (the plain-loop step) and
             open_clip's, with and without activation checkpointing: doubling from a start, stopping at the first
             torch.cuda.OutOfMemoryError or at a bound (then reported as ">= bound").
  data       SiglipDataCollator's images/s (224 px) from JPEG tar shards written by hf_siglip's own
             write_webdataset_shards (500 x 375 photo-like JPEGs), streamed through a DataLoader with 8 and 16 workers.

--tiny: tiny sizes everywhere, CPU (CUDA if present), bf16 as on the GPU (CPU autocast supports it); rows that
cannot run say why ("skipped: ..."). The exit status is 1 if a row failed (its error is in the row), so CI notices.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCHMARKS))
sys.path.insert(0, BENCHMARKS)
sys.path.insert(0, os.path.join(os.path.dirname(BENCHMARKS), "tests"))

MiB = 1024 * 1024
SECTIONS = ("loss", "step", "max_batch", "data")
# dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name(); first match
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
# SigLIP pools the last token; CLIP's bos/eos ids (transformers' defaults) lie outside these vocabularies
TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
FULL = dict(
    loss_batches=(16384, 65536), dim=768, loss_budget_s=8.0,
    vision=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12),
    text=dict(vocab_size=32000, max_position_embeddings=64, hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, **TOKENS),
    step_batch=256, warmup=3, steps=12,
    search_start=256, search_bound=4096, search_bound_checkpointed=32768,
    data_images=8192, data_shards=32, jpeg_size=(500, 375), data_image_size=224, data_batch=256, workers=(8, 16),
)
TINY = dict(
    loss_batches=(64, 256), dim=32, loss_budget_s=0.5,
    vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2),
    text=dict(vocab_size=1000, max_position_embeddings=16, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2, **TOKENS),
    step_batch=8, warmup=1, steps=2,
    search_start=2, search_bound=8, search_bound_checkpointed=8,
    data_images=64, data_shards=4, jpeg_size=(64, 48), data_image_size=32, data_batch=16, workers=(0, 2),
)


class Skip(Exception):
    """A row that cannot run here; its message says why."""


# --- small tools --------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def timed_median(work, device: torch.device, warmup: int, budget_s: float, most: int = 10) -> tuple[float, int]:
    """(median seconds of `work()`, repeats): warm-up calls, then as many timed calls as fit `budget_s` (1 to most)."""
    for _ in range(warmup):
        work()
    sync(device)
    times = []
    while len(times) < most and (not times or sum(times) + statistics.median(times) <= budget_s):
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def peak_mib(work, device: torch.device) -> float | None:
    """Peak device memory (MiB) that `work()` allocates above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MiB


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def open_clip_module():
    try:
        import open_clip
    except Exception as error:  # noqa: BLE001 - any import failure (e.g. no torchvision beside CPU torch) is a skip
        raise Skip(f"open_clip does not import here ({type(error).__name__}: {error})") from None
    return open_clip


def open_clip_siglip_loss():
    """open_clip's SigLipLoss class: from the package, or from its loss.py alone (which needs torch only, while
    `import open_clip` needs torchvision): benchmarks/loss.py's loader."""
    from loss import _open_clip_siglip

    loss_class = _open_clip_siglip()
    if loss_class is None:
        raise Skip("open_clip_torch is not installed")
    return loss_class


# --- (a) the loss alone -------------------------------------------------------------------------------------------

def loss_candidates(device: torch.device):
    """name -> (make loss(img, txt, log_t, b) or raise Skip)."""
    from hf_siglip.loss import sigmoid_loss

    def ours(tile):
        return lambda img, txt, log_t, bias: sigmoid_loss(img, txt, log_t.exp().reshape(1), bias.reshape(1),
                                                          tile_size=tile)

    def open_clip_loss():
        loss = open_clip_siglip_loss()()  # rank 0 of world 1
        return lambda img, txt, log_t, bias: loss(img, txt, log_t.exp(), bias)

    def kernel():
        if device.type != "cuda":
            raise Skip("siglip-kernel is Triton: CUDA only")
        try:
            from siglip_kernel import fused_siglip_loss
        except Exception as error:  # noqa: BLE001 - not installed, or Triton missing/unsupported here
            raise Skip(f"siglip_kernel does not import ({type(error).__name__}: {error})") from None
        return lambda img, txt, log_t, bias: fused_siglip_loss(img, txt, log_t, bias)

    return {"hf_siglip (tile 1024, default)": lambda: ours(1024), "hf_siglip (tile 4096)": lambda: ours(4096),
            "open_clip SigLipLoss": open_clip_loss, "siglip-kernel fused_siglip_loss": kernel}


def section_loss(cfg, device) -> list[dict]:
    rows = []
    for batch in cfg["loss_batches"]:
        generator = torch.Generator(device="cpu").manual_seed(0)
        img = F.normalize(torch.randn(batch, cfg["dim"], generator=generator), dim=-1)
        txt = F.normalize(img + 0.5 * torch.randn(batch, cfg["dim"], generator=generator), dim=-1)
        img = img.to(device, torch.bfloat16).requires_grad_(True)
        txt = txt.to(device, torch.bfloat16).requires_grad_(True)
        log_t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        reference = None
        for name, make in loss_candidates(device).items():
            row = {"name": name, "batch": batch, "dim": cfg["dim"]}
            rows.append(row)
            try:
                loss_fn = make()
                value = {}

                def step():
                    for tensor in (img, txt, log_t, bias):
                        tensor.grad = None
                    loss = loss_fn(img, txt, log_t, bias)
                    loss.backward()
                    value["loss"] = loss

                row["peak_MiB"] = peak_mib(step, device)  # the first call: also the warm-up
                seconds, repeats = timed_median(step, device, warmup=1, budget_s=cfg["loss_budget_s"])
                row.update(ms=1000 * seconds, repeats=repeats, loss=float(value["loss"].detach().float()))
                reference = row["loss"] if reference is None else reference
                row["loss_rel_diff"] = abs(row["loss"] - reference) / abs(reference)
            except Skip as reason:
                row["skipped"] = str(reason)
            except Exception as error:  # noqa: BLE001 - an OOM (or anything) ends this row, not the run
                row["skipped" if is_oom(error) else "failed"] = f"{type(error).__name__}: {str(error)[:200]}"
            finally:
                free_memory(device)
        img = txt = log_t = bias = None  # noqa: F841 - freed before the next batch's tensors
        free_memory(device)
    return rows


# --- (b) a training step ------------------------------------------------------------------------------------------

def hf_model(cfg, device, checkpointing: bool = False):
    """A random transformers SiglipModel (ViT-B/16 in the full run), as SiglipTrainer takes it (its adapter)."""
    from transformers import SiglipConfig, SiglipModel

    from hf_siglip.dual_encoders import as_dual_encoder

    torch.manual_seed(0)
    config = SiglipConfig(text_config=dict(cfg["text"]), vision_config=dict(cfg["vision"]))
    config._attn_implementation = "sdpa"
    model = as_dual_encoder(SiglipModel(config)).to(device).train()
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable's new name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def open_clip_model(cfg, device, checkpointing: bool = False):
    """open_clip's own ViT-B-16-SigLIP, random weights (tiny: its image size and context length forced smaller)."""
    open_clip = open_clip_module()
    tiny = cfg["vision"]["hidden_size"] < 768
    forced = dict(force_image_size=cfg["vision"]["image_size"],
                  force_context_length=cfg["text"]["max_position_embeddings"]) if tiny else {}
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, pretrained_image=False, pretrained_text=False,
                                   device=device, **forced).train()
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model


def random_batch(cfg, batch: int, device) -> dict:
    """Random pixels and token ids, made on the device (a 32k batch of 224 px images is 20 GB: not made on the host)."""
    generator = torch.Generator(device=device).manual_seed(batch)
    size, tokens = cfg["vision"]["image_size"], cfg["text"]["max_position_embeddings"]
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator, device=device),
            "input_ids": torch.randint(1, cfg["text"]["vocab_size"], (batch, tokens), generator=generator,
                                       device=device),
            "image_ids": torch.arange(batch, device=device), "text_ids": torch.arange(batch, device=device)}


def plain_step(model, device):
    """One training step of `model` (hf) with hf_siglip's loss and AdamW, as a plain PyTorch loop writes it."""
    from hf_siglip.loss import sigmoid_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4,
                                  fused=device.type == "cuda")

    def step(batch):
        with autocast(device):
            out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
            loss = sigmoid_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias,
                                batch["image_ids"], batch["text_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def open_clip_step(model, device):
    """One training step of open_clip's model with its SigLipLoss and AdamW (as its training loop does)."""
    loss_fn = open_clip_siglip_loss()()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4,
                                  fused=device.type == "cuda")

    def step(batch):
        with autocast(device):
            image_features, text_features, logit_scale, logit_bias = model(batch["pixel_values"],
                                                                           batch["input_ids"])[:4]
            loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops_per_pair(forward_backward, batch: dict, rows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(batch)
    return counter.get_total_flops() / rows


def loop_rate(step, batch: dict, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync(device)
    return len(batch["image_ids"]) * steps / (time.perf_counter() - start)


def trainer_rate(model, cfg, batch: dict, device) -> float:
    """pairs/s of SiglipTrainer.train(): max_steps = warm-up + timed steps, timed between step ends by a callback
    that synchronises with the device. The collator hands the prepared device batch, so the trainer's own work is
    what is timed beside the model's."""
    from transformers import TrainerCallback

    import hf_siglip as hs

    class DeviceStepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter())

    rows = len(batch["image_ids"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = hs.SiglipTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=rows, max_steps=cfg["warmup"] + cfg["steps"],
            learning_rate=1e-4, adam_beta2=0.95, weight_decay=1e-4, bf16=True, use_cpu=device.type != "cuda",
            logging_steps=10, report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_pin_memory=False, dataloader_drop_last=True, seed=0, pretrained_towers=[])
        clock = DeviceStepClock()
        dataset = list(range(rows * (cfg["warmup"] + cfg["steps"])))  # row numbers: the collator hands `batch`
        hs.SiglipTrainer(model=model, args=args, train_dataset=dataset, data_collator=lambda rows_: dict(batch),
                         callbacks=[clock]).train()
    if len(clock.times) != cfg["warmup"] + cfg["steps"]:
        raise RuntimeError(f"SiglipTrainer ran {len(clock.times)} steps, not {cfg['warmup'] + cfg['steps']}")
    return rows * cfg["steps"] / (clock.times[-1] - clock.times[cfg["warmup"] - 1])


def section_step(cfg, device, peak: float | None) -> list[dict]:
    rows = []
    batch_size = cfg["step_batch"]

    def add(name, build, make_rate):
        """`make_rate(model)` on a model from `build`; FLOPs per pair counted first, on 4 pairs of the same model."""
        row = {"name": name, "batch": batch_size}
        rows.append(row)
        try:
            model = build(cfg, device)
            step = plain_step(model, device) if build is hf_model else open_clip_step(model, device)
            row["GFLOPs_per_pair"] = count_flops_per_pair(step, random_batch(cfg, 4, device), 4) / 1e9
            del step
            row["pairs_per_s"] = make_rate(model)
            row["peak_fraction"] = (row["pairs_per_s"] * row["GFLOPs_per_pair"] / 1e3 / peak) if peak else "unknown"
        except Skip as reason:
            row["skipped"] = str(reason)
        except Exception as error:  # noqa: BLE001 - one failed row must not end the device run
            traceback.print_exc()
            row["skipped" if is_oom(error) else "failed"] = f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            model = None
            free_memory(device)

    add("SiglipTrainer (hf SiglipModel, hf_siglip loss)", hf_model,
        lambda model: trainer_rate(model, cfg, random_batch(cfg, batch_size, device), device))
    add("plain loop (hf SiglipModel, hf_siglip loss, AdamW)", hf_model,
        lambda model: loop_rate(plain_step(model, device), random_batch(cfg, batch_size, device), device,
                                cfg["warmup"], cfg["steps"]))
    add("open_clip ViT-B-16-SigLIP + SigLipLoss, AdamW", open_clip_model,
        lambda model: loop_rate(open_clip_step(model, device), random_batch(cfg, batch_size, device), device,
                                cfg["warmup"], cfg["steps"]))
    return rows


# --- (c) the largest batch ----------------------------------------------------------------------------------------

def largest_batch(make_step, make_batch, start: int, bound: int, device) -> dict:
    """Doubling from `start`: the last batch whose step ran and the first that ran out of memory (or the bound)."""
    fits, batch, oom_at = None, start, None
    step = make_step()
    while batch <= bound:
        try:
            step(make_batch(batch))
            sync(device)
            fits = batch
        except Exception as error:  # only an out-of-memory error ends the search quietly
            if not is_oom(error):
                raise
            oom_at = batch
            break
        finally:
            free_memory(device)
        batch *= 2
    return {"largest_batch": fits, "first_oom": oom_at, "bound": bound,
            "result": (f">= {fits} (bound)" if oom_at is None else f"{fits} ({oom_at} runs out)")}


def section_max_batch(cfg, device) -> list[dict]:
    rows = []
    for name, build, make_step in (("ours (hf SiglipModel + hf_siglip loss)", hf_model, plain_step),
                                   ("open_clip ViT-B-16-SigLIP + SigLipLoss", open_clip_model, open_clip_step)):
        for checkpointing in (False, True):
            row = {"name": name, "activation_checkpointing": checkpointing}
            rows.append(row)
            bound = cfg["search_bound_checkpointed" if checkpointing else "search_bound"]
            try:
                model = build(cfg, device, checkpointing)
                start = time.perf_counter()
                row.update(largest_batch(lambda: make_step(model, device),
                                         lambda rows_: random_batch(cfg, rows_, device),
                                         cfg["search_start"], bound, device))
                row["search_s"] = time.perf_counter() - start
                model = None  # noqa: F841 - freed before the next model
            except Skip as reason:
                row["skipped"] = str(reason)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                row["failed"] = f"{type(error).__name__}: {str(error)[:200]}"
            finally:
                free_memory(device)
    return rows


# --- (d) the data path --------------------------------------------------------------------------------------------

def section_data(cfg, device) -> list[dict]:
    from data import WORDS, dataloader_throughput, write_web_imagefolder

    from data_fixtures import make_processor
    from hf_siglip.data import SiglipDataCollator, load_image_text_dataset
    from hf_siglip.data.shards import load_webdataset_shards, write_webdataset_shards

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        width, height = cfg["jpeg_size"]
        dataset = load_image_text_dataset(write_web_imagefolder(os.path.join(folder, "images"), cfg["data_images"],
                                                                width, height))
        write_webdataset_shards(dataset, os.path.join(folder, "shards"),
                                rows_per_shard=max(cfg["data_images"] // cfg["data_shards"], 1))
        print(f"  shards written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        shards = load_webdataset_shards(os.path.join(folder, "shards"))
        collator = SiglipDataCollator(processor=make_processor(image_size=cfg["data_image_size"], words=WORDS),
                                      max_length=16)
        for workers in cfg["workers"]:
            row = {"name": f"tar shards -> SiglipDataCollator, {workers} workers", "workers": workers,
                   "image_size": cfg["data_image_size"], "jpeg": f"{width}x{height}"}
            rows.append(row)
            try:
                images, wall, cpu = dataloader_throughput(shards, collator, workers, batch_size=cfg["data_batch"])
                row.update(images=images, images_per_s=images / wall, images_per_cpu_s=images / cpu)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                row["failed"] = f"{type(error).__name__}: {str(error)[:200]}"
    return rows


# --- output -------------------------------------------------------------------------------------------------------

COLUMNS = {
    "loss": ("name", "batch", "ms", "peak_MiB", "loss", "loss_rel_diff"),
    "step": ("name", "batch", "pairs_per_s", "GFLOPs_per_pair", "peak_fraction"),
    "max_batch": ("name", "activation_checkpointing", "result", "search_s"),
    "data": ("name", "images", "images_per_s", "images_per_cpu_s"),
}


def cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def markdown(section: str, rows: list[dict]) -> str:
    columns = COLUMNS[section]
    lines = [f"| {' | '.join(columns)} |", f"|{'|'.join('---' for _ in columns)}|"]
    for row in rows:
        note = row.get("skipped") or row.get("failed")
        if note:
            status = "skipped" if "skipped" in row else "FAILED"
            lines.append(f"| {row['name']} | {status}: {note} |" + " |" * (len(columns) - 2))
        else:
            lines.append(f"| {' | '.join(cell(row.get(column)) for column in columns)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU/CI)")
    parser.add_argument("--out", default=".", help="folder for gpu_results.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    cfg = TINY if args.tiny else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        parser.error("the full run needs a CUDA device; use --tiny on CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "peak_bf16_tflops": peak if peak else "unknown", "tiny": args.tiny, "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "accelerate", "datasets", "hf_siglip",
                                                 "open_clip_torch", "timm", "siglip-kernel", "triton")}}
    print("| " + " | ".join(f"{key}: {value}" for key, value in meta.items()) + " |")
    results = {"meta": meta, "sections": {}}
    run = {"loss": lambda: section_loss(cfg, device), "step": lambda: section_step(cfg, device, peak),
           "max_batch": lambda: section_max_batch(cfg, device), "data": lambda: section_data(cfg, device)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_results.json")
    total = time.perf_counter()
    for section in sections:
        start = time.perf_counter()
        rows = run[section]()
        elapsed = time.perf_counter() - start
        results["sections"][section] = {"rows": rows, "elapsed_s": elapsed}
        print(f"\n### {section} ({elapsed:.1f} s; {time.perf_counter() - total:.1f} s so far)\n")
        print(markdown(section, rows), flush=True)
        with open(path, "w") as handle:  # after every section: a run cut short keeps what it measured
            json.dump(results, handle, indent=1)
    print(f"\ntotal {time.perf_counter() - total:.1f} s; {path}")
    return 1 if any("failed" in row for part in results["sections"].values() for row in part["rows"]) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
