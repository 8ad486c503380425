"""Fine-tuning that does not forget, the measuring side: zero-shot accuracy on an anchor set.

`--anchor_dataset` names a labelled set with class names (the demo, or a folder / save_to_disk / Hub dataset with an
image, a caption and a label column, as `--dataset` takes them). Its evaluation split is read once; each time the
trainer evaluates (before training with `eval_on_start`, at every evaluation, after training and at each WiSE-FT mix)
`AnchorCallback` classifies its images zero-shot with the model as it is then and adds
`<prefix>_anchor_zero_shot_top1` / `_top5` to the evaluation's metrics and to the log, beside the target metrics.
The images and prompts are prepared as `hf-siglip eval` prepares them (`zero_shot_evaluation`), so
`hf-siglip eval --checkpoint DIR --dataset ANCHOR` gives the same zero-shot top-1 for the same weights.
"""

import types

from ..errors import UsageError
from .arguments import AUTO, DEMO

ANCHOR_PREFIX = "anchor_"
# the key of the anchor accuracy inside an evaluation's metrics (after the evaluation's prefix)
ANCHOR_TOP1 = "anchor_zero_shot_top1"


def load_anchor_split(script_args):
    """The anchor's evaluation rows (canonical columns), read once. The demo is generated as `hf-siglip eval
    --dataset demo` generates it (seed 0, `demo_test_size`, `demo_image_size`)."""
    import datasets

    from ..data import make_demo_dataset
    from ..data.loading import canonical_columns, load_image_text_dataset
    from ..data.splits import select_split

    source, split = script_args.anchor_dataset, script_args.anchor_split
    if source == DEMO:
        # the demo's test split does not depend on the train split's size (its own random stream)
        splits = make_demo_dataset(n_train=0, n_test=script_args.demo_test_size,
                                   image_size=script_args.demo_image_size, seed=0)
    else:
        splits = load_image_text_dataset(source, split=None)
    names = ["test", "validation"] if split == AUTO else [split]
    for index, name in enumerate(names):
        try:
            rows = select_split(splits, name, f"anchor_dataset {source}")
            break
        except KeyError:
            if index == len(names) - 1:
                available = sorted(splits) if isinstance(splits, dict) else ["train"]
                raise UsageError(f"anchor_dataset {source} has no split {' or '.join(map(repr, names))}; its "
                                 f"splits are {available} (name one with --anchor_split)") from None
    if isinstance(rows, datasets.IterableDataset):  # a stream: read the split once into Arrow
        rows = load_image_text_dataset(source, split=name, streaming=False)
    rows = canonical_columns(rows)
    if script_args.anchor_label_column not in rows.column_names:
        raise UsageError(f"anchor_dataset {source}: no label column {script_args.anchor_label_column!r} (columns: "
                         f"{rows.column_names}); name it with --anchor_label_column")
    if script_args.anchor_max_samples is not None:
        rows = rows.select(range(min(script_args.anchor_max_samples, len(rows))))
    return rows


def anchor_classes(script_args, rows) -> list[str]:
    """`--anchor_classes`, else the demo's classes, else the label column's class names (a `ClassLabel`)."""
    from ..data.demo import DEMO_CLASSES

    if script_args.anchor_classes:
        return list(script_args.anchor_classes)
    if script_args.anchor_dataset == DEMO:
        return list(DEMO_CLASSES)
    names = getattr(rows.features.get(script_args.anchor_label_column), "names", None)
    if not names:
        raise UsageError(f"anchor_dataset {script_args.anchor_dataset}: the label column "
                         f"{script_args.anchor_label_column!r} holds no class names (not a ClassLabel); give them "
                         "with --anchor_classes")
    return list(names)


class AnchorEvaluation:
    """Zero-shot metrics of a model on the anchor set: `anchor_zero_shot_top1`, `_top5`, `_classes`,
    `_chance_top1`, `_ties`. The set is loaded when this is built (before training: a bad anchor fails at once)."""

    def __init__(self, script_args, processor):
        from .train import usable_rows

        rows = load_anchor_split(script_args)
        self.rows = rows.select(usable_rows(rows)[0])  # as the target's zero-shot: a decodable image and a caption
        if not len(self.rows):
            raise UsageError(f"anchor_dataset {script_args.anchor_dataset}: no row has a decodable image and a "
                             "caption")
        from ..data.demo import DEMO_TEMPLATES

        self.processor = processor
        # what `zero_shot_evaluation` reads, set to the anchor's
        self.settings = types.SimpleNamespace(
            dataset=script_args.anchor_dataset, zero_shot_classes=anchor_classes(script_args, self.rows),
            zero_shot_templates=script_args.anchor_templates or list(DEMO_TEMPLATES),
            label_column=script_args.anchor_label_column, max_length=script_args.max_length)

    def __call__(self, model) -> dict[str, float]:
        from .train import zero_shot_evaluation

        training = model.training
        try:
            metrics = zero_shot_evaluation(model, self.processor, self.rows, self.settings)
        finally:
            model.train(training)
        return {f"{ANCHOR_PREFIX}{name}": value for name, value in metrics.items()}


def anchor_callback(trainer, evaluation: AnchorEvaluation):
    """A `TrainerCallback` that adds the anchor's metrics, under the evaluation's own prefix (`eval_`,
    `wise_ft_0.5_`...), to each evaluation's metrics (what `trainer.evaluate()` returns) and logs them beside it.
    Every process computes them alike on its own copy of the weights (no collective)."""
    from transformers import TrainerCallback

    class AnchorCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics is None:
                return
            recall = next((key for key in metrics if key.endswith("_i2t_recall@1")), None)
            prefix = recall[:-len("i2t_recall@1")] if recall else "eval_"
            model = trainer.accelerator.unwrap_model(trainer.model)
            extra = {f"{prefix}{name}": value for name, value in evaluation(model).items()}
            metrics.update(extra)
            trainer.log(extra)

    return AnchorCallback()


__all__ = ["ANCHOR_PREFIX", "ANCHOR_TOP1", "AnchorEvaluation", "anchor_callback", "anchor_classes",
           "load_anchor_split"]
