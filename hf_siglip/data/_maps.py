"""Adding computed columns without rewriting the columns a function does not touch."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import datasets


def map_new_columns(dataset, function: Callable, input_columns: Sequence[str], output_columns: Sequence[str],
                    num_proc: Optional[int] = None, batch_size: int = 1000, with_indices: bool = False,
                    desc: Optional[str] = None, features: Optional[datasets.Features] = None, **map_kwargs):
    """Run a batched ``function(*input_columns[, indices]) -> {output column: values}`` and attach its
    outputs to ``dataset``.

    On a ``Dataset`` only ``input_columns`` are read and only the outputs are written (to a new Arrow
    table joined column-wise), so images and other columns are never copied. Existing columns named in
    ``output_columns`` are replaced. On an ``IterableDataset`` it is a lazy map reading only
    ``input_columns``; ``num_proc`` is ignored there.
    """
    input_columns = list(input_columns)
    if isinstance(dataset, datasets.Dataset):
        computed = dataset.select_columns(input_columns).map(
            function, input_columns=input_columns, batched=True, batch_size=batch_size, with_indices=with_indices,
            remove_columns=input_columns, num_proc=num_proc, desc=desc, features=features, **map_kwargs)
        stale = [c for c in output_columns if c in dataset.column_names]
        base = dataset.remove_columns(stale) if stale else dataset
        return datasets.concatenate_datasets([base, computed], axis=1)
    if features is not None and dataset.features is not None:
        merged = dataset.features.copy()
        merged.update(features)
        map_kwargs["features"] = merged
    return dataset.map(function, input_columns=input_columns, batched=True, batch_size=batch_size,
                       with_indices=with_indices, **map_kwargs)


def with_encoded_images(dataset, image_column: str, transform: Callable):
    """``transform(dataset)`` with ``image_column`` read as encoded bytes (``Image(decode=False)``), the column's
    own feature restored afterwards: a step that passes images through (or decodes them itself, counting the
    broken ones) neither decodes every image in ``datasets`` nor crashes there on a broken file."""
    feature = (dataset.features or {}).get(image_column)
    if not isinstance(feature, datasets.Image) or not feature.decode:
        return transform(dataset)
    result = transform(dataset.cast_column(image_column, datasets.Image(decode=False)))
    if result.features is not None and image_column in result.features:
        result = result.cast_column(image_column, feature)
    return result
