"""Run data steps on each process as `hf-siglip train` does, and write what each process saw:
`torchrun --nproc_per_node 2 data_steps_ranks.py FOLDER MODEL_DIR STEPS_JSON OUT_DIR` (or plain `python` for one
process). The process group and `main_process_first` are `SiglipTrainingArguments`' (gloo on CPU); the model being
trained (`model: null`) is the SigLIP at MODEL_DIR, built on first use. Each process writes OUT_DIR/rank<N>.json:
per step, the rows as they are after it (images as digests) and how often each model ran in this process during it;
the data report; the captions the model being trained was built from; a digest of the torch random state."""

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import datasets
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, SiglipModel, ViTForImageClassification, set_seed

import hf_siglip.data.filters as filters
from hf_siglip import SiglipTrainingArguments
from hf_siglip.data import add_image_ids, load_image_text_dataset
from hf_siglip.data.steps import DataContext, parse_data_steps, run_data_steps

folder, model_dir, steps_json, out_dir = sys.argv[1:5]
args = SiglipTrainingArguments(output_dir=str(Path(out_dir) / "unused"), use_cpu=True, report_to=[])
rank = args.process_index  # joins the process group, as the trainer's arguments do in `hf-siglip train`
set_seed(3)  # as `run_train` seeds before the data steps
calls = Counter()


def counted(owner, name, key):
    original = getattr(owner, name)

    def wrapper(*arguments, **keywords):
        calls[key] += 1
        return original(*arguments, **keywords)

    setattr(owner, name, wrapper)


counted(BlipForConditionalGeneration, "generate", "captioner")
counted(SiglipModel, "get_image_features", "siglip_images")
counted(SiglipModel, "get_text_features", "siglip_texts")
counted(ViTForImageClassification, "forward", "teacher")
counted(filters, "caption_complexity_and_action", "spacy")
built_from = []


def training_model(data, models={}):
    """Built once, from the data as it is then (as `run_train`'s, whose new tokenizer learns its captions)."""
    if not models:
        built_from.append(sorted(json.dumps(cell) for cell in data["caption"]))
        models["pair"] = SiglipModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    return models["pair"]


def snapshot(dataset) -> list[dict]:
    if "image" in dataset.column_names:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    rows = []
    for row in dataset:
        if "image" in row:
            image = row["image"]
            row["image"] = hashlib.sha1(image["bytes"] or Path(image["path"]).read_bytes()).hexdigest()
        rows.append(row)
    return rows


def random_state() -> str:
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()


dataset = add_image_ids(load_image_text_dataset(folder, split="train"))
context = DataContext(seed=3, max_length=12, training_model=training_model,
                      main_process_first=args.main_process_first)
steps = [{"step": "start", "calls": {}, "columns": dataset.column_names, "rows": snapshot(dataset),
          "random_state": random_state()}]
for name, config in parse_data_steps(steps_json):
    before = Counter(calls)
    dataset = run_data_steps(dataset, [(name, config)], context)
    steps.append({"step": name, "calls": dict(calls - before), "columns": dataset.column_names,
                  "rows": snapshot(dataset), "random_state": random_state()})
result = {"rank": rank, "processes": args.world_size, "steps": steps, "built_from": built_from,
          "report": {name: dict(counts) for name, counts in context.report.items()},
          "sampler_k": context.collator_options["caption_sampler"].k if "caption_sampler" in context.collator_options
          else None}
Path(out_dir).mkdir(parents=True, exist_ok=True)
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
