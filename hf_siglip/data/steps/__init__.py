"""Data steps: the papers' data pipelines as an ordered list in a recipe.

The contract (decision 7 in docs/ARCHITECTURE.md). A data step is one module here that registers

* a typed config dataclass (validated when it is built, so a bad recipe fails before any data is read), and
* ``apply(dataset, config, context) -> dataset``, which adds or replaces named columns of a ``Dataset``
  (also one loaded from a ``save_to_disk`` folder) or a streaming ``IterableDataset``, reads only the
  columns it needs (images stay encoded bytes unless the step looks at pixels), and records what it did in
  ``context.record(step_name, counts)``.

Columns have canonical names by the time a step runs (``image``, ``caption``, ``image_id``: see
``hf_siglip.data.loading.canonical_columns``). Row steps change the dataset; batch steps
(``caption_sampling``, ``image_augmentation``) configure what the collator does to each batch and leave the
dataset as it is. A recipe lists the steps in order::

    data_steps:
      - pseudo_captions: {model: Salesforce/blip-image-captioning-base, num_captions: 3}
      - caption_sampling: {k: 5}
      - image_augmentation: {crop_scale: [0.8, 1.0]}

and a flag says the same in JSON: ``--data_steps '[{"label_noise": {"text": 0.2}}]'``.

Counts: for a ``Dataset`` they are exact (``rows_in`` / ``rows_out`` plus each step's reasons) once the step
has run. For a stream they fill in as it is read, in the process that reads it (DataLoader workers keep their
own copies: use ``dataloader_num_workers=0`` when the counts matter).

Several processes (torchrun, accelerate launch): a step that runs a model over the data or writes files
(``pseudo_captions``, ``cat_filter``, ``capfilt``, ``positive_groups``, ``concept_targets``,
``image_embedding_cache``) goes through :meth:`DataContext.computed_once`: on a ``Dataset`` the main process
computes it and saves the columns it wrote (and which rows it kept) to a folder under the ``datasets`` cache
(``HF_DATASETS_CACHE/hf_siglip_data_steps``, one folder per step and output_dir, which several machines must
share); the others wait (up to ``--ddp_timeout``), then read that folder and its counts, so every process trains on
the same captions, targets and group ids, as one process would. ``label_noise`` is a deterministic function of
(seed, row key) and runs on every process; the batch steps only configure the collator. On a stream every step is a
lazy map that each process runs on the rows it reads (``positive_groups``, which reads the whole stream, then runs
on every process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch


@dataclass(frozen=True)
class DataStep:
    name: str
    config_class: type
    apply: Callable  # (dataset, config, context) -> dataset
    kind: str = "rows"  # "rows": changes the dataset; "batch": configures the collator
    reads_images: bool = False  # decodes the rows' images (so it must run before a step that drops them)
    hands_collator: tuple[str, ...] = ()  # SiglipDataCollator arguments it sets in `context.collator_options`


DATA_STEPS: dict[str, DataStep] = {}
# One module per step; importing it registers it. A new step: its module here plus its name in this tuple.
_STEP_MODULES = ("pseudo_captions", "cat_filter", "capfilt", "positive_groups", "label_noise", "concept_targets",
                 "image_embedding_cache", "caption_sampling", "image_augmentation")


def register_data_step(name: str, config_class: type, kind: str = "rows", reads_images: bool = False,
                       hands_collator: tuple[str, ...] = ()):
    """Decorator for a step's ``apply(dataset, config, context)``: its kind, whether it reads the images, and which
    collator arguments it hands over (``context.collator_options``, passed to the collator as they are)."""
    def register(apply):
        DATA_STEPS[name] = DataStep(name, config_class, apply, kind, reads_images, tuple(hands_collator))
        return apply
    return register


def _load_steps() -> None:
    for module in _STEP_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def _process() -> tuple[int, int]:
    """(this process's rank, number of processes) in torch.distributed's default group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def main_process_first(**kwargs):
    """The block runs on the main process (rank 0) first and on the others once it is done: torch.distributed
    barriers, as ``TrainingArguments.main_process_first`` (whose keywords, ``desc=`` and ``local=``, it accepts)."""
    rank, processes = _process()
    try:
        if processes > 1 and rank != 0:
            torch.distributed.barrier()
        yield
    finally:
        if processes > 1 and rank == 0:
            torch.distributed.barrier()


_ROW = "_hf_siglip_row"  # the input row each result row came from, while a shared step runs
_SHARED_META = "hf_siglip_data_step.json"


def _shared_folder(run: str, step: str, position: int, rows: int, processes: int) -> Path:
    """Where the main process leaves a shared step's result: the same path on every process of one run, another
    for each step. ``run`` names the run (`hf-siglip train`: its output_dir, so a rerun replaces its folders); by
    default the launcher's rendezvous address, which two runs at once cannot share."""
    run = run or ":".join(os.environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    key = hashlib.sha256(json.dumps([run, processes, position, step, rows]).encode()).hexdigest()[:16]
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_siglip_data_steps" / f"{step}-{key}"


@dataclass
class DataContext:
    """What a step may need beyond its own settings, and where it records what it did.

    Args:
        seed: the run's seed (steps derive their random draws from it).
        max_length: text length of the model being trained (for steps that embed captions).
        training_model: ``training_model(dataset) -> (model, processor)``, the model being trained, built on
            first use from the data as it is at that point (a new tokenizer is trained on its captions).
        main_process_first: context manager factory (``desc=``, ``local=``) that runs its block on the main
            process first and on the others after it (default: torch.distributed barriers; the trainer passes
            ``TrainingArguments.main_process_first``). See :meth:`computed_once`.
        run: names this run's shared step results (:meth:`computed_once`); the trainer gives its output_dir.
    """

    seed: int = 0
    max_length: int = 64
    training_model: Callable[[Any], tuple[Any, Any]] | None = None
    main_process_first: Callable[..., Any] = main_process_first
    report: dict[str, Counter] = field(default_factory=dict)
    # collator arguments batch steps hand over (caption_sampling: caption_sampler; image_augmentation:
    # image_transform): `SiglipDataCollator(..., **context.collator_options)`
    collator_options: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    _training_model_used: bool = field(default=False, init=False, repr=False)
    _shared_steps: int = field(default=0, init=False, repr=False)

    def record(self, step: str, counts) -> Counter:
        """Keep ``counts`` (a Counter that may still fill in, for streams) under a unique name for ``step``."""
        name, n = step, 1
        while name in self.report:
            n += 1
            name = f"{step}_{n}"
        counts = counts if isinstance(counts, Counter) else Counter(counts)
        self.report[name] = counts
        return counts

    def model(self, dataset, path: str | None):
        """``(model, processor)``: the checkpoint at ``path``, or the model being trained when ``path`` is None."""
        if path is not None:
            from transformers import AutoModel, AutoProcessor

            from ...dual_encoders import as_dual_encoder  # a VisionTextDualEncoder pools text as it was trained

            return as_dual_encoder(AutoModel.from_pretrained(path)).eval(), AutoProcessor.from_pretrained(path)
        if self.training_model is None:
            raise ValueError("this step uses the model being trained (model: null), which this run does not provide; "
                             "give the step a checkpoint with model: PATH")
        self._training_model_used = True
        return self.training_model(dataset)

    def computed_once(self, step: str, dataset, compute: Callable, columns: Sequence[str]):
        """``compute(dataset)`` for a step that runs a model over the data or writes files, computed once.

        On one process, or on a stream (a lazy map each process runs on the rows it reads), it is just
        ``compute(dataset)``. On a ``Dataset`` with several processes the main process computes it first and saves
        ``columns`` (those the step adds or replaces: never the images), which input rows it kept, the counts it
        recorded and whether it built the model being trained; the others wait, then read that folder and put the
        same result together from their own copy of the input. The torch random state afterwards is what it was
        before (the step's draws are undone), so it is the same on every process and as on one process; so is the
        model being trained when the step built it.
        """
        rank, processes = _process()
        # a GPU's generator too once CUDA is in use (not starting CUDA in a CPU run on a GPU machine)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # the step's draws (a captioner's seeds) stay inside it
            if processes == 1 or not isinstance(dataset, datasets.Dataset):
                return compute(dataset)
            self._shared_steps += 1
            folder = _shared_folder(self.run, step, self._shared_steps, len(dataset), processes)
            with self.main_process_first(local=False, desc=f"{step} (on the main process)"):
                if rank == 0:
                    return self._compute_and_share(step, dataset, compute, list(columns), folder)
                return self._read_shared(step, dataset, folder)

    def _compute_and_share(self, step, dataset, compute, columns, folder: Path):
        before, model_was_used = set(self.report), self._training_model_used
        result = compute(dataset.add_column(_ROW, np.arange(len(dataset), dtype=np.int64)))
        names = [name for name in result.column_names if name != _ROW]
        undeclared = sorted(set(names) - set(dataset.column_names) - set(columns))
        if undeclared or not set(columns) <= set(names):
            raise ValueError(f"{step}: wrote columns {undeclared} it does not declare, or lacks some of {columns}")
        meta = {"rows_in": len(dataset), "columns": names, "written": columns,
                "reports": {name: dict(counts) for name, counts in self.report.items() if name not in before},
                "built_training_model": self._training_model_used and not model_was_used}
        for stale in [folder, *folder.parent.glob(folder.name + ".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        result.select_columns([_ROW, *columns]).save_to_disk(str(temporary))
        (temporary / _SHARED_META).write_text(json.dumps(meta, default=lambda value: value.item()))
        temporary.rename(folder)  # complete or absent
        return result.remove_columns(_ROW)

    def _read_shared(self, step, dataset, folder: Path):
        if not (folder / _SHARED_META).exists():
            raise RuntimeError(f"{step}: the main process left no result at {folder} (did it fail?)")
        meta = json.loads((folder / _SHARED_META).read_text())
        if meta["rows_in"] != len(dataset):
            raise RuntimeError(f"{step}: the main process computed it on {meta['rows_in']} rows, this process has "
                               f"{len(dataset)}")
        if meta["built_training_model"]:  # from the same data as on the main process (a new tokenizer learns it)
            self.model(dataset, None)
        for name, counts in meta["reports"].items():
            self.report[name] = Counter(counts)
        shared = datasets.load_from_disk(str(folder))
        rows = shared.data.column(_ROW).to_numpy()
        base = dataset if np.array_equal(rows, np.arange(len(dataset))) else dataset.select(rows)
        base = base.select_columns([name for name in meta["columns"] if name not in meta["written"]])
        result = datasets.concatenate_datasets([base, shared.remove_columns(_ROW)], axis=1)
        return result.select_columns(meta["columns"])


def parse_data_steps(spec) -> list[tuple[str, Any]]:
    """A recipe's ``data_steps`` (a list of one-key mappings, or its JSON text) as ``[(name, config)]``.

    Raises ``ValueError`` naming the step (by position and name) and the problem: an unknown step, an unknown
    setting, a bad value.
    """
    _load_steps()
    if spec is None:
        return []
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ValueError(f"data_steps: not valid JSON ({error}): {spec!r}") from None
    if isinstance(spec, dict):
        spec = [{name: settings} for name, settings in spec.items()]
    if not isinstance(spec, list):
        raise ValueError(f"data_steps must be a list of {{step: settings}} entries, got {type(spec).__name__}")
    steps = []
    for position, entry in enumerate(spec, 1):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"data_steps entry {position}: expected one {{step: settings}} mapping, got {entry!r}")
        ((name, settings),) = entry.items()
        if name not in DATA_STEPS:
            raise ValueError(f"data_steps entry {position}: unknown step {name!r}; the steps are {sorted(DATA_STEPS)}")
        step = DATA_STEPS[name]
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ValueError(f"data_steps entry {position} ({name}): settings must be a mapping, got {settings!r}")
        known = {f.name for f in dataclasses.fields(step.config_class) if f.init}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"data_steps entry {position} ({name}): unknown setting(s) {unknown}; "
                             f"{name} takes {sorted(known)}")
        try:
            config = step.config_class(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"data_steps entry {position} ({name}): {error}") from None
        steps.append((name, config))
    return steps


def run_data_steps(dataset, steps: list[tuple[str, Any]], context: DataContext):
    """Apply ``steps`` in order; each step's counts (with ``rows_in`` / ``rows_out`` for a Dataset) go to
    ``context.report``."""
    _load_steps()
    for name, config in steps:
        rows_in = len(dataset) if isinstance(dataset, datasets.Dataset) else None
        before = set(context.report)
        dataset = DATA_STEPS[name].apply(dataset, config, context)
        undeclared = set(context.collator_options) - {option for step in DATA_STEPS.values()
                                                      for option in step.hands_collator}
        if undeclared:  # a step's collator arguments are part of its registration
            raise ValueError(f"data step {name!r} set collator option(s) {sorted(undeclared)} it does not declare")
        recorded = [key for key in context.report if key not in before
                    and (key == name or key.removeprefix(f"{name}_").isdigit())]
        counts = context.report[recorded[0]] if recorded else context.record(name, Counter())
        if rows_in is not None and DATA_STEPS[name].kind == "rows":
            counts["rows_in"] = rows_in
            counts["rows_out"] = len(dataset)
    return dataset


__all__ = ["DATA_STEPS", "DataContext", "DataStep", "main_process_first", "parse_data_steps", "register_data_step",
           "run_data_steps"]
