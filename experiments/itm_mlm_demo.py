"""Do ITM and MLM learn on the demo, does ITM re-ranking move recall@1, and does either cost the dual encoder anything?
(docs/EXPERIMENTS.md, issue 24)

For each seed, two `hf-siglip train` runs on the embedded demo with the same model, data and schedule:
`siglip_from_scratch` (sigmoid loss alone) and the same plus `--objectives` itm (1 hard negative per image and per
caption, temperature 0.07, drawn from the global batch) and mlm (15%, 80/10/10), both weight 1, one fusion encoder
(2 layers at the vision tower's width), with `--itm_rerank_k 8`: after training `hf-siglip train` re-ranks each
held-out query's 8 best candidates by cosine with the saved ITM head (`evaluate.itm_rerank_of_checkpoint`, the same
function as `hf-siglip eval --itm_rerank_k`) and writes eval_{i2t,t2i}_itm_recall@k beside the embeddings' recall.

Measured on the run's own held-out split (the demo's `test` rows, rebuilt here as `hf-siglip train` builds them),
loading only what the run saved (`ItmPairScorer` = `load_itm_scorer` + the run's processor; the MLM head from
`fusion_encoder/` with plain transformers' `BlipTextLMHeadModel`):

- ITM accuracy (chance 0.5): every (image, own caption) pair should score > 0.5; for each image one random
  non-matching caption and one hard one (the held-out caption most similar to the image by the run's embeddings
  among the non-matching ones) should score < 0.5. "Non-matching" is by content, not by id: a caption of another
  image that names only attributes this image has ("a red circle" for another red circle) is a true description and
  is never used as a negative.
- MLM accuracy on colour and shape words: in each held-out caption naming a colour (shape), that word's tokens are
  replaced by [MASK] and predicted from the image and the rest of the caption. Two readings: restricted (the word of
  the colour / shape vocabulary whose tokens have the highest summed log-probability at the masked positions; chance
  1/6 for colours, 1/5 for shapes) and plain argmax over the whole vocabulary (every masked token right). A control
  reads the same masked captions with another held-out image of a different colour (shape): it should fall to chance.
- Retrieval recall@1 both ways and zero-shot top-1 (eval_results.json), with and without ITM + MLM: per-seed
  differences, mean ± sd, paired t-test (scipy.stats.ttest_rel), as docs/EXPERIMENTS.md reports elsewhere.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/itm_mlm_demo.py --output-dir outputs/itm_mlm --parallel 6

A run whose folder holds eval_results.json is reused (delete the folder to redo it); measurements are cached in
its itm_mlm_measurements.json.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

OBJECTIVES = {"itm": {"weight": 1.0, "negatives_per_sample": 1, "temperature": 0.5, "negatives_from": "global",
                      "learning_rate": 5e-4},
              "mlm": {"weight": 0.1, "mask_probability": 0.15}}
RERANK_K = 8
DETACHED = {name: {**settings, "train_vision_tower": False} for name, settings in OBJECTIVES.items()}
ARMS = {"sigmoid": [], "sigmoid + itm + mlm": ["--objectives", json.dumps(OBJECTIVES), "--itm_rerank_k", str(RERANK_K)],
        "sigmoid + itm + mlm, vision tower untouched": ["--objectives", json.dumps(DETACHED), "--itm_rerank_k",
                                                        str(RERANK_K)]}
FOLDERS = {"sigmoid": "sigmoid", "sigmoid + itm + mlm": "itm_mlm",
           "sigmoid + itm + mlm, vision tower untouched": "itm_mlm_detached"}
SCALE = "--demo_train_size 4000 --demo_test_size 500 --num_train_epochs 16 --per_device_train_batch_size 64"
METRICS = ("eval_i2t_recall@1", "eval_t2i_recall@1", "eval_zero_shot_top1")
RERANK = ("eval_i2t_itm_recall@1", "eval_t2i_itm_recall@1")


def train(seed: int, folder: str, flags: list[str]) -> None:
    if os.path.exists(os.path.join(folder, "eval_results.json")):
        return
    command = [sys.executable, "-m", "hf_siglip", "train", "--config", "siglip_from_scratch", "--seed", str(seed),
               "--output_dir", folder, "--disable_tqdm", "true", *flags]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.log"), "w") as log:  # a file, not a pipe: a run outlives this script
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: see {folder}/train.log")


def scale_of(flags: list[str]) -> dict:
    """demo sizes the runs used (`hf-siglip train` defaults where the flags do not say)."""
    sizes = {"demo_train_size": 4000, "demo_test_size": 500, "demo_image_size": 32}
    for name in sizes:
        if f"--{name}" in flags:
            sizes[name] = int(flags[flags.index(f"--{name}") + 1])
    return sizes


# --- what a caption says ----------------------------------------------------------------------------------------

def attribute_words():
    from hf_siglip.data.demo import BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SIZES

    return {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
            "position": {phrase.split()[-1]: name for name, phrase in POSITION_PHRASES.items()},
            "background": list(BACKGROUNDS)}


def mentions(caption: str) -> dict[str, set]:
    """The attribute values a demo caption names, by category (a caption names each at most once)."""
    words = set(re.findall(r"[a-z]+", caption))
    found = {}
    for category, values in attribute_words().items():
        names = values if isinstance(values, dict) else {v: v for v in values}
        found[category] = {names[w] for w in words if w in names}
    return found


def describes(caption_mentions: dict[str, set], row: dict) -> bool:
    """True when every attribute the caption names is the image's: a true description of it."""
    return all(values <= {row[category]} for category, values in caption_mentions.items())


