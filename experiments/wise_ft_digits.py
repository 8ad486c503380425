"""WiSE-FT on a tiny model (docs/EXPERIMENTS.md, "Fine-tuning that does not forget"), in the issue's direction: a
small SigLIP is pre-trained once on the demo (the "released checkpoint": its demo zero-shot is the anchor, what
fine-tuning may forget), then fine-tuned per seed on scikit-learn's digits (the target: digits zero-shot top-1, chance
0.1, `--wise_ft_target_metric zero_shot_top1`; digits' template captions are shared by every image of a digit, so
retrieval recall ties and measures nothing) with the demo as `--anchor_dataset` and a sweep of mixes. Pre-training
once and fine-tuning with several seeds is how WiSE-FT is used (one fixed zero-shot model, fine-tuned). Everything
runs through `hf-siglip train`; the figures are read from each run's eval_results.json.

    OMP_NUM_THREADS=1 python experiments/wise_ft_digits.py --seeds 0 1 2 --out /tmp/wise_ft
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEMO = dict(demo_test_size=300, demo_image_size=32)  # the anchor: 300 held-out demo images, 30 classes
COMMON = dict(max_length=16, use_cpu="true", bf16="false", report_to="none", per_device_eval_batch_size=128,
              warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=1e-4, logging_steps=50, eval_strategy="no")
PRETRAIN = dict(dataset="demo", demo_train_size=4000, **DEMO, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, patch_size=8, per_device_train_batch_size=64,
                max_steps=1500, learning_rate=2e-3, seed=0)
FINETUNE = dict(anchor_dataset="demo", **DEMO, per_device_train_batch_size=64, max_steps=3000, learning_rate=3e-3,
                wise_ft_alphas="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", wise_ft_rule="anchor_drop",
                wise_ft_max_anchor_drop=0.01, wise_ft_target_metric="zero_shot_top1")


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
    parser.add_argument("--pretrain_steps", type=int, default=PRETRAIN["max_steps"])
    parser.add_argument("--finetune_steps", type=int, default=FINETUNE["max_steps"])
    parser.add_argument("--finetune_lr", type=float, default=FINETUNE["learning_rate"])
    options = parser.parse_args()
    from hf_siglip.data import make_digits_dataset
    from hf_siglip.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES
    from hf_siglip.training.wise_ft import choose

    digits, start = options.out / "digits", options.out / "start"
    if not digits.exists():
        make_digits_dataset(n_captions=3, image_size=32, seed=0).save_to_disk(digits)
    seconds = {}
    if not (start / "eval_results.json").exists():  # pre-trained once: the fixed "released" checkpoint
        seconds["pretrain"] = train({**COMMON, **PRETRAIN, "max_steps": options.pretrain_steps, "output_dir": start})
    pretrained = json.loads((start / "eval_results.json").read_text())["metrics"]
    print(json.dumps({"start_demo_zero_shot_top1": pretrained["eval_zero_shot_top1"], "seconds": seconds}),
          flush=True)
    summary = {"start_demo_zero_shot_top1": pretrained["eval_zero_shot_top1"], "seconds": seconds, "runs": {}}
    for seed in options.seeds:
        tuned = options.out / f"finetuned-{seed}"
        took = train({**COMMON, **FINETUNE, "max_steps": options.finetune_steps,
                      "learning_rate": options.finetune_lr, "model_name_or_path": start, "dataset": digits,
                      "zero_shot_classes": DIGITS_CLASSES, "zero_shot_templates": DIGITS_TEMPLATES, "seed": seed,
                      "output_dir": tuned})
        sweep = json.loads((tuned / "eval_results.json").read_text())["wise_ft"]
        rows = [{k: row[k] for k in ("alpha", "target", "anchor")} for row in sweep["rows"]]
        summary["runs"][seed] = {"alpha": sweep["alpha"], "seconds": took, "rows": rows,
                                 "mean_rule_alpha": rows[choose(rows, "mean", 0.01)]["alpha"]}
        print(json.dumps({seed: summary["runs"][seed]}), flush=True)
    runs = summary["runs"].values()
    print("alpha | target digits zero-shot top-1 (mean ± sd; per seed) | anchor demo zero-shot top-1 (mean ± sd; "
          "per seed)")
    for index, alpha in enumerate(row["alpha"] for row in next(iter(runs))["rows"]):
        cells = []
        for key in ("target", "anchor"):
            values = [run["rows"][index][key] for run in runs]
            cells.append(f"{statistics.mean(values):.3f} ± {spread(values):.3f} "
                         f"({', '.join(f'{value:.3f}' for value in values)})")
        print(f"{alpha:g} | {cells[0]} | {cells[1]}")
    print("chosen (anchor_drop 0.01):", [run["alpha"] for run in runs],
          "| mean rule:", [run["mean_rule_alpha"] for run in runs])
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
