"""Index arithmetic on numpy arrays, shared by packing and masking."""

from __future__ import annotations

import numpy as np


def runs(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``first[i], first[i] + 1, ..., first[i] + counts[i] - 1`` for every i, concatenated."""
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.repeat(first - offsets, counts) + np.arange(total, dtype=first.dtype)
