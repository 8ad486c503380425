"""Is a path the user gave meant as a local file or folder, and if so, does it exist?

`hf-siglip` takes `--dataset`, `--checkpoint`, `--model_name_or_path`... as a local path or a Hub id. A local
path that does not exist would otherwise go to the Hub (tens of seconds of retries, then "Couldn't reach ... on the
Hub"); `missing_local_path` says so at once, with the closest name in the folder above. Imports nothing heavy.
"""

import difflib
import glob
import os

# Endings of files users pass as data or weights: a name ending so is a local file, never a Hub id.
_LOCAL_SUFFIXES = (".tar", ".parquet", ".arrow", ".jsonl", ".json", ".csv", ".yaml", ".yml", ".txt",
                   ".safetensors", ".bin", ".zip", ".gz")


def looks_local(path) -> bool:
    """Whether `path` is meant as a local file or folder rather than a Hub id (`user/name`) or a builder name:
    it exists; or starts with `/`, `.`, `~`; or holds a glob pattern, a backslash or two or more `/`; or ends with
    a data or weights file's suffix; or its first folder exists here (`data/flikr8k` beside `data/`)."""
    text = os.fspath(path)
    if not text:
        return False
    if os.path.exists(os.path.expanduser(text)):
        return True
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") >= 2:
        return True
    if any(char in text for char in "*?[") or text.lower().endswith(_LOCAL_SUFFIXES):
        return True
    return "/" in text and os.path.isdir(text.split("/")[0])


def missing_local_path(path, what: str) -> str | None:
    """A one-line problem when `path` looks local (`looks_local`) but nothing is there (a glob: matches
    nothing), naming `what` (e.g. "dataset") and the closest existing name in its folder; else None."""
    if path is None:
        return None
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if not looks_local(text) or os.path.exists(expanded):
        return None
    if any(char in text for char in "*?["):
        return None if glob.glob(expanded) else f"{what} {text}: the pattern matches no file"
    return f"{what} {text}: no such file or folder{_closest_sibling(expanded)}"


def _closest_sibling(path: str) -> str:
    folder, name = os.path.split(path.rstrip("/\\"))
    folder = folder or "."
    while not os.path.isdir(folder) and folder not in ("", os.path.dirname(folder)):
        folder, name = os.path.split(folder)
        folder = folder or "."
    try:
        entries = os.listdir(folder)
    except OSError:
        return ""
    close = difflib.get_close_matches(name, entries, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {os.path.join(folder, close[0]) if folder != '.' else close[0]}?)"


__all__ = ["looks_local", "missing_local_path"]
