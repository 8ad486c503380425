"""What `hf-siglip train` is about to do, said before the first step (process 0 only).

A compact summary: the dataset and its split sizes (rows; a stream's are unknown), the image size and where it came
from, the text length and the share of captions it cuts, the global batch, steps and epochs, trainable and frozen
parameters, processes and device, and the data steps with their settings. Two warnings:

* more than `TRUNCATION_WARNING_SHARE` of a sample of up to `CAPTION_SAMPLE` captions are longer than `max_length`
  tokens, end token included (the collator cuts them), with the length that would fit 95% of them;
* a new vision tower takes images more than `IMAGE_SIZE_WARNING_RATIO` times the side of the data's own (a few
  images' headers are read): every step then pays for pixels that hold no detail (224 px on 32 px images: ~50x the
  patches). A pretrained tower's size is its own and is not warned about.
"""

import contextlib
import dataclasses
import io
import json
import logging
import math
import os

import datasets
from transformers import TrainerCallback

from ..data.text import normalize_captions

logger = logging.getLogger(__name__)

CAPTION_SAMPLE = 1000  # captions tokenized to measure the share max_length cuts
STREAM_ROWS_SAMPLED = 256  # rows of a stream read for that sample (the first ones)
IMAGES_SAMPLED = 8  # images whose size is read (headers only)
TRUNCATION_WARNING_SHARE = 0.05
IMAGE_SIZE_WARNING_RATIO = 2.0


