"""Reproduce, at small scale and side by side, four claims of the SigLIP / FFF papers.

    python experiments/paper_claims.py [--epochs 4] [--train-size 2000] [--output-dir outputs/experiments]

1. Sigmoid vs softmax loss at a small batch (SigLIP section 4.1: sigmoid is better below ~16k).
2. Several positives per image (k captions, plus in-batch mining) vs one caption per image (FFF).
3. Bias initialised at -10 vs 0 (SigLIP section 3.3 / 4.3).
4. Fine-tuning a pretrained tower with vs without weight decay (SigLIP section 4.5): a model pretrained on
   the embedded demo is fine-tuned on scikit-learn's digits; we report digit zero-shot accuracy and how
   much demo zero-shot accuracy the model keeps.

Every run is `hf_siglip.scripts.train.run_train` with the same small model and data; only the named
setting changes. Results go to stdout as one table and to OUTPUT_DIR/results.json. Figures from the last
run are in docs/EXPERIMENTS.md.
"""

import argparse
import json
import os
import time

from hf_siglip.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES, make_digits_dataset
from hf_siglip.scripts.train import (
    DEMO_TRAINING_DEFAULTS,
    SiglipModelArguments,
    SiglipScriptArguments,
    run_train,
)
from hf_siglip.training_args import SiglipTrainingArguments

def save_digits_dataset(path: str) -> str:
    """scikit-learn's digits as an image-caption dataset on disk (what `hf-siglip train --dataset` reads)."""
    make_digits_dataset().save_to_disk(path)
    return path


def run(name, output_dir, script=None, model=None, training=None) -> dict:
    script_args = SiglipScriptArguments(**(script or {}))
    model_args = SiglipModelArguments(**(model or {}))
    values = {**DEMO_TRAINING_DEFAULTS, "output_dir": os.path.join(output_dir, name), "disable_tqdm": True,
              "logging_steps": 50, **(training or {})}
    started = time.perf_counter()
    metrics = run_train(script_args, model_args, SiglipTrainingArguments(**values))
    metrics["seconds"] = time.perf_counter() - started
    print(f"[{name}] " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())
                                   if k.endswith(("recall@1", "recall@5", "top1", "seconds"))), flush=True)
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--output-dir", default="outputs/experiments")
    args = parser.parse_args()
    demo = dict(demo_train_size=args.train_size, demo_test_size=500, max_length=12)
    small_batch = dict(num_train_epochs=args.epochs, per_device_train_batch_size=32)
    results = {}

    # 1. sigmoid vs softmax at a small batch
    results["sigmoid, batch 32"] = run("sigmoid_b32", args.output_dir, demo, training=small_batch)
    results["softmax, batch 32"] = run("softmax_b32", args.output_dir, demo,
                                       training={**small_batch, "loss_options": {"loss_type": "softmax"}})
    # 2. several positives per image vs one
    batch = dict(num_train_epochs=args.epochs)
    results["1 caption per image"] = run("one_positive", args.output_dir, {**demo, "captions_per_image": 1},
                                         training=batch)
    results["4 captions per image"] = run("k4_positives", args.output_dir, {**demo, "captions_per_image": 4},
                                          training=batch)
    results["4 captions + mining"] = run(
        "k4_mining", args.output_dir, {**demo, "captions_per_image": 4},
        training={**batch, "loss_options": {"mine_image_image": 0.98, "mine_text_text": 0.98}})
    # 3. bias init
    results["bias init -10"] = run("bias_-10", args.output_dir, demo, training=batch)
    results["bias init 0"] = run("bias_0", args.output_dir, demo, {"logit_bias_init_value": 0.0}, training=batch)

    # 4. pretrained tower with vs without weight decay: pretrain on the demo, fine-tune on digits
    pretrained = os.path.join(args.output_dir, "bias_-10")
    digits = save_digits_dataset(os.path.join(args.output_dir, "digits"))
    digits_args = dict(dataset=digits, eval_split="test", zero_shot_classes=DIGITS_CLASSES,
                       zero_shot_templates=DIGITS_TEMPLATES, max_length=12)
    finetune = dict(num_train_epochs=2, learning_rate=1e-3, weight_decay=0.1, per_device_train_batch_size=64)
    for label, decay in (("pretrained towers: no weight decay", 0.0), ("pretrained towers: weight decay 0.1", 0.1)):
        name = "finetune_wd0" if decay == 0.0 else "finetune_wd0.1"
        results[label] = run(name, args.output_dir, digits_args, {"model_name_or_path": pretrained},
                             {**finetune, "pretrained_weight_decay": decay})
        from hf_siglip.scripts.evaluate import SiglipEvalArguments, run_eval

        kept = run_eval(SiglipEvalArguments(checkpoint=os.path.join(args.output_dir, name), **demo))
        results[label]["demo_zero_shot_top1_after"] = kept["zero_shot_top1"]

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    columns = ("eval_i2t_recall@1", "eval_t2i_recall@1", "eval_zero_shot_top1", "demo_zero_shot_top1_after", "seconds")
    print("\n| setting | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
