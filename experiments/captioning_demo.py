"""Does the captioning decoder learn on the demo, and does it cost the dual encoder anything? (docs/EXPERIMENTS.md)

For each seed, two `hf-siglip train` runs on the embedded demo: `siglip_from_scratch` (sigmoid loss alone) and
`siglip2_captioning` (the same model, data and schedule plus the decoder, weight 1). From each run's
eval_results.json: retrieval recall@1 both ways and zero-shot top-1 on the demo's 500 held-out images. For the
decoder runs: the saved `captioner/` is loaded with plain transformers (`VisionEncoderDecoderModel`, `AutoProcessor`)
and greedily captions 500 freshly drawn demo images (seed 1000, never trained on); a caption names the right colour
when it holds the image's colour word and no other colour word (chance 1/6), the right shape likewise (chance 1/5).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/captioning_demo.py --output-dir outputs/captioning --seeds 0 1 2
    # what docs/EXPERIMENTS.md reports (a smaller scale, for a 2-core machine shared with other jobs):
    OMP_NUM_THREADS=1 .venv/bin/python experiments/captioning_demo.py --output-dir outputs/captioning_small \
        --parallel 3 --flags "--demo_train_size 2000 --num_train_epochs 3 --per_device_train_batch_size 64"

A run whose folder holds eval_results.json is reused (delete the folder to redo it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

ARMS = {"sigmoid": "siglip_from_scratch", "sigmoid + decoder": "siglip2_captioning"}
METRICS = ("eval_i2t_recall@1", "eval_t2i_recall@1", "eval_zero_shot_top1")


def train(recipe: str, seed: int, folder: str, flags: list[str]) -> None:
    if os.path.exists(os.path.join(folder, "eval_results.json")):
        return
    command = [sys.executable, "-m", "hf_siglip", "train", "--config", recipe, "--seed", str(seed), "--output_dir",
               folder, "--disable_tqdm", "true", *flags]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.log"), "w") as log:  # a file, not a pipe: a run outlives this script
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: see {folder}/train.log")


def caption_scores(folder: str, n_images: int = 500) -> dict:
    """Colour and shape word match rates of the captioner's greedy captions on freshly drawn demo images."""
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    from hf_siglip.data.demo import COLOURS, SHAPES, make_demo_dataset

    captioner = os.path.join(folder, "captioner")
    model = VisionEncoderDecoderModel.from_pretrained(captioner).eval()
    processor = AutoProcessor.from_pretrained(captioner)
    image_size = model.config.encoder.image_size
    rows = make_demo_dataset(n_train=1, n_test=n_images, image_size=image_size, seed=1000)["test"]
    colours, hits, examples = list(COLOURS), {"colour": 0, "shape": 0, "both": 0}, []
    for start in range(0, len(rows), 100):
        batch = rows[start:start + 100]
        pixel_values = processor.image_processor(batch["image"], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ids = model.generate(pixel_values)
        for text, label in zip(processor.tokenizer.batch_decode(ids, skip_special_tokens=True), batch["label"]):
            words = text.replace(",", " ").split()
            colour, shape = colours[label % len(colours)], SHAPES[label // len(colours)]
            colour_ok = colour in words and not any(c in words for c in colours if c != colour)
            shape_ok = shape in words and not any(s in words for s in SHAPES if s != shape)
            hits["colour"] += colour_ok
            hits["shape"] += shape_ok
            hits["both"] += colour_ok and shape_ok
            if len(examples) < 5:
                examples.append(f"{colour} {shape}: {text}")
    return {**{f"{name}_match": value / len(rows) for name, value in hits.items()}, "examples": examples}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/captioning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--only", nargs="*", help="train only these runs (folder names); the others are read")
    parser.add_argument("--flags", default="", help="more `hf-siglip train` flags for every run, e.g. a smaller scale")
    args = parser.parse_args()
    jobs = [(arm, recipe, seed, os.path.join(args.output_dir, f"{recipe}_seed{seed}"))
            for seed in args.seeds for arm, recipe in ARMS.items()]
    training = [job for job in jobs if args.only is None or os.path.basename(job[3]) in args.only]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda job: train(job[1], job[2], job[3], args.flags.split()), training))
    results = {}
    for arm, recipe, seed, folder in jobs:
        with open(os.path.join(folder, "eval_results.json")) as handle:
            metrics = json.load(handle)["metrics"]
        row = {name: metrics[name] for name in METRICS}
        with open(os.path.join(folder, "trainer_state.json")) as handle:
            state = json.load(handle)
        row["seconds"] = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
        if arm != "sigmoid":
            row.update(caption_scores(folder))
        results.setdefault(arm, {})[seed] = row
    print(json.dumps(results, indent=1))
    for arm, by_seed in results.items():
        print(f"\n{arm}")
        for name in (*METRICS, "colour_match", "shape_match", "both_match", "seconds"):
            values = [row[name] for row in by_seed.values() if name in row]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                print(f"  {name}: {statistics.mean(values):.3f} ± {spread:.3f} "
                      f"({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
