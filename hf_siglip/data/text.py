"""Normalising caption column values into a list of usable caption strings.

Policies (tested in ``tests/test_data_collator.py`` and ``tests/test_data_loading.py``):

* a single string: **converted** to a one-element list;
* a list / tuple of strings of any length: kept in order;
* ``None``, empty or whitespace-only captions (alone or inside a list): **dropped**; the caller counts
  them (the collator reports them in a warning and in ``collator.stats``);
* surrounding whitespace is stripped and inner runs of whitespace collapsed;
* any other type (a number, a dict, a list holding a number): **raises** ``TypeError`` naming the
  row, since it means the wrong column was configured.
"""

from __future__ import annotations

from typing import Any


def normalize_captions(value: Any, row: Any = None) -> tuple[list[str], int]:
    """Return ``(captions, n_dropped)`` for one caption cell.

    ``row`` only names the row in error messages (an index or an id).
    """
    if value is None:
        return [], 1
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"row {row}: caption must be a string or a list of strings, got {type(value).__name__}")
    captions: list[str] = []
    dropped = 0
    for item in items:
        if item is None:
            dropped += 1
            continue
        if not isinstance(item, str):
            raise TypeError(f"row {row}: caption list holds a {type(item).__name__} ({item!r}), not a string")
        cleaned = " ".join(item.split())
        if cleaned:
            captions.append(cleaned)
        else:
            dropped += 1
    return captions, dropped
