"""Seeded permutations of [0, n) evaluated per element: no O(n) table.

An epoch's order is a keyed bijection (a balanced Feistel network over the
smallest even number of bits covering n, with cycle walking back into
[0, n)), so batch i of an epoch is ``permute(key, n, range(i*B, (i+1)*B))``,
computed in O(B) on any replica, with no state stored anywhere.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..masking.rng import fmix64, key64

ROUNDS = 6
_PERM = 0x7065726D


@lru_cache(maxsize=1024)
def _round_keys(seed: int, epoch: int) -> np.ndarray:
    key = int(key64(seed, epoch)[0])
    keys = np.array([int(key64(key, _PERM, r)[0]) for r in range(ROUNDS)], dtype=np.uint64)
    keys.setflags(write=False)
    return keys


def permute(seed: int, epoch: int, n: int, positions: np.ndarray) -> np.ndarray:
    """Element ``positions`` of the (seed, epoch) permutation of ``range(n)``."""
    if n <= 0:
        raise ValueError("n must be positive")
    x = np.asarray(positions, dtype=np.uint64)
    if n == 1:
        return np.zeros(len(x), dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, epoch)
    nn = np.uint64(n)
    todo = np.ones(len(x), dtype=bool)
    out = x.copy()
    while todo.any():  # cycle walking: at most a few rounds, since 2**bits < 4n
        v = out[todo]
        left, right = v >> half, v & mask
        for k in keys:
            f = fmix64(right ^ k) & mask
            left, right = right, left ^ f
        v = (left << half) | right
        out[todo] = v
        todo = out >= nn
    return out.astype(np.int64)


# Evaluating the network costs mostly per numpy call, not per element, and cycle walking runs as many
# passes as the slowest element needs: a block of BLOCK positions costs about what one batch does. So an
# epoch's order is evaluated a block at a time and the last BLOCKS_CACHED blocks are kept (8 bytes a
# position: 8 MiB in all), and consecutive batches of a job slice one block.
BLOCK = 4096
BLOCKS_CACHED = 256


@lru_cache(maxsize=BLOCKS_CACHED)
def _block(seed: int, epoch: int, n: int, block: int) -> np.ndarray:
    start = block * BLOCK
    out = permute(seed, epoch, n, np.arange(start, min(start + BLOCK, n), dtype=np.int64))
    out.setflags(write=False)
    return out


def batch_ids(seed: int, epoch: int, n: int, batch_size: int, index: int, shuffle: bool) -> np.ndarray:
    """Sequence ids of batch ``index`` of an epoch (the last batch may be short)."""
    start = index * batch_size
    stop = min(start + batch_size, n)
    if not shuffle:
        return np.arange(start, stop, dtype=np.int64)
    return epoch_slice(seed, epoch, n, start, stop)


def stream_ids(seed: int, index: int, batch_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ids and epochs of batch ``index`` of a stateless stream.

    The stream is the concatenation of epochs 0, 1, ... of the (seed, e)
    permutations, the same per-epoch order jobs use, cut into batches of
    ``batch_size``: batch k holds stream positions kB .. kB+B-1, so every
    sequence appears exactly once per epoch. A batch that straddles an epoch
    boundary takes the tail of one permutation and the head of the next; each
    row carries its own epoch (returned alongside the ids).
    """
    if n <= 0:
        raise ValueError("n must be positive")
    start = index * batch_size
    first_epoch, last_epoch = start // n, (start + batch_size - 1) // n
    if first_epoch == last_epoch:  # the common case: one epoch
        at = start - first_epoch * n
        return epoch_slice(seed, first_epoch, n, at, at + batch_size), np.full(batch_size, first_epoch, dtype=np.int64)
    positions = start + np.arange(batch_size, dtype=np.int64)
    epochs = positions // n
    ids = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        first = int(positions[rows][0] - epoch * n)
        ids[rows] = epoch_slice(seed, int(epoch), n, first, first + int(rows.sum()))
    return ids, epochs


def epoch_slice(seed: int, epoch: int, n: int, start: int, stop: int) -> np.ndarray:
    """Elements ``start .. stop-1`` of the (seed, epoch) permutation, through the block cache."""
    first, last = start // BLOCK, max(start, stop - 1) // BLOCK
    if last - first > 1:  # a slice wider than a block: evaluate it directly
        return permute(seed, epoch, n, np.arange(start, stop, dtype=np.int64))
    blocks = [_block(seed, epoch, n, k) for k in range(first, last + 1)]
    joined = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return joined[start - first * BLOCK : stop - first * BLOCK].copy()
