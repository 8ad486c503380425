"""Throughput of the data side: the caption-sampling map and SiglipDataCollator.

    PYTHONPATH=. python benchmarks/data.py --rows 100000

Rows: a 32x32 PNG (1,000 distinct images, repeated), 5 original captions and 5 pseudo-captions.
* caption sampling: ``add_sampled_captions`` (k=3, weights 1:0.5) on an Arrow dataset saved to disk,
  ``num_proc`` 1 and 2, cache disabled so every run computes;
* collator: a ``DataLoader`` (batch 256) over the same dataset with ``Image(decode=False)`` rows
  (the collator decodes the PNGs, resizes to 32x32, tokenizes 5 captions per image to 64 tokens),
  ``num_workers`` 0 (in-process, "1") and 2; in-process with training augmentation (none, crop + flip,
  crop + flip + colour jitter + blur); and over pre-decoded PIL images in memory.
Prints a Markdown table of rows/s, then the 224 px image tables:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data.py --images-only --image-rows 2048

* image routes: ``SiglipDataCollator`` (batch 256, ``SiglipImageProcessorPil`` at 224 x 224, one short caption)
  over 512 photo-like JPEGs (``web_jpegs``: quality 90, ~1.9 bits per pixel) of 500 x 375 and of 1024 x 768, in
  this process on one thread: full decode + processor (the route before draft decoding), draft decode +
  processor, draft decode + fast path with Pillow's and with torch's resize, and JPEG decoding alone. Rates are
  images per CPU-second (images/s per core; CPU time stays meaningful when other jobs share the cores), best of 3;
* DataLoader: the same collator through ``torch.utils.data.DataLoader`` with 0, 1 and 2 workers over an
  imagefolder of ``--image-rows`` 500 x 375 JPEGs opened with ``load_image_text_dataset``: images/s of wall time
  (worker start-up included) and per CPU-second of this process and its workers. ``dataloader_throughput`` takes
  any dataset of collator rows (tar shards too).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data.py --handoff-only --image-rows 2048

* worker hand-off (issue 25 item 7): the default collator over the same imagefolder in-process and through 1 and 2
  DataLoader workers, handing float32 batches (the collator normalises; before) against ``uint8`` batches
  (``normalize_on_device=True``, what ``SiglipTrainer`` uses: the trainer normalises on the device), side by side
  in images per CPU-second of this process and its workers, best of ``--repeats`` passes, and each rate against
  the in-process float32 one. The normalisation itself runs on the GPU in training and is not in these figures;
  its CPU cost (when the device is the CPU) is printed below the table.

    PYTHONPATH=. python benchmarks/data.py --learnability 150

instead checks that the embedded demo dataset is learnable on a CPU: it trains a tiny random
``transformers.SiglipModel`` (width 64, 2+2 layers, 4x4 patches on 32x32 images, word-level tokenizer)
with its built-in sigmoid loss (t' = log 10, b = -10 at init, one caption per image sampled per step
by the collator's CaptionSampler hook; AdamW lr 1e-3, beta2 0.95, batch 128) for a wall-clock budget,
then prints zero-shot top-1 on the held-out split (DEMO_CLASSES x DEMO_TEMPLATES, chance 1/30) and
image->text recall@1/5 over the held-out captions.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from data_fixtures import make_processor, photo_like  # noqa: E402
from hf_siglip.data import (  # noqa: E402
    DEMO_CLASSES,
    DEMO_TEMPLATES,
    CaptionSampler,
    SiglipDataCollator,
    add_sampled_captions,
    decode_image,
    make_demo_dataset,
)
from hf_siglip.data.augmentation import ImageAugmentation  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "large", "small"]


def build(rows: int, folder: str) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(1000):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())

    def caption(n):
        return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]

    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "caption": datasets.List(datasets.Value("string")),
                                  "pseudo_captions": datasets.List(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    vocab = [caption(5) for _ in range(1000)]
    pseudo = [caption(5) for _ in range(1000)]

    def gen():
        for i in range(rows):
            yield {"image": {"bytes": pngs[i % 1000], "path": None}, "caption": vocab[i % 1000],
                   "pseudo_captions": pseudo[(i * 7) % 1000], "image_id": i}

    datasets.Dataset.from_generator(gen, features=features).save_to_disk(folder)
    return datasets.load_from_disk(folder)


# (width, height, JPEG quality): a typical web photo at two qualities, and a larger one that draft decoding halves
WEB_JPEGS = ((500, 375, 90), (500, 375, 75), (1024, 768, 90))


def web_jpegs(width: int, height: int, quality: int = 90, distinct: int = 32, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (``photo_like``; at 500 x 375 ~1.9 bits per pixel at quality 90, ~1.1 at 75)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        photo_like(rng, width, height).save(buffer, format="JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    return jpegs


class FullDecodeCollator(SiglipDataCollator):
    """The collator as it was before draft decoding: every JPEG decoded at full size."""

    def _decode_size(self):
        return None


# route -> (collator class, image_fast_path)
IMAGE_ROUTES = {
    "full decode + processor (before)": (FullDecodeCollator, None),
    "draft decode + processor": (SiglipDataCollator, None),
    "draft decode + fast path, Pillow resize": (SiglipDataCollator, "pil"),
    "draft decode + fast path, torch resize (default)": (SiglipDataCollator, "torch"),
}


def cpu_seconds() -> float:
    """CPU time of this process (fine-grained) and of its finished children (DataLoader workers are joined when a
    pass ends; os.times() counts them in clock ticks of 10 ms)."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def timed(work, repeats: int = 3) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``work()``, the run with the least CPU time of ``repeats``."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        work()
        best = min(best, (time.perf_counter() - wall, cpu_seconds() - cpu), key=lambda pair: pair[1])
    return best


