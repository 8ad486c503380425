"""Throughput of the data side: the caption-sampling map and SiglipDataCollator.

    PYTHONPATH=. python benchmarks/data.py --rows 100000

Rows: a 32x32 PNG (1,000 distinct images, repeated), 5 original captions and 5 pseudo-captions.
* caption sampling: ``add_sampled_captions`` (k=3, weights 1:0.5) on an Arrow dataset saved to disk,
  ``num_proc`` 1 and 2, cache disabled so every run computes;
* collator: a ``DataLoader`` (batch 256) over the same dataset with ``Image(decode=False)`` rows
  (the collator decodes the PNGs, resizes to 32x32, tokenizes 5 captions per image to 64 tokens),
  ``num_workers`` 0 (in-process, "1") and 2; in-process with training augmentation (none, crop + flip,
  crop + flip + colour jitter + blur); and over pre-decoded PIL images in memory.
Prints a Markdown table of rows/s.

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
from data_fixtures import make_processor  # noqa: E402

from hf_siglip.data.augmentation import ImageAugmentation  # noqa: E402
from hf_siglip.data import (DEMO_CLASSES, DEMO_TEMPLATES, CaptionSampler, SiglipDataCollator,  # noqa: E402
                            add_sampled_captions, make_demo_dataset)

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


def jpeg_decoding(n: int) -> list[tuple]:
    """Decode + resize + normalise to 224 x 224 (SiglipImageProcessorPil), photo-like JPEGs at two sizes, with
    and without draft decoding (DCT scaling straight to >= 224 per side)."""
    from transformers import SiglipImageProcessorPil

    from hf_siglip.data import decode_image

    processor = SiglipImageProcessorPil(size={"height": 224, "width": 224})
    rows = []
    for width, height in ((500, 375), (1024, 768)):
        y, x = np.mgrid[0:height, 0:width] / 40.0
        noise = np.random.default_rng(0).integers(0, 24, (height, width, 3))
        photo = (np.stack([np.sin(x) * 90 + 120, np.cos(y) * 90 + 120, (x + y) * 7 % 200], -1) + noise)
        buffer = io.BytesIO()
        Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        for label, size in (("full decode", None), ("draft decode", (224, 224))):
            start = time.perf_counter()
            for _ in range(n):
                processor(images=[decode_image(data, min_size=size)], return_tensors="pt")
            rows.append((f"JPEG {width}x{height} -> 224, {label}", 1, n, time.perf_counter() - start))
    return rows


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
        ids = torch.tensor(processor.tokenizer(prompts, padding="max_length", max_length=16, truncation=True)["input_ids"])
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
    args = parser.parse_args()
    if args.learnability is not None:
        demo_learnability(args.learnability, args.width, args.patch)
        return
    collator_rows = args.collator_rows or args.rows
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
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

    results.extend(jpeg_decoding(n=300))
    print("| stage | num_proc / workers | rows | seconds | rows/s |")
    print("|---|---|---|---|---|")
    for name, procs, rows, seconds in results:
        print(f"| {name} | {procs} | {rows:,} | {seconds:.1f} | {rate(rows, seconds)} |")


if __name__ == "__main__":
    main()
