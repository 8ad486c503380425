"""Reproduce, at small scale and side by side, four claims of the SigLIP / FFF papers.

    python experiments/paper_claims.py [--epochs 12] [--train-size 2000] [--seeds 0 1 2] [--output-dir
    outputs/experiments]

1. Sigmoid vs softmax loss at a small batch (SigLIP sections 4.1-4.2: sigmoid is better below ~16k).
2. Several positives per image (k captions, plus in-batch mining) vs one caption per image (FFF).
3. Bias initialised at -10 vs 0 (SigLIP section 3.2; ablated in 4.9).
4. Fine-tuning a pretrained tower with vs without weight decay (SigLIP section 4.5): a model pretrained on
   the embedded demo is fine-tuned on scikit-learn's digits; we report digit zero-shot accuracy and how
   much demo zero-shot accuracy the model keeps.
5. FFF's in-batch mining from half-way: image-image and text-text at 0.98 from the middle of the run, by the model's
   and by an EMA teacher's embeddings, against the 4-caption run of part 2.
6. The FFF recipes through `hf-siglip train` (the demo's own 4 captions instead of a captioner's): mining off vs
   FFF as published (recipes/fff_multi_positive.yaml) vs the project's safe variant (fff_multi_positive_safe.yaml).

Every run is `hf_siglip.cli.train.run_train` with the same small model and data; only the named
setting changes. Every run is repeated for each of --seeds (the seed sets the initialisation and the data order;
folder names end in _seedS). Results go to OUTPUT_DIR/results.json (per setting, each seed's metrics) and to stdout:
per setting the mean +- sample standard deviation over seeds and the per-seed values; per compared pair of settings
the per-seed differences, their mean and standard deviation, and a paired t-test across seeds (scipy.stats.ttest_rel;
pairs are matched by seed, so the two runs of a pair share initialisation and data order). With 3 seeds the test has
2 degrees of freedom and little power: a large p says little, and only large, consistent differences reach p < 0.05.
Figures from the last run are in docs/EXPERIMENTS.md.
"""

import argparse
import json
import math
import os
import statistics
import time

from hf_siglip.cli.train import (
    DEMO_TRAINING_DEFAULTS,
    SiglipModelArguments,
    SiglipScriptArguments,
    run_train,
)
from hf_siglip.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES, make_digits_dataset
from hf_siglip.training.training_args import SiglipTrainingArguments


def save_digits_dataset(path: str) -> str:
    """scikit-learn's digits as an image-caption dataset on disk (what `hf-siglip train --dataset` reads)."""
    if not os.path.exists(path):
        make_digits_dataset().save_to_disk(path)
    return path


COLUMNS = ("eval_i2t_recall@1", "eval_t2i_recall@1", "eval_zero_shot_top1", "demo_zero_shot_top1_after", "seconds")
# (baseline, changed): the settings each claim compares; printed with a paired test when both have runs
COMPARISONS = [
    ("sigmoid, batch 32", "softmax, batch 32"),
    ("1 caption per image", "4 captions per image"),
    ("4 captions per image", "4 captions + mining"),
    ("bias init -10", "bias init 0"),
    ("pretrained towers: weight decay 0", "pretrained towers: weight decay 1"),
]


FINISHED = "paper_claims_run.json"  # in a run's folder: its metrics and seconds; a re-run of the script reuses them


def finished(folder) -> dict | None:
    path = os.path.join(folder, FINISHED)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def remember(folder, name, metrics) -> dict:
    with open(os.path.join(folder, FINISHED), "w") as file:
        json.dump(metrics, file, indent=2)
    print(f"[{name}] " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())
                                   if k.endswith(("recall@1", "recall@5", "top1", "seconds"))), flush=True)
    return metrics


