"""Split names: datasets' aliases ('dev' / 'val' are 'validation'), one place for the loaders, shards and the
command line (a leaf module: it imports nothing of the package)."""

import datasets

_SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test", "eval"),
                  "train": ("train", "training")}


def split_name(folder: str) -> str:
    return next((split for split, aliases in _SPLIT_ALIASES.items() if folder.lower() in aliases), folder)


def select_split(splits, name: str, source: str = "the dataset"):
    """``splits[name]``, accepting datasets' aliases ('dev' / 'val' find 'validation' and back); a plain
    Dataset is the 'train' split. Raises ``KeyError`` listing the splits there are."""
    if not isinstance(splits, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = {"train": splits}
    if name in splits:
        return splits[name]
    canonical = split_name(name)
    for key in splits:
        if split_name(key) == canonical:
            return splits[key]
    raise KeyError(f"{source} has no split {name!r}; its splits are {sorted(splits)}")
