"""Counter-based random numbers: the same (seed, epoch, row key, slot) always gives the same draw,
whatever the batch size, ``num_proc`` or streaming order, with no per-row generator objects."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over a uint64 array (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hashed_uniform(*streams) -> np.ndarray:
    """Uniform floats in the open interval (0, 1), one per broadcast element of the integer streams."""
    arrays = np.broadcast_arrays(*[np.asarray(s).astype(np.int64).astype(np.uint64) for s in streams])
    state = np.zeros(arrays[0].shape, dtype=np.uint64)
    for array in arrays:
        state = splitmix64(state ^ array)
    # top 53 bits -> [0, 1), then shift off zero
    return ((state >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