def run(name, output_dir, seed, script=None, model=None, training=None) -> dict:
    """One `run_train` with `seed`, in OUTPUT_DIR/NAME_seedSEED (reused when that folder holds a finished run)."""
    script_args = SiglipScriptArguments(**(script or {}))
    model_args = SiglipModelArguments(**(model or {}))
    name = f"{name}_seed{seed}"
    folder = os.path.join(output_dir, name)
    if (metrics := finished(folder)) is not None:
        return metrics
    values = {**DEMO_TRAINING_DEFAULTS, "output_dir": folder, "disable_tqdm": True,
              "logging_steps": 50, **(training or {}), "seed": seed}
    started = time.perf_counter()
    metrics = run_train(script_args, model_args, SiglipTrainingArguments(**values))
    metrics["seconds"] = time.perf_counter() - started
    return remember(folder, name, metrics)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=12, help="epochs at batch 128")
    parser.add_argument("--small-batch-epochs", type=float, default=8, help="epochs at batch 32")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--output-dir", default="outputs/experiments")
    parser.add_argument("--parts", default="123456", help="which claims to run (4 needs 2's checkpoints on disk)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="every run is repeated per seed")
    args = parser.parse_args()
    demo = dict(demo_train_size=args.train_size, demo_test_size=500, max_length=12)
    small_batch = dict(num_train_epochs=args.small_batch_epochs, per_device_train_batch_size=32)
    results = {}

    results_path = os.path.join(args.output_dir, "results.json")
    if os.path.exists(results_path):  # re-running some parts keeps the others' figures
        with open(results_path) as file:  # {setting: {seed: metrics}}; an older one-seed file is not reused
            results = {name: runs for name, runs in json.load(file).items()
                       if all(seed.isdigit() and isinstance(m, dict) for seed, m in runs.items())}
    batch = dict(num_train_epochs=args.epochs)
    comparisons = list(COMPARISONS)

    def save():  # after every run's claim; merged into the file, so that two processes running other parts can share it
        os.makedirs(args.output_dir, exist_ok=True)
        on_disk = {}
        if os.path.exists(results_path):
            with open(results_path) as file:
                on_disk = json.load(file)
        for setting, runs in results.items():
            on_disk[setting] = {**on_disk.get(setting, {}), **runs}
        with open(results_path + ".tmp", "w") as file:
            json.dump(on_disk, file, indent=2)
        os.replace(results_path + ".tmp", results_path)

    # claim by claim, each over all seeds: an interrupted run leaves whole claims
    if "1" in args.parts:
        for seed in args.seeds:
            run_sigmoid_vs_softmax(results, args.output_dir, seed, demo, small_batch)
            save()
    if "2" in args.parts:
        for seed in args.seeds:
            run_multi_positive(results, args.output_dir, seed, demo, batch)
            save()
    if "3" in args.parts:
        for seed in args.seeds:  # "bias init -10" is the "4 captions per image" run: all captions, default init
            record(results, "bias init -10", seed, results["4 captions per image"][str(seed)])
            record(results, "bias init 0", seed, run(
                "bias_0", args.output_dir, seed, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]},
                {"logit_bias_init_value": 0.0}, training=batch))
            save()
    if "4" in args.parts:
        for seed in args.seeds:
            run_weight_decay_on_pretrained(results, args.output_dir, seed, demo)
            save()
    if "2" in args.parts:  # part 2's slowest runs (mining every pair of the batch) last
        for seed in args.seeds:
            run_mining_from_the_start(results, args.output_dir, seed, demo, batch)
            save()
    if "5" in args.parts:  # mining from the middle of the run: 128 images per step
        start_step = int(args.epochs * math.ceil(args.train_size / 128)) // 2
        for seed in args.seeds:
            comparisons += run_mining_after_warm_up(results, args.output_dir, seed, demo, batch, start_step)
            save()
    if "6" in args.parts:
        for seed in args.seeds:
            comparisons += run_fff_recipe_mining(results, args.output_dir, seed)
            save()
    save()
    print_tables(results, list(dict.fromkeys(comparisons)))


def mean_sd(values):
    """'mean +- sample sd (v1, v2, ...)'."""
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {spread:.3f} (" + ", ".join(f"{v:.3f}" for v in values) + ")"


