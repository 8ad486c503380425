"""`hf_siglip_eval.json`: what a run evaluated on, saved beside the weights so `hf-siglip eval` evaluates on it too.

`hf-siglip train` writes it into the output folder and into each `checkpoint-N` folder:

    {"format": 1, "dataset": "/abs/path/or/hub-id/or/demo", "train_split": "train", "eval_split": "test",
     "image_column": "image", "caption_column": "caption", "label_column": "label", "max_length": 64,
     "max_train_samples": null, "max_eval_samples": null, "zero_shot_classes": [...], "zero_shot_templates": [...],
     "demo_train_size": 4000, "demo_test_size": 500, "demo_image_size": 32}

`eval_split` is the split the run evaluated on (`auto` resolved to its name; null: the run did not evaluate, and
`hf-siglip eval` then takes `auto`); `zero_shot_classes` / `zero_shot_templates` are the ones the run used (the
demo's own for the demo; null: no zero-shot evaluation); a local dataset is recorded as an absolute path; the
`demo_*` sizes only for the demo. `hf-siglip eval --checkpoint DIR` fills every setting it is not given from this file;
a `--dataset` other than the recorded one takes none of the recorded data settings (they describe another dataset),
only `max_length`, which belongs to the model.
"""

import json
import logging
import os
from dataclasses import fields

from ..errors import UsageError

logger = logging.getLogger(__name__)

EVAL_RECORD_NAME = "hf_siglip_eval.json"
# the data settings recorded beside `dataset`, as SiglipScriptArguments names them
RECORDED_SETTINGS = ("train_split", "eval_split", "image_column", "caption_column", "label_column",
                     "max_train_samples", "max_eval_samples", "zero_shot_classes", "zero_shot_templates")
DEMO_SETTINGS = ("demo_train_size", "demo_test_size", "demo_image_size")


class EvaluationDataError(UsageError):
    """`hf-siglip eval` cannot tell what to evaluate on (no record and no `--dataset`, no evaluation split, no usable
    row): the command prints it in one line."""


def dataset_reference(dataset: str) -> str:
    """`dataset` as a record holds it: a local path made absolute (the record is read from other folders), else as
    given (`demo`, a Hub id, a load_dataset spec)."""
    from .arguments import DEMO

    if dataset != DEMO and os.path.exists(dataset):
        return os.path.abspath(dataset)
    return dataset


def evaluation_record(script_args, eval_split: str | None) -> dict:
    """The record of a training run's evaluation data (`eval_split`: the split evaluated on, None when none)."""
    from ..data.demo import DEMO_CLASSES, DEMO_TEMPLATES
    from .arguments import DEMO

    demo = script_args.dataset == DEMO
    classes = script_args.zero_shot_classes or (list(DEMO_CLASSES) if demo else None)
    record = {"format": 1, "dataset": dataset_reference(script_args.dataset),
              **{name: getattr(script_args, name) for name in RECORDED_SETTINGS},
              "eval_split": eval_split, "max_length": script_args.max_length, "zero_shot_classes": classes,
              "zero_shot_templates": (script_args.zero_shot_templates or list(DEMO_TEMPLATES)) if classes else None}
    if demo:
        record.update({name: getattr(script_args, name) for name in DEMO_SETTINGS})
    return record


def write_evaluation_record(record: dict, folder: str) -> str:
    path = os.path.join(folder, EVAL_RECORD_NAME)
    with open(path, "w") as file:
        json.dump(record, file, indent=2)
        file.write("\n")
    return path


def evaluation_record_callback(record: dict):
    """A `TrainerCallback` writing `record` into each checkpoint folder the Trainer saves (process 0)."""
    from transformers import TrainerCallback

    class EvaluationRecordCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(folder):
                write_evaluation_record(record, folder)

    return EvaluationRecordCallback()


def read_evaluation_record(checkpoint: str) -> dict | None:
    """The checkpoint's record (a folder, or a Hub repository that holds one), or None when it has none."""
    path = os.path.join(checkpoint, EVAL_RECORD_NAME)
    if not os.path.isdir(checkpoint):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(checkpoint, EVAL_RECORD_NAME)
        except Exception:  # offline, no such repository or file, not a repository id: no record
            return None
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


def apply_evaluation_record(args, record: dict | None, defaults) -> str:
    """Fill the fields of `args` (SiglipEvalArguments) left unset (None) from `record`, then from `defaults` (a
    SiglipScriptArguments with its defaults). Returns where the settings came from, for the report's first line.
    Raises EvaluationDataError when neither `--dataset` nor a record says what to evaluate on."""
    from .arguments import DEMO

    if args.dataset is None and record is None:
        raise EvaluationDataError(f"{args.checkpoint} holds no {EVAL_RECORD_NAME} (the record of what `hf-siglip "
                                  "train` evaluated on): say what to evaluate on with --dataset (and --eval_split, "
                                  "--zero_shot_classes as needed)")
    same_data = record is not None and (args.dataset is None
                                        or dataset_reference(args.dataset) == record.get("dataset"))
    if args.dataset is None:
        args.dataset = record["dataset"]
    source = "flags"
    if same_data:
        names = RECORDED_SETTINGS + (DEMO_SETTINGS if args.dataset == DEMO else ())
        given = [name for name in names if getattr(args, name) is not None]
        for name in names:
            if getattr(args, name) is None and record.get(name) is not None:
                setattr(args, name, record[name])
        source = f"the checkpoint's {EVAL_RECORD_NAME}" + (f", flags for {', '.join(given)}" if given else "")
    elif record is not None:
        logger.info("--dataset %s is not the dataset %s was trained on (%s): its recorded data settings are not "
                    "used", args.dataset, args.checkpoint, record.get("dataset"))
    if args.max_length is None and record is not None and record.get("max_length"):
        args.max_length = int(record["max_length"])
    for spec in fields(defaults):  # whatever is still unset takes `hf-siglip train`'s default
        if spec.name in RECORDED_SETTINGS + DEMO_SETTINGS and getattr(args, spec.name) is None:
            setattr(args, spec.name, getattr(defaults, spec.name))
    return source


__all__ = ["EVAL_RECORD_NAME", "EvaluationDataError", "apply_evaluation_record", "evaluation_record",
           "evaluation_record_callback", "read_evaluation_record", "write_evaluation_record"]