def _rows(dataset, column: str, limit: int) -> list:
    """Up to `limit` values of `column`: rows spread evenly over a Dataset, the first rows of a stream."""
    if dataset is None or column not in (dataset.column_names or [column]):
        return []
    if isinstance(dataset, datasets.Dataset):
        if not len(dataset):
            return []
        step = max(1, len(dataset) // limit)
        return dataset.select_columns([column]).select(range(0, len(dataset), step)[:limit])[column]
    values = []
    for row in dataset.select_columns([column]):
        values.append(row[column])
        if len(values) >= limit:
            break
    return values


def sample_captions(dataset, limit: int = CAPTION_SAMPLE) -> list[str]:
    """Up to `limit` usable captions of the `caption` column (every caption of each sampled row)."""
    rows = STREAM_ROWS_SAMPLED if not isinstance(dataset, datasets.Dataset) else limit
    captions = []
    for cell in _rows(dataset, "caption", rows):
        try:
            captions += normalize_captions(cell)[0]
        except TypeError:
            continue
        if len(captions) >= limit:
            break
    return captions[:limit]


def caption_lengths(tokenizer, captions: list[str]) -> list[int]:
    """Token counts as the collator's tokenizer call sees them (special tokens, the end token, included)."""
    if not captions:
        return []
    encoded = tokenizer(captions, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(ids) for ids in encoded]


def truncation(tokenizer, captions: list[str], max_length: int) -> dict:
    """{'sampled', 'cut', 'share', 'fits_95'}: how many of `captions` are longer than `max_length` tokens, and the
    length that holds 95% of them whole."""
    lengths = sorted(caption_lengths(tokenizer, captions))
    cut = sum(length > max_length for length in lengths)
    fits_95 = lengths[max(0, math.ceil(0.95 * len(lengths)) - 1)] if lengths else None
    return {"sampled": len(lengths), "cut": cut, "share": cut / len(lengths) if lengths else 0.0, "fits_95": fits_95}


def sample_image_sizes(dataset, limit: int = IMAGES_SAMPLED) -> list[tuple[int, int]]:
    """(width, height) of up to `limit` images of the `image` column, read from their headers; undecodable ones
    are left out."""
    from PIL import Image

    sizes = []
    for cell in _rows(dataset, "image", limit):
        try:
            if isinstance(cell, Image.Image):
                sizes.append(cell.size)
                continue
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
            with Image.open(source) as image:
                sizes.append(image.size)
        except Exception:  # noqa: BLE001 - an undecodable image is the collator's to count
            continue
    return sizes


def image_size_source(model_args) -> str:
    """Where the model's input size came from."""
    if model_args.model_name_or_path:  # a resampled checkpoint says so (hf_siglip.resolution)
        return getattr(model_args, "image_size_source", "the checkpoint's config")
    if model_args.vision_model_name_or_path:
        return "the vision tower's config"
    return getattr(model_args, "image_size_source", "set by --image_size")


def _processor_size(processor) -> tuple[int, int] | None:
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


@contextlib.contextmanager
def quiet_local_loading(dataset):
    """No `datasets` progress bars ("Downloading data", "Generating train split") while a local folder or file is
    opened: nothing is downloaded, and the summary gives the row counts. Other sources keep them."""
    from ..paths import looks_local

    local = dataset is not None and looks_local(str(dataset)) and os.path.exists(os.path.expanduser(str(dataset)))
    if not local or datasets.is_progress_bar_enabled() is False:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def data_step_settings(script_args) -> list[dict]:
    """Every data step with all its settings (defaults included), in order: `[{name: settings}]`."""
    return [{name: dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config}
            for name, config in script_args.steps()]


def step_rows(script_args, report: dict | None) -> list[tuple[int, int] | None]:
    """(rows in, rows out) of each data step that changed the rows of a Dataset (its counts in `report`, under the
    step's name, or `name_N` for its N-th use), else None."""
    seen, rows = {}, []
    for name, _ in script_args.steps():
        seen[name] = seen.get(name, 0) + 1
        counts = (report or {}).get(name if seen[name] == 1 else f"{name}_{seen[name]}") or {}
        rows.append((counts["rows_in"], counts["rows_out"]) if "rows_in" in counts and "rows_out" in counts else None)
    return rows


def describe_run(script_args, model_args, train, evaluation, eval_split, model, processor,
                 report: dict | None = None) -> dict:
    """What the summary says about the data and model (process 0 computes it: it reads a sample of the data).
    `report`: the data steps' counts (`DataContext.report`)."""
    vision_config = getattr(model.config, "vision_config", None)
    image_size = getattr(vision_config, "image_size", None)
    sizes = sample_image_sizes(train)
    facts = {
        "dataset": "the embedded demo" if script_args.dataset == "demo" else str(script_args.dataset),
        "train_split": script_args.train_split,
        "train_rows": len(train) if isinstance(train, datasets.Dataset) else None,
        "eval_split": eval_split if evaluation is not None else None,
        "eval_rows": len(evaluation) if evaluation is not None else None,
        "image_size": image_size,
        "image_size_source": image_size_source(model_args),
        "processor_size": _processor_size(processor),
        "data_image_sizes": sizes,
        "new_vision_tower": not (model_args.model_name_or_path or model_args.vision_model_name_or_path),
        "max_length": script_args.max_length,
        "truncation": truncation(processor.tokenizer, sample_captions(train), script_args.max_length),
        "data_steps": data_step_settings(script_args),
        "data_step_rows": step_rows(script_args, report),
    }
    return facts


def _count(value) -> str:
    return f"{value:,}" if value is not None else "unknown (a stream)"


def summary_lines(facts: dict, args, state, model) -> list[str]:
    """The summary, one aspect a line."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)  # peft's (--use_peft)
    rows = f"{facts['dataset']}: {_count(facts['train_rows'])} training rows (split '{facts['train_split']}')"
    if facts["eval_split"] is not None:
        rows += f", {_count(facts['eval_rows'])} evaluation rows (split '{facts['eval_split']}')"
    else:
        rows += ", no evaluation split"
    size = facts["image_size"]
    image = (f"images: {size} x {size} ({facts['image_size_source']})" if size else
             "images: the processor's size")
    if facts["processor_size"] and size and facts["processor_size"] != (size, size):
        image += f", the processor makes {facts['processor_size'][0]} x {facts['processor_size'][1]}"
    if facts["data_image_sizes"]:
        widths, heights = zip(*facts["data_image_sizes"])
        image += f"; the data's: {_span(widths)} x {_span(heights)} px ({len(widths)} sampled)"
    cut = facts["truncation"]
    text = f"text: {facts['max_length']} tokens"
    if cut["sampled"]:
        text += (f"; {cut['cut']:,} of {cut['sampled']:,} sampled captions ({cut['share']:.1%}) are longer and get "
                 f"cut (end token included)")
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = per_device * args.world_size * accumulation
    if not facts["train_rows"]:
        epochs = "epochs unknown (a stream: max_steps decides)"
    else:  # as asked, or what max_steps makes of the rows
        epochs = (f"{state.num_train_epochs:,} epoch(s)" if args.max_steps <= 0
                  else f"{state.max_steps * global_batch / facts['train_rows']:.3g} epoch(s)")
    batch = (f"batch: {global_batch:,} global = {per_device:,} per device x "
             f"{args.world_size} process(es) x {accumulation} accumulation step(s); {state.max_steps:,} step(s), "
             f"{epochs}")
    steps = ", ".join(f"{name} {json.dumps(settings, default=str)}" + (f" ({rows[0]:,} -> {rows[1]:,} rows)" if rows
                                                                        else "")
                      for step, rows in zip(facts["data_steps"], facts.get("data_step_rows") or [None] * 99)
                      for name, settings in step.items()) or "none"
    device = args.device.type + (" (bf16)" if args.bf16 else " (fp16)" if args.fp16 else "")
    return [f"Training on {rows}", f"  {image}", f"  {text}", f"  {batch}",
            f"  parameters: {trainable:,} trainable, {frozen:,} frozen"
            + (f" (LoRA: {adapters:,} in adapters, {trainable / (trainable + frozen):.2%} of all trainable)"
               if adapters else ""),
            f"  processes: {args.world_size} on {device}", f"  data steps: {steps}"]


def _span(values) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def summary_warnings(facts: dict) -> list[str]:
    """The warnings the facts call for (see the module docstring)."""
    warnings = []
    cut = facts["truncation"]
    if cut["sampled"] and cut["share"] > TRUNCATION_WARNING_SHARE:
        warnings.append(f"{cut['share']:.0%} of {cut['sampled']:,} sampled captions are longer than max_length "
                        f"{facts['max_length']} tokens (end token included) and are cut; --max_length "
                        f"{cut['fits_95']} would hold 95% of them whole")
    sizes, size = facts["data_image_sizes"], facts["image_size"]
    if facts["new_vision_tower"] and sizes and size:
        largest = max(max(width, height) for width, height in sizes)
        if size > IMAGE_SIZE_WARNING_RATIO * largest:
            warnings.append(f"the new vision tower takes {size} x {size} images ({facts['image_size_source']}) but "
                            f"the data's are at most {largest} px on a side ({len(sizes)} sampled): each step pays for "
                            f"{(size / largest) ** 2:.0f}x the pixels for no detail; set --image_size near {largest} "
                            "(a multiple of --patch_size)")
    return warnings


class StartupSummary(TrainerCallback):
    """Prints the summary and its warnings when training begins, on process 0 only."""

    def __init__(self, facts: dict):
        self.facts = facts

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.facts is None:
            return
        print("\n".join(summary_lines(self.facts, args, state, model)), flush=True)
        for warning in summary_warnings(self.facts):
            logger.warning("hf-siglip train: warning: %s", warning)


__all__ = ["StartupSummary", "caption_lengths", "data_step_settings", "describe_run", "quiet_local_loading",
           "sample_captions",
           "sample_image_sizes", "summary_lines", "summary_warnings", "truncation"]
