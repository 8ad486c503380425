"""Reproduce, at small scale and side by side, four claims of the SigLIP / FFF papers.

    python experiments/paper_claims.py [--epochs 12] [--train-size 2000] [--output-dir outputs/experiments]

1. Sigmoid vs softmax loss at a small batch (SigLIP sections 4.1-4.2: sigmoid is better below ~16k).
2. Several positives per image (k captions, plus in-batch mining) vs one caption per image (FFF).
3. Bias initialised at -10 vs 0 (SigLIP section 3.2; ablated in 4.9).
4. Fine-tuning a pretrained tower with vs without weight decay (SigLIP section 4.5): a model pretrained on
   the embedded demo is fine-tuned on scikit-learn's digits; we report digit zero-shot accuracy and how
   much demo zero-shot accuracy the model keeps.
5. FFF's in-batch mining: the FFF recipe (recipes/fff_multi_positive.yaml through `hf-siglip train`, the demo's own
   4 captions instead of a captioner's) with its mining on vs off, over seeds 0, 1, 2; and the mining rules that
   collapse (image-image and text-text at 0.98 from half-way, by the model's and by an EMA teacher's embeddings).

Every run is `hf_siglip.scripts.train.run_train` with the same small model and data; only the named
setting changes. Results go to stdout as one table and to OUTPUT_DIR/results.json. Figures from the last
run are in docs/EXPERIMENTS.md.
"""

import argparse
import json
import math
import os
import time

import yaml

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
    if not os.path.exists(path):
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
    parser.add_argument("--epochs", type=float, default=12, help="epochs at batch 128")
    parser.add_argument("--small-batch-epochs", type=float, default=8, help="epochs at batch 32")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--output-dir", default="outputs/experiments")
    parser.add_argument("--parts", default="12345", help="which claims to run (4 needs 2's checkpoint on disk)")
    args = parser.parse_args()
    demo = dict(demo_train_size=args.train_size, demo_test_size=500, max_length=12)
    small_batch = dict(num_train_epochs=args.small_batch_epochs, per_device_train_batch_size=32)
    results = {}

    results_path = os.path.join(args.output_dir, "results.json")
    if os.path.exists(results_path):  # re-running some parts keeps the others' figures
        with open(results_path) as file:
            results = json.load(file)
    batch = dict(num_train_epochs=args.epochs)

    if "1" in args.parts:
        run_sigmoid_vs_softmax(results, args.output_dir, demo, small_batch)
    if "2" in args.parts:
        run_multi_positive(results, args.output_dir, demo, batch)
    if "3" in args.parts:
        results["bias init -10"] = results["4 captions per image"]  # same run: all captions, default init
        results["bias init 0"] = run("bias_0", args.output_dir, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]},
                                     {"logit_bias_init_value": 0.0}, training=batch)
    if "4" in args.parts:
        run_weight_decay_on_pretrained(results, args.output_dir, demo)
    if "5" in args.parts:  # mining from the middle of the run: 128 images per step
        run_mining_after_warm_up(results, args.output_dir, demo, batch,
                                 start_step=int(args.epochs * math.ceil(args.train_size / 128)) // 2)
        run_fff_recipe_mining(results, args.output_dir, seeds=(0, 1, 2))

    os.makedirs(args.output_dir, exist_ok=True)
    with open(results_path, "w") as file:
        json.dump(results, file, indent=2)
    columns = ("eval_i2t_recall@1", "eval_t2i_recall@1", "eval_zero_shot_top1", "demo_zero_shot_top1_after", "seconds")
    print("\n| setting | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def run_sigmoid_vs_softmax(results, output_dir, demo, small_batch):
    results["sigmoid, batch 32"] = run("sigmoid_b32", output_dir, demo, training=small_batch)
    results["softmax, batch 32"] = run("softmax_b32", output_dir, demo,
                                       training={**small_batch, "loss_config": {"loss_type": "softmax"}})


def run_multi_positive(results, output_dir, demo, batch):
    results["1 caption per image"] = run("one_positive", output_dir, {**demo, "data_steps": [{"caption_sampling": {"k": 1}}]},
                                         training=batch)
    results["4 captions per image"] = run("k4_positives", output_dir, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]},
                                          training=batch)
    results["4 captions + mining"] = run(
        "k4_mining", output_dir, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]},
        training={**batch, "loss_config": {"mine_image_image": 0.98, "mine_text_text": 0.98}})


