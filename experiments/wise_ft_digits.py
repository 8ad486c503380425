"""WiSE-FT on a tiny model (docs/EXPERIMENTS.md, "Fine-tuning that does not forget"): a small SigLIP is trained on
scikit-learn's digits (the anchor: its zero-shot digit classification is what fine-tuning may forget), then
fine-tuned on the demo (the target: its captions differ per image, so retrieval recall measures what fine-tuning
gains) with digits as `--anchor_dataset` and a sweep of mixes, per seed. (The other direction, fine-tuning on digits,
measures nothing: digits' template captions tie, so its recall stays at chance.) Everything runs through `hf-siglip
train`; the figures are read from each run's eval_results.json.

    OMP_NUM_THREADS=1 python experiments/wise_ft_digits.py --seeds 0 1 2 --out /tmp/wise_ft
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOWERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
              max_length=16, use_cpu="true", bf16="false", report_to="none")
PRETRAIN = dict(per_device_train_batch_size=64, per_device_eval_batch_size=128, max_steps=300, learning_rate=2e-3,
                warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=1e-4, logging_steps=50)
FINETUNE = dict(dataset="demo", demo_train_size=2000, demo_test_size=300, demo_image_size=32,
                per_device_train_batch_size=64, per_device_eval_batch_size=128, max_steps=200, learning_rate=1e-3,
                warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=1e-4, logging_steps=50,
                wise_ft_alphas="0,0.25,0.5,0.75,1", wise_ft_rule="anchor_drop", wise_ft_max_anchor_drop=0.01,
                eval_strategy="no")


def train(values: dict) -> float:
    started = time.time()
    command = [sys.executable, "-m", "hf_siglip", "train"]
    for name, value in values.items():  # a list is several values of one flag
        command += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return time.time() - started


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/wise_ft"))
    options = parser.parse_args()
    from hf_siglip.data import make_digits_dataset
    from hf_siglip.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES

    digits = options.out / "digits"
    if not digits.exists():
        make_digits_dataset(n_captions=3, image_size=32, seed=0).save_to_disk(digits)
    summary = {}
    for seed in options.seeds:
        start, tuned = options.out / f"start-{seed}", options.out / f"finetuned-{seed}"
        seconds = {"pretrain": train({**TOWERS, **PRETRAIN, "dataset": digits, "seed": seed, "output_dir": start})}
        seconds["finetune"] = train({**{k: v for k, v in TOWERS.items() if k in ("max_length", "use_cpu", "bf16",
                                                                                  "report_to")},
                                     **FINETUNE, "model_name_or_path": start, "anchor_dataset": digits,
                                     "anchor_classes": DIGITS_CLASSES, "anchor_templates": DIGITS_TEMPLATES,
                                     "seed": seed, "output_dir": tuned})
        sweep = json.loads((tuned / "eval_results.json").read_text())["wise_ft"]
        summary[seed] = {"alpha": sweep["alpha"], "seconds": seconds,
                         "rows": [{k: row[k] for k in ("alpha", "target", "anchor")} for row in sweep["rows"]]}
        print(json.dumps({seed: summary[seed]}), flush=True)
    alphas = [row["alpha"] for row in next(iter(summary.values()))["rows"]]
    print("alpha | target recall@1 (mean ± sd) | anchor top-1 (mean ± sd)")
    for index, alpha in enumerate(alphas):
        target = [run["rows"][index]["target"] for run in summary.values()]
        anchor = [run["rows"][index]["anchor"] for run in summary.values()]
        print(f"{alpha:g} | {statistics.mean(target):.3f} ± {spread(target):.3f} | "
              f"{statistics.mean(anchor):.3f} ± {spread(anchor):.3f}")
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