def print_tables(results, comparisons):
    """Per setting: mean +- sd over seeds and the per-seed values. Per compared pair: per-seed differences
    (changed - baseline), their mean +- sd, and the p-value of a paired t-test (scipy.stats.ttest_rel)."""
    from scipy.stats import ttest_rel

    print("\n| setting | seeds | " + " | ".join(COLUMNS) + " |\n|---|---|" + "---|" * len(COLUMNS))
    for name, runs in results.items():
        seeds = sorted(runs, key=int)
        cells = [mean_sd([runs[s][c] for s in seeds]) if all(c in runs[s] for s in seeds) else "" for c in COLUMNS]
        print(f"| {name} | {' '.join(seeds)} | " + " | ".join(cells) + " |")
    print("\nPaired across seeds (same seed: same initialisation and data order), changed - baseline; "
          "p: two-sided paired t-test, scipy.stats.ttest_rel, n = number of seeds (n = 3: 2 degrees of freedom, "
          "low power)")
    print("| baseline | changed | metric | n | per-seed difference | mean ± sd | p |\n|---|---|---|---|---|---|---|")
    for baseline, changed in comparisons:
        if baseline not in results or changed not in results:
            continue
        seeds = sorted(set(results[baseline]) & set(results[changed]), key=int)
        for column in COLUMNS[:-1]:
            if not seeds or not all(column in results[name][s] for name in (baseline, changed) for s in seeds):
                continue
            before = [results[baseline][s][column] for s in seeds]
            after = [results[changed][s][column] for s in seeds]
            differences = [a - b for a, b in zip(after, before)]
            p = ttest_rel(after, before).pvalue if len(seeds) > 1 else float("nan")
            spread = statistics.stdev(differences) if len(seeds) > 1 else float("nan")
            print(f"| {baseline} | {changed} | {column} | {len(seeds)} | "
                  + ", ".join(f"{d:+.3f}" for d in differences)
                  + f" | {statistics.mean(differences):+.3f} ± {spread:.3f} | {p:.3f} |")


def record(results, setting, seed, metrics):
    results.setdefault(setting, {})[str(seed)] = metrics


def run_sigmoid_vs_softmax(results, output_dir, seed, demo, small_batch):
    record(results, "sigmoid, batch 32", seed, run("sigmoid_b32", output_dir, seed, demo, training=small_batch))
    record(results, "softmax, batch 32", seed, run("softmax_b32", output_dir, seed, demo,
                                                   training={**small_batch, "loss_config": {"loss_type": "softmax"}}))


def run_multi_positive(results, output_dir, seed, demo, batch):
    record(results, "1 caption per image", seed, run(
        "one_positive", output_dir, seed, {**demo, "data_steps": [{"caption_sampling": {"k": 1}}]}, training=batch))
    record(results, "4 captions per image", seed, run(
        "k4_positives", output_dir, seed, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]}, training=batch))


def run_mining_from_the_start(results, output_dir, seed, demo, batch):
    record(results, "4 captions + mining", seed, run(
        "k4_mining", output_dir, seed, {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]},
        training={**batch, "loss_config": {"mine_image_image": 0.98, "mine_text_text": 0.98}}))


def run_mining_after_warm_up(results, output_dir, seed, demo, batch, start_step) -> list:
    """Returns the pairs it compares."""
    k4 = {**demo, "data_steps": [{"caption_sampling": {"k": 4}}]}
    if str(seed) not in results.get("4 captions per image", {}):
        record(results, "4 captions per image", seed, run("k4_positives", output_dir, seed, k4, training=batch))
    mining = {"mine_image_image": 0.98, "mine_text_text": 0.98, "mining_start_step": start_step}
    own, teacher = (f"4 captions + mining from step {start_step}",
                    f"4 captions + mining from step {start_step} by an EMA teacher (0.99)")
    record(results, own, seed, run("k4_mining_after_warm_up", output_dir, seed, k4,
                                   training={**batch, "loss_config": mining}))
    record(results, teacher, seed, run(
        "k4_teacher_mining_after_warm_up", output_dir, seed, k4,
        training={**batch, "teacher_momentum": 0.99,
                  "loss_config": {**mining, "mine_with": "teacher", "teacher_weight": 0.0}}))
    return [("4 captions per image", own), ("4 captions per image", teacher)]