def run_mining_after_warm_up(results, output_dir, demo, batch, start_step):
    k4 = {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]}
    if "4 captions per image" not in results:
        results["4 captions per image"] = run("k4_positives", output_dir, k4, training=batch)
    mining = {"mine_image_image": 0.98, "mine_text_text": 0.98, "mining_start_step": start_step}
    results[f"4 captions + mining from step {start_step}"] = run("k4_mining_after_warm_up", output_dir, k4,
                                                                 training={**batch, "loss_config": mining})
    results[f"4 captions + mining from step {start_step} by an EMA teacher (0.99)"] = run(
        "k4_teacher_mining_after_warm_up", output_dir, k4,
        training={**batch, "teacher_momentum": 0.99,
                  "loss_config": {**mining, "mine_with": "teacher", "teacher_weight": 0.0}})


def run_fff_recipe_mining(results, output_dir, seeds):
    """The FFF recipe through `hf-siglip train`, its data steps replaced by the demo's own 4 captions (no captioner is
    downloaded here; no augmentation), on 2,000 images for 16 epochs (the recipe's ~250 steps); 'mining off' keeps
    everything but the mining settings."""
    from hf_siglip.cli import main as cli_main

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "fff_multi_positive.yaml")
    steps = json.dumps([{"caption_sampling": {"k": 4}}])
    for seed in seeds:
        for mining in ("off", "on", "on, by an EMA teacher"):
            name = f"fff_recipe_mining_{mining.replace(', by an EMA teacher', '_teacher')}_seed{seed}"
            flags = ["train", "--config", recipe, "--data_steps", steps, "--demo_train_size", "2000",
                     "--num_train_epochs", "16", "--seed", str(seed), "--disable_tqdm", "true",
                     "--output_dir", os.path.join(output_dir, name)]
            if mining == "off":
                flags += ["--loss_config", json.dumps({"normalize": "row"})]
            elif mining != "on":  # the recipe's rules on the teacher's embeddings, without its soft targets
                with open(recipe) as file:
                    loss_config = yaml.safe_load(file)["loss_config"]
                flags += ["--teacher_momentum", "0.99", "--loss_config",
                          json.dumps({**loss_config, "mine_with": "teacher", "teacher_weight": 0.0})]
            started = time.perf_counter()
            assert cli_main(flags) == 0, name
            with open(os.path.join(output_dir, name, "eval_results.json")) as file:
                metrics = json.load(file)["metrics"]
            metrics["seconds"] = time.perf_counter() - started
            results[f"FFF recipe, mining {mining}, seed {seed}"] = metrics


def run_weight_decay_on_pretrained(results, output_dir, demo):
    """Pretrain = the k=4 demo run; fine-tune on digits at the full learning rate (multiplier 1) so that the
    decay, `lr * wd` per step in AdamW, has room to act within a short run."""
    from hf_siglip.scripts.evaluate import SiglipEvalArguments, run_eval

    pretrained = os.path.join(output_dir, "k4_positives")
    digits = save_digits_dataset(os.path.join(output_dir, "digits"))
    digits_args = dict(dataset=digits, eval_split="test", zero_shot_classes=DIGITS_CLASSES,
                       zero_shot_templates=DIGITS_TEMPLATES, max_length=12)
    finetune = dict(num_train_epochs=6, learning_rate=2e-3, per_device_train_batch_size=64,
                    pretrained_learning_rate_multiplier=1.0)
    for label in [label for label in results if label.startswith("pretrained towers:")]:
        del results[label]
    for decay in (0.0, 1.0):
        label, name = f"pretrained towers: weight decay {decay:g}", f"finetune_wd{decay:g}"
        results[label] = run(name, output_dir, digits_args, {"model_name_or_path": pretrained},
                             {**finetune, "pretrained_weight_decay": decay})
        kept = run_eval(SiglipEvalArguments(checkpoint=os.path.join(output_dir, name), dataset="demo", **demo))
        results[label]["demo_zero_shot_top1_after"] = kept["zero_shot_top1"]


if __name__ == "__main__":
    main()
