"""Static masks: K masks per sequence, computed once and cached in Redis.

Copy c of sequence s is the dynamic mask of (seed, epoch=c, s), so a static
epoch e serves exactly what a dynamic epoch e mod K would, and the cache is a
materialization of a pure function (it can be rebuilt, or checked, at will).
A cache stores, per data chunk, one blob::

    entries:u32 | entries x (offset:u32, m:u32) | records
    entry i*K + c = copy c of the chunk's i-th sequence
    record = m pairs (position, id placed there), each of the dataset's id width

Positions and the ids placed there, not copies of the sequence: about
p * 2 * width bytes per token and copy. See docs/masking.md, "Static masks".
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

import numpy as np

from .masking import IGNORE_INDEX, Masked, MaskSpec, padded


def cache_id(spec: MaskSpec, seed: int, copies: int) -> str:
    raw = f"{spec.key()}:{seed}:{copies}".encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def pair_dtype(id_dtype: np.dtype) -> np.dtype:
    return np.dtype([("pos", id_dtype), ("id", id_dtype)])


def encode_chunk(copies: Iterable[Masked], id_dtype: np.dtype) -> bytes:
    """One blob from the K masked versions of a chunk's sequences.

    ``copies`` is consumed one at a time and each reduced to its selected
    positions at once, so memory holds one masked copy plus the K compact
    records, never K full copies."""
    rows, cols, vals, copy_of = [], [], [], []
    b = 0
    for c, m in enumerate(copies):
        b = m.selected.shape[0]
        r, col = np.nonzero(m.selected)
        rows.append(r.astype(np.int32))
        cols.append(col.astype(id_dtype))
        vals.append(m.input_ids[r, col].astype(id_dtype))
        copy_of.append(np.full(len(r), c, dtype=np.int32))
        del m
    k = len(rows)
    # counts[i, c]: selected tokens of sequence i in copy c
    counts = np.stack([np.bincount(r, minlength=b) for r in rows], axis=1)
    order_rows = np.concatenate(rows)
    order = np.lexsort((np.concatenate(copy_of), order_rows))  # by sequence, then copy; stable keeps positions sorted
    del order_rows, copy_of
    pairs = np.empty(int(counts.sum()), dtype=pair_dtype(id_dtype))
    pairs["pos"] = np.concatenate(cols)[order]
    pairs["id"] = np.concatenate(vals)[order]
    entries = b * k
    width = pair_dtype(id_dtype).itemsize
    table = np.empty((entries, 2), dtype="<u4")
    sizes = counts.reshape(-1)
    table[:, 1] = sizes
    table[:, 0] = 4 + 8 * entries + np.concatenate([[0], np.cumsum(sizes)[:-1]]) * width
    return struct.pack("<I", entries) + table.tobytes() + pairs.tobytes()


def apply(
    ids: np.ndarray, lengths: np.ndarray, counts: np.ndarray, records: bytes, id_dtype: np.dtype, pad_id: int,
    is_special: np.ndarray,
) -> Masked:  # fmt: skip
    """Rebuild a masked batch from the data and the cached mask records of its rows, joined."""
    b, n = ids.shape
    real = np.arange(n)[None, :] < lengths[:, None]
    input_ids = padded(ids, real, pad_id)
    if input_ids is ids:  # written below: never the caller's array
        input_ids = ids.copy()
    pairs = np.frombuffer(records, dtype=pair_dtype(id_dtype))
    rows = np.repeat(np.arange(b), counts)
    flat = rows * n + pairs["pos"].astype(np.int64)
    labels = np.full((b, n), IGNORE_INDEX, dtype=np.int32)
    labels.ravel()[flat] = input_ids.ravel()[flat]
    selected = np.zeros((b, n), dtype=bool)
    selected.ravel()[flat] = True
    input_ids.ravel()[flat] = pairs["id"]
    return Masked(input_ids, labels, real.astype(np.uint8), selected, is_special=is_special)