def image_routes(images: int = 512, batch_size: int = 256, image_size: int = 224) -> dict[str, dict[str, float]]:
    """Images per CPU-second (one thread: images/s per core) through ``SiglipDataCollator`` for each image route
    and web JPEG, plus JPEG decoding alone (the floor of any route). {route: {"500x375 q90": rate, ...}}."""
    processor = make_processor(image_size=image_size, words=WORDS)
    table: dict[str, dict[str, float]] = {}
    for width, height, quality in WEB_JPEGS:
        jpegs = web_jpegs(width, height, quality)
        rows = [{"image": {"bytes": jpegs[i % len(jpegs)], "path": None}, "caption": "a red circle", "image_id": i}
                for i in range(images)]
        column = f"{width}x{height} q{quality}"
        print(f"{column}: {np.mean([len(jpeg) for jpeg in jpegs]) * 8 / width / height:.2f} bits per pixel",
              file=sys.stderr)
        for route, (collator_class, fast_path) in IMAGE_ROUTES.items():
            collator = collator_class(processor=processor, max_length=16, image_fast_path=fast_path)
            collator(rows[:8])  # warm up (imports, first allocations)
            _, cpu = timed(lambda collator=collator, rows=rows: [collator(rows[i:i + batch_size])
                                                                 for i in range(0, images, batch_size)])
            table.setdefault(route, {})[column] = images / cpu
        _, cpu = timed(lambda rows=rows: [decode_image(row["image"], min_size=(image_size, image_size))
                                          for row in rows])
        table.setdefault("JPEG draft decoding alone (floor)", {})[column] = images / cpu
    return table


def dataloader_throughput(dataset, collator, workers: int, batch_size: int = 256,
                          repeats: int = 2) -> tuple[int, float, float]:
    """Passes of a ``torch.utils.data.DataLoader`` over ``dataset`` (any map-style or iterable dataset of rows the
    collator reads: an imagefolder, tar shards...): (images, wall seconds, CPU seconds of this process and its
    workers) of the pass with the least CPU time. Worker start-up is included, as a training epoch pays it."""
    images = 0

    def one_pass():
        nonlocal images
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
        images = sum(batch["pixel_values"].shape[0] for batch in loader)
        # the workers are joined when the pass ends: their CPU time is then in os.times()' children fields

    wall, cpu = timed(one_pass, repeats)
    return images, wall, cpu


def write_web_imagefolder(folder: str, files: int, width: int = 500, height: int = 375) -> str:
    """An imagefolder of ``files`` web-like JPEGs (32 distinct images, repeated) with a ``metadata.jsonl``."""
    import json

    os.makedirs(folder, exist_ok=True)
    jpegs = web_jpegs(width, height)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as metadata:
        for index in range(files):
            name = f"{index:05d}.jpg"
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(jpegs[index % len(jpegs)])
            metadata.write(json.dumps({"file_name": name, "caption": "a red circle on the left"}) + "\n")
    return folder