def run_fff_recipe_mining(results, output_dir, seed) -> list:
    """The FFF recipes through `hf-siglip train`, their data steps replaced by the demo's own 4 captions (no captioner
    is downloaded here; no augmentation), on 2,000 images for 16 epochs (~250 steps): mining off (the published
    recipe with only `normalize: row` left in its loss_config), the published recipe (fff_multi_positive.yaml) and,
    when it exists, the safe variant (fff_multi_positive_safe.yaml). Returns the pairs it compares."""
    from hf_siglip.cli.main import main as cli_main

    recipes = os.path.join(os.path.dirname(__file__), "..", "recipes")
    published = os.path.join(recipes, "fff_multi_positive.yaml")
    variants = {"FFF recipe, mining off": (published, json.dumps({"normalize": "row"})),
                "FFF recipe (fff_multi_positive.yaml)": (published, None)}
    if os.path.exists(os.path.join(recipes, "fff_multi_positive_safe.yaml")):
        variants["FFF safe recipe (fff_multi_positive_safe.yaml)"] = (
            os.path.join(recipes, "fff_multi_positive_safe.yaml"), None)
    steps = json.dumps([{"caption_sampling": {"k": 4}}])
    for setting, (recipe, loss_config) in variants.items():
        name = f"fff_{os.path.basename(recipe)[:-5]}{'_mining_off' if loss_config else ''}_seed{seed}"
        folder = os.path.join(output_dir, name)
        flags = ["train", "--config", recipe, "--data_steps", steps, "--demo_train_size", "2000",
                 "--num_train_epochs", "16", "--seed", str(seed), "--disable_tqdm", "true", "--output_dir", folder]
        if loss_config:
            flags += ["--loss_config", loss_config]
        if (metrics := finished(folder)) is None:
            started = time.perf_counter()
            assert cli_main(flags) == 0, name
            with open(os.path.join(folder, "eval_results.json")) as file:
                metrics = json.load(file)["metrics"]
            metrics["seconds"] = time.perf_counter() - started
            remember(folder, name, metrics)
        record(results, setting, seed, metrics)
    off, *mining = variants
    return [(off, setting) for setting in mining] + [tuple(mining)] * (len(mining) == 2)


def run_weight_decay_on_pretrained(results, output_dir, seed, demo):
    """Pretrain = the k=4 demo run of the same seed; fine-tune on digits at the full learning rate (multiplier 1)
    so that the decay, `lr * wd` per step in AdamW, has room to act within a short run."""
    from hf_siglip.cli.evaluate import SiglipEvalArguments, run_eval

    pretrained = os.path.join(output_dir, f"k4_positives_seed{seed}")
    digits = save_digits_dataset(os.path.join(output_dir, "digits"))
    digits_args = dict(dataset=digits, eval_split="test", zero_shot_classes=DIGITS_CLASSES,
                       zero_shot_templates=DIGITS_TEMPLATES, max_length=12)
    finetune = dict(num_train_epochs=6, learning_rate=2e-3, per_device_train_batch_size=64,
                    pretrained_learning_rate_multiplier=1.0)
    for decay in (0.0, 1.0):
        label, name = f"pretrained towers: weight decay {decay:g}", f"finetune_wd{decay:g}"
        metrics = run(name, output_dir, seed, digits_args, {"model_name_or_path": pretrained},
                      {**finetune, "pretrained_weight_decay": decay})
        kept = run_eval(SiglipEvalArguments(checkpoint=os.path.join(output_dir, f"{name}_seed{seed}"), dataset="demo",
                                            **demo))
        metrics["demo_zero_shot_top1_after"] = kept["zero_shot_top1"]
        record(results, label, seed, metrics)


if __name__ == "__main__":
    main()