# --- measurements ------------------------------------------------------------------------------------------------

def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive's score > a negative's), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    above = (positive[:, None] > negative[None, :]).double().mean()
    return (above + 0.5 * (positive[:, None] == negative[None, :]).double().mean()).item()


@torch.no_grad()
def measure(folder: str, sizes: dict, seed: int) -> dict:
    """ITM pair accuracy and MLM colour / shape accuracy of the run saved in `folder` (see the module docstring)."""
    cache = os.path.join(folder, "itm_mlm_measurements.json")
    if os.path.exists(cache):
        return json.load(open(cache))
    from transformers import AutoModel, BlipTextLMHeadModel

    from hf_siglip.data.demo import COLOURS, SHAPES, make_demo_dataset
    from hf_siglip.data.embedding import embed_images, embed_texts
    from hf_siglip.dual_encoders import as_dual_encoder
    from hf_siglip.itm_scoring import ItmPairScorer

    started = time.time()
    test = make_demo_dataset(n_train=sizes["demo_train_size"], n_test=sizes["demo_test_size"],
                             image_size=sizes["demo_image_size"], seed=0)["test"]  # as hf-siglip train builds it
    rows = [{k: test[k][i] for k in ("colour", "shape", "size", "position", "background")} for i in range(len(test))]
    images = test["image"]
    texts, owner = [], []
    for index, captions in enumerate(test["caption"]):
        texts += captions
        owner += [index] * len(captions)
    owner = torch.tensor(owner)
    said = [mentions(text) for text in texts]
    true_of = torch.tensor([[describes(said[t], rows[i]) for t in range(len(texts))] for i in range(len(rows))])
    assert true_of[owner, torch.arange(len(texts))].all(), "a caption does not describe its own image"

    scorer = ItmPairScorer(folder)
    ids = scorer.input_ids(texts)
    model = as_dual_encoder(AutoModel.from_pretrained(folder)).eval()
    similarity = embed_images(model, scorer.processor, images) @ embed_texts(
        model, scorer.processor, texts, max_length=scorer.max_length).T
    generator = torch.Generator().manual_seed(seed)
    random_negative = torch.stack([torch.multinomial((~row).float(), 1, generator=generator)[0] for row in true_of])
    hard_negative = similarity.masked_fill(true_of, float("-inf")).argmax(dim=1)
    n = len(rows)
    image_index = torch.cat([owner, torch.arange(n), torch.arange(n)])
    text_index = torch.cat([torch.arange(len(texts)), random_negative, hard_negative])
    probability = scorer.score_pairs(images, ids, image_index, text_index)
    positive, random_p, hard_p = probability.split([len(texts), n, n])
    out = {"itm_positive_accuracy": (positive > 0.5).float().mean().item(),
           "itm_random_negative_accuracy": (random_p < 0.5).float().mean().item(),
           "itm_hard_negative_accuracy": (hard_p < 0.5).float().mean().item(),
           # pairs in each image's own order: its first caption above its hard negative
           "itm_first_caption_above_hard": (positive[::len(texts) // n] > hard_p).float().mean().item()
           if len(texts) % n == 0 else float("nan"),
           # threshold-free: the chance that a random positive scores above a random negative (ROC AUC)
           "itm_auc_random_negative": auc(positive, random_p), "itm_auc_hard_negative": auc(positive, hard_p),
           "itm_positive_mean_probability": positive.mean().item(),
           "itm_hard_negative_mean_probability": hard_p.mean().item(),
           "hard_negative_cosine": similarity[torch.arange(n), hard_negative].mean().item(),
           "random_negative_cosine": similarity[torch.arange(n), random_negative].mean().item()}

    # MLM: mask one colour / shape word of each held-out caption, predict it from the image and the rest
    lm = BlipTextLMHeadModel.from_pretrained(os.path.join(folder, "fusion_encoder")).eval()
    config = lm.config
    tokenizer = scorer.processor.tokenizer
    patches = torch.cat([scorer.patch_tokens(images[start:start + 64]) for start in range(0, n, 64)])
    for category, vocabulary in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        cases = []  # (caption index, masked positions, true word)
        for t, text in enumerate(texts):
            word = next(iter(said[t][category]), None)
            if word is None:
                continue
            start = re.search(rf"\b{word}\b", text).start()
            encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=scorer.max_length)
            positions = [p for p, (a, b) in enumerate(encoded["offset_mapping"])
                         if b > a and a < start + len(word) and b > start]
            if positions:
                cases.append((t, positions, word))
        # each candidate word's tokens in the caption's context (its own tokens if the masked span length agrees)
        spans = {}
        for t, positions, word in cases:
            length = len(tokenizer(texts[t], truncation=True, max_length=scorer.max_length)["input_ids"])
            for candidate in vocabulary:
                other = tokenizer(re.sub(rf"\b{word}\b", candidate, texts[t], count=1), truncation=True,
                                  max_length=scorer.max_length)["input_ids"]
                # comparable when swapping the word changes the caption's length by the span's length difference
                span = other[positions[0]:positions[0] + len(other) - length + len(positions)]
                spans[t, candidate] = span if len(span) == len(positions) else None
        # a control image per case: another held-out image whose value of this attribute differs
        other_image = []
        for t, _, word in cases:
            choices = [i for i in range(n) if rows[i][category] != word]
            other_image.append(choices[int(torch.randint(len(choices), (1,), generator=generator))])
        for reading, image_of in (("", [int(owner[t]) for t, _, _ in cases]), ("_other_image", other_image)):
            restricted = plain = 0
            for start in range(0, len(cases), 128):
                chunk = cases[start:start + 128]
                masked = ids[[t for t, _, _ in chunk]].clone()
                for row, (_, positions, _) in enumerate(chunk):
                    masked[row, positions] = config.mlm_mask_token_id
                text_mask = ids[[t for t, _, _ in chunk]] != config.pad_token_id
                first = torch.full((len(chunk), 1), config.itm_cls_token_id)
                hidden = lm.bert(input_ids=torch.cat([first, masked], 1),
                                 attention_mask=torch.cat([torch.ones_like(first), text_mask.long()], 1),
                                 encoder_hidden_states=patches[image_of[start:start + 128]],
                                 is_decoder=False).last_hidden_state[:, 1:]
                log_p = lm.cls(hidden).float().log_softmax(-1)
                for row, (t, positions, word) in enumerate(chunk):
                    truth = ids[t, positions]
                    plain += bool((log_p[row, positions].argmax(-1) == truth).all())
                    scores = {c: log_p[row, positions, spans[t, c]].sum().item()
                              for c in vocabulary if spans[t, c] is not None and len(spans[t, c]) == len(positions)}
                    restricted += max(scores, key=scores.get) == word
            out[f"mlm_{category}_restricted{reading}"] = restricted / len(cases)
            out[f"mlm_{category}_argmax{reading}"] = plain / len(cases)
        out[f"mlm_{category}_cases"] = len(cases)
        out[f"mlm_{category}_single_token"] = all(len(p) == 1 for _, p, _ in cases)
    out["measure_seconds"] = time.time() - started
    json.dump(out, open(cache, "w"), indent=1)
    return out


def mean_sd(values) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def paired(after, before) -> str:
    from scipy.stats import ttest_rel

    differences = [a - b for a, b in zip(after, before)]
    p = ttest_rel(after, before).pvalue if len(after) > 1 else float("nan")
    return (f"{', '.join(f'{d:+.3f}' for d in differences)} | {statistics.mean(differences):+.3f} ± "
            f"{statistics.stdev(differences) if len(differences) > 1 else 0.0:.3f} | {p:.2f}, n = {len(after)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/itm_mlm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--flags", default=SCALE, help="`hf-siglip train` flags for every run (the scale)")
    parser.add_argument("--train-only", action="store_true", help="train, measure nothing")
    args = parser.parse_args()
    flags = args.flags.split()
    jobs = [(arm, seed, os.path.join(args.output_dir, f"{FOLDERS[arm]}_seed{seed}"))
            for arm in reversed(ARMS) for seed in args.seeds]  # the long runs first: the pool ends sooner
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda job: train(job[1], job[2], flags + ARMS[job[0]]), jobs))
    if args.train_only:
        return
    results = {}
    for arm, seed, folder in jobs:
        metrics = json.load(open(os.path.join(folder, "eval_results.json")))["metrics"]
        row = {name: metrics[name] for name in (*METRICS, *RERANK) if name in metrics}
        state = json.load(open(os.path.join(folder, "trainer_state.json")))
        row["seconds"] = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
        row["steps"] = state["global_step"]
        if ARMS[arm]:
            row.update(measure(folder, scale_of(flags), seed))
        results.setdefault(arm, {})[seed] = row
    json.dump(results, open(os.path.join(args.output_dir, "results.json"), "w"), indent=1)
    print(json.dumps(results, indent=1))
    for arm, by_seed in results.items():
        print(f"\n{arm}")
        for name in sorted({name for row in by_seed.values() for name in row}):
            values = [row[name] for row in by_seed.values() if isinstance(row.get(name), (int, float))]
            if values and len(values) == len(by_seed):
                print(f"  {name}: {mean_sd(values)}")
    print("\ncomparison | metric | per-seed difference | mean ± sd | p (paired t, n)")
    for arm in (arm for arm in ARMS if ARMS[arm]):
        seeds = sorted(set(results["sigmoid"]) & set(results[arm]))
        for name in METRICS:
            after = [results[arm][s][name] for s in seeds]
            before = [results["sigmoid"][s][name] for s in seeds]
            print(f"{arm} - sigmoid | {name} | {paired(after, before)}")
        for name in RERANK:
            after = [results[arm][s][name] for s in seeds]
            before = [results[arm][s][name.replace("_itm", "")] for s in seeds]
            print(f"re-ranked - embeddings ({arm}) | {name} | {paired(after, before)}")


if __name__ == "__main__":
    main()