def imagefolder_loading(folder: str, files: int, workers=(0, 1, 2), image_size: int = 224) -> list[tuple]:
    """(route, workers, images, wall s, CPU s) through a DataLoader over an imagefolder of 500 x 375 JPEGs opened
    with ``load_image_text_dataset`` (``Image(decode=False)``: the collator decodes), old route against the default."""
    from hf_siglip.data import load_image_text_dataset

    dataset = load_image_text_dataset(write_web_imagefolder(folder, files))
    processor = make_processor(image_size=image_size, words=WORDS)
    results = []
    for route in ("full decode + processor (before)", "draft decode + fast path, torch resize (default)"):
        collator_class, fast_path = IMAGE_ROUTES[route]
        for count in workers:
            collator = collator_class(processor=processor, max_length=16, image_fast_path=fast_path)
            results.append((f"imagefolder, {route}", count, *dataloader_throughput(dataset, collator, count)))
    # the same files as webdataset tar shards (8, so 2 workers get 4 each), streamed
    from hf_siglip.data.shards import load_webdataset_shards, write_webdataset_shards

    write_webdataset_shards(dataset, os.path.join(folder, "shards"), rows_per_shard=max(files // 8, 1))
    shards = load_webdataset_shards(os.path.join(folder, "shards"))
    collator_class, fast_path = IMAGE_ROUTES["draft decode + fast path, torch resize (default)"]
    for count in workers:
        collator = collator_class(processor=processor, max_length=16, image_fast_path=fast_path)
        results.append(("tar shards (streamed), draft decode + fast path (default)", count,
                        *dataloader_throughput(shards, collator, count)))
    return results


def worker_handoff(folder: str, files: int, workers=(0, 1, 2), repeats: int = 3,
                   image_size: int = 224) -> dict[tuple[str, int], tuple[int, float, float]]:
    """{(batches, workers): (images, wall s, CPU s)} for the default collator over an imagefolder of 500 x 375 JPEGs,
    handing float32 batches (``normalize_on_device=False``) or uint8 ones (True), passes interleaved so that a
    change in the machine's load hits both alike."""
    from hf_siglip.data import load_image_text_dataset

    dataset = load_image_text_dataset(write_web_imagefolder(folder, files))
    processor = make_processor(image_size=image_size, words=WORDS)
    results = {}
    for count in workers:
        for batches, on_device in (("float32", False), ("uint8", True)):
            collator = SiglipDataCollator(processor=processor, max_length=16, normalize_on_device=on_device)
            results[batches, count] = dataloader_throughput(dataset, collator, count, repeats=repeats)
    return results


def normalisation_cost(images: int = 256, image_size: int = 224) -> float:
    """CPU milliseconds per image of ``normalize_pixel_values`` on a uint8 batch, when the device is this CPU."""
    from hf_siglip.data.collator import normalize_pixel_values

    pixels = torch.randint(0, 256, (images, 3, image_size, image_size), dtype=torch.uint8)
    scale_offset = torch.tensor([[2 / 255] * 3, [-1.0] * 3]).expand(images, 2, 3)
    _, cpu = timed(lambda: normalize_pixel_values({"pixel_values": pixels, "pixel_normalization": scale_offset}))
    return cpu / images * 1000


def print_handoff_table(results: dict[tuple[str, int], tuple[int, float, float]]) -> None:
    base, base_uint8 = (results[kind, 0][0] / results[kind, 0][2] for kind in ("float32", "uint8"))
    print("\n| DataLoader (batch 256), 500x375 q90 JPEGs, 224 px | workers | float32 batches (before): images per "
          "CPU-second | x in-process float32 | uint8 batches, normalised on the device: images per CPU-second | "
          "x in-process float32 | x in-process uint8 | images/s (wall), float32 / uint8 |")
    print("|---|---|---|---|---|---|---|---|")
    for count in sorted({workers for _, workers in results}):
        (n_f, wall_f, cpu_f), (n_u, wall_u, cpu_u) = results["float32", count], results["uint8", count]
        print(f"| default collator | {count if count else '0 (in-process)'} | {n_f / cpu_f:,.0f} | "
              f"{n_f / cpu_f / base:.2f} | {n_u / cpu_u:,.0f} | {n_u / cpu_u / base:.2f} | "
              f"{n_u / cpu_u / base_uint8:.2f} | {n_f / wall_f:,.0f} / {n_u / wall_u:,.0f} |")
    print(f"\n(normalize_pixel_values on this CPU, were it the device: {normalisation_cost():.3f} ms per image)")


def print_image_tables(routes: dict[str, dict[str, float]], loading: list[tuple]) -> None:
    columns = [f"{w}x{h} q{q}" for w, h, q in WEB_JPEGS]
    print("\n| route (SiglipDataCollator, 224 x 224 pixel_values), images/s per core | " +
          " | ".join(f"{c} JPEG" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for route, rates in routes.items():
        print(f"| {route} | " + " | ".join(f"{rates[c]:,.0f}" for c in columns) + " |")
    print("\n| DataLoader (batch 256), 500x375 q90 JPEGs | workers | images | wall s | images/s | "
          "images per CPU-second |")
    print("|---|---|---|---|---|---|")
    for route, workers, images, wall, cpu in loading:
        print(f"| {route} | {workers} | {images:,} | {wall:.1f} | {images / wall:,.0f} | {images / cpu:,.0f} |")


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}"


def demo_learnability(seconds: float, width: int, patch: int) -> None:
    """Train a tiny random SiglipModel on the demo for ``seconds``; print held-out zero-shot and recall."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    start = time.time()
    demo = make_demo_dataset(n_train=4000, n_test=500)
    processor = make_processor(32)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), max_position_embeddings=16, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **common),
        vision_config=dict(image_size=32, patch_size=patch, **common))
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10)))
        model.logit_bias.fill_(-10.0)
    collator = SiglipDataCollator(processor=processor, max_length=16, caption_sampler=CaptionSampler(["caption"], k=1))
    train, test = list(demo["train"]), list(demo["test"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    step = 0
    while step == 0 or time.time() - start < seconds:  # at least one step
        collator.set_epoch(step)
        batch = collator([train[i] for i in rng.choice(len(train), 128, replace=False)])
        loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        prompts = [t.format(c) for c in DEMO_CLASSES for t in DEMO_TEMPLATES]
        tokens = processor.tokenizer(prompts, padding="max_length", max_length=16, truncation=True)
        ids = torch.tensor(tokens["input_ids"])
        prompt_embeds = normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        class_embeds = normalize(prompt_embeds.view(len(DEMO_CLASSES), len(DEMO_TEMPLATES), -1).mean(1), dim=-1)
        held_out = SiglipDataCollator(processor=processor, max_length=16)(test)
        image_embeds = normalize(model.get_image_features(pixel_values=held_out["pixel_values"]).pooler_output, dim=-1)
        text_embeds = normalize(model.get_text_features(input_ids=held_out["input_ids"]).pooler_output, dim=-1)
    labels = torch.tensor([r["label"] for r in test])
    zero_shot = ((image_embeds @ class_embeds.T).argmax(1) == labels).float().mean().item()
    ranks = (image_embeds @ text_embeds.T).argsort(dim=1, descending=True)
    hits = held_out["text_ids"][ranks] == held_out["image_ids"][:, None]
    recall = {k: hits[:, :k].any(1).float().mean().item() for k in (1, 5)}
    chance_r1 = 1 / len(test)
    print(f"steps {step} in {time.time() - start:.0f}s | final loss {loss.item():.3f} | zero-shot top-1 "
          f"{zero_shot:.3f} (chance {1 / len(DEMO_CLASSES):.3f}) | image->text R@1 {recall[1]:.3f} "
          f"R@5 {recall[5]:.3f} (chance R@1 {chance_r1:.3f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--collator-rows", type=int, default=None, help="rows for the collator (default: --rows)")
    parser.add_argument("--learnability", type=float, default=None, metavar="SECONDS",
                        help="train a tiny model on the demo dataset for SECONDS instead of measuring throughput")
    parser.add_argument("--width", type=int, default=64, help="--learnability: model width")
    parser.add_argument("--patch", type=int, default=4, help="--learnability: ViT patch size")
    parser.add_argument("--image-rows", type=int, default=2048,
                        help="images through each route of the 224 px image table, and files in its imagefolder")
    parser.add_argument("--images-only", action="store_true", help="print only the 224 px image tables")
    parser.add_argument("--handoff-only", action="store_true",
                        help="print only the worker hand-off table (float32 against uint8 batches)")
    parser.add_argument("--repeats", type=int, default=3, help="--handoff-only: passes per cell (best is kept)")
    args = parser.parse_args()
    if args.learnability is not None:
        demo_learnability(args.learnability, args.width, args.patch)
        return
    collator_rows = args.collator_rows or args.rows
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    if args.handoff_only:
        with tempfile.TemporaryDirectory() as folder:
            print_handoff_table(worker_handoff(os.path.join(folder, "web_jpegs"), args.image_rows,
                                               repeats=args.repeats))
        return
    if args.images_only:
        image_tables(args.image_rows)
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        dataset = build(args.rows, os.path.join(folder, "data"))
        sampler = CaptionSampler({"caption": 1.0, "pseudo_captions": 0.5}, k=3, seed=0)
        for num_proc in (1, 2):
            start = time.perf_counter()
            out = add_sampled_captions(dataset, sampler, epoch=num_proc, num_proc=num_proc if num_proc > 1 else None,
                                       load_from_cache_file=False)
            elapsed = time.perf_counter() - start
            assert len(out) == args.rows
            results.append(("caption sampling map (k=3 of 5+5)", num_proc, args.rows, elapsed))

        processor = make_processor(image_size=32, words=WORDS)
        subset = dataset.select(range(collator_rows))
        for workers in (0, 2):
            collator = SiglipDataCollator(processor=processor, max_length=64)
            loader = torch.utils.data.DataLoader(subset, batch_size=256, num_workers=workers, collate_fn=collator)
            start = time.perf_counter()
            seen = sum(batch["image_ids"].numel() for batch in loader)
            elapsed = time.perf_counter() - start
            assert seen == collator_rows
            results.append(("collator, PNG bytes (DataLoader workers)", max(workers, 1), collator_rows, elapsed))

        # training augmentation (the image_augmentation data step) against none, same rows, in-process
        augmentations = {"none": None, "crop + flip": ImageAugmentation(),
                         "crop + flip + jitter + blur": ImageAugmentation(color_jitter=(0.4, 0.4, 0.4, 0.1),
                                                                          blur_sigma=(0.1, 2.0))}
        augmented_rows = subset.select(range(min(collator_rows, 20_000)))
        for name, augmentation in augmentations.items():
            collator = SiglipDataCollator(processor=processor, max_length=64, image_transform=augmentation)
            loader = torch.utils.data.DataLoader(augmented_rows, batch_size=256, collate_fn=collator)
            start = time.perf_counter()
            seen = sum(batch["image_ids"].numel() for batch in loader)
            results.append((f"collator, PNG bytes, augmentation: {name}", 1, seen, time.perf_counter() - start))

        decoded = [{"image": Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"), "caption": r["caption"],
                    "image_id": r["image_id"]} for r in subset.select(range(min(collator_rows, 20_000)))]
        collator = SiglipDataCollator(processor=processor, max_length=64)
        start = time.perf_counter()
        seen = sum(collator(decoded[i:i + 256])["image_ids"].numel() for i in range(0, len(decoded), 256))
        results.append(("collator, pre-decoded PIL (in-process)", 1, seen, time.perf_counter() - start))

    print("| stage | num_proc / workers | rows | seconds | rows/s |")
    print("|---|---|---|---|---|")
    for name, procs, rows, seconds in results:
        print(f"| {name} | {procs} | {rows:,} | {seconds:.1f} | {rate(rows, seconds)} |")
    image_tables(args.image_rows)


def image_tables(images: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print_image_tables(image_routes(images=min(images, 512)),
                           imagefolder_loading(os.path.join(folder, "web_jpegs"), files=images))
    with tempfile.TemporaryDirectory() as folder:
        print_handoff_table(worker_handoff(os.path.join(folder, "web_jpegs"), images))


if __name__ == "__main__":
    main()
