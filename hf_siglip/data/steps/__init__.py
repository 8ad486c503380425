"""Data steps: the papers' data pipelines as an ordered list in a recipe.

The contract (DESIGN decision 7). A data step is one module here that registers

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets


@dataclass(frozen=True)
class DataStep:
    name: str
    config_class: type
    apply: Callable  # (dataset, config, context) -> dataset
    kind: str = "rows"  # "rows": changes the dataset; "batch": configures the collator


DATA_STEPS: dict[str, DataStep] = {}
# One module per step; importing it registers it. A new step: its module here plus its name in this tuple.
_STEP_MODULES = ("pseudo_captions", "cat_filter", "capfilt", "positive_groups", "label_noise", "concept_targets",
                 "image_embedding_cache", "caption_sampling", "image_augmentation")


def register_data_step(name: str, config_class: type, kind: str = "rows"):
    """Decorator for a step's ``apply(dataset, config, context)``."""
    def register(apply):
        DATA_STEPS[name] = DataStep(name, config_class, apply, kind)
        return apply
    return register


def _load_steps() -> None:
    for module in _STEP_MODULES:
        importlib.import_module(f"{__name__}.{module}")


@dataclass
class DataContext:
    """What a step may need beyond its own settings, and where it records what it did.

    Args:
        seed: the run's seed (steps derive their random draws from it).
        max_length: text length of the model being trained (for steps that embed captions).
        training_model: ``training_model(dataset) -> (model, processor)``, the model being trained, built on
            first use from the data as it is at that point (a new tokenizer is trained on its captions).
        main_process_first: context manager factory for work every process would otherwise repeat.
    """

    seed: int = 0
    max_length: int = 64
    training_model: Callable[[Any], tuple[Any, Any]] | None = None
    main_process_first: Callable[..., Any] = lambda **kwargs: contextlib.nullcontext()  # takes TrainingArguments' desc=
    report: dict[str, Counter] = field(default_factory=dict)
    caption_sampler: Any = None  # set by the caption_sampling step
    image_transform: Any = None  # set by the image_augmentation step

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

            return AutoModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
        if self.training_model is None:
            raise ValueError("this step uses the model being trained (model: null), which this run does not provide; "
                             "give the step a checkpoint with model: PATH")
        return self.training_model(dataset)


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
        recorded = [key for key in context.report if key not in before
                    and (key == name or key.removeprefix(f"{name}_").isdigit())]
        counts = context.report[recorded[0]] if recorded else context.record(name, Counter())
        if rows_in is not None and DATA_STEPS[name].kind == "rows":
            counts["rows_in"] = rows_in
            counts["rows_out"] = len(dataset)
    return dataset


__all__ = ["DATA_STEPS", "DataContext", "DataStep", "parse_data_steps", "register_data_step", "run_data_steps"]
