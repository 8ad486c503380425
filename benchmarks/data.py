"""Throughput of the data side: the caption-sampling map and SiglipDataCollator.

    PYTHONPATH=. python benchmarks/data.py --rows 100000

Rows: a 32x32 PNG (1,000 distinct images, repeated), 5 original captions and 5 pseudo-captions.
* caption sampling: ``add_sampled_captions`` (k=3, weights 1:0.5) on an Arrow dataset saved to disk,
  ``num_proc`` 1 and 2, cache disabled so every run computes;
* collator: a ``DataLoader`` (batch 256) over the same dataset with ``Image(decode=False)`` rows
  (the collator decodes the PNGs, resizes to 32x32, tokenizes 5 captions per image to 64 tokens),
  ``num_workers`` 0 (in-process, "1") and 2; and over pre-decoded PIL images in memory.
Prints a Markdown table of rows/s.
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

from hf_siglip.data import CaptionSampler, SiglipDataCollator, add_sampled_captions  # noqa: E402

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


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--collator-rows", type=int, default=None, help="rows for the collator (default: --rows)")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
