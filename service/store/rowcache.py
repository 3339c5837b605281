"""The process's cache of sequence records and static-mask records, those unused for longest first out, by bytes.

A chunk never changes once committed, and neither do the static masks stored
beside it; a re-created dataset is a new generation with a new uid, and a
generation's chunk table only grows (position k is always the same chunk). So
a record is kept under its generation's uid, its kind ("" for a sequence's
whole record, ids then word-start bits; a static-mask cache id for one copy's
mask record), its chunk's table position and its offset in the chunk, and can
never be the bytes of another generation or cache. The key is one integer
that holds all of these exactly (:meth:`RowCache.keys`): the uid and kind as a
small number the cache draws for the pair, then the position, the offset, and
whether the record is empty (an empty record shares its offset with the next
one). It is computed for a whole batch at once with numpy and fits 63 bits, so
a batch builds its keys in one pass and looks up small integers, about half
the time of a lookup of wider keys in a cache of 100k records (measured).
What can change (a dataset's counters, whether the generation or a mask cache
still exists) is never cached here: the store checks it in Redis for every
batch (``ChunkReads``).

Filled for free from the replies of batch reads (nothing is read to fill it).
Bounded by ``max_bytes``: each entry counts its bytes plus ``ENTRY_OVERHEAD``
for the key, the dictionary slot and the bytes object's header, so the bound
holds for short records too. ``max_bytes`` 0 turns it off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

#: bytes counted per entry besides its record: the key's int, the dict's slot, the bytes object's header
#: (about 250 measured with tracemalloc on CPython 3.11)
ENTRY_OVERHEAD = 256

RowKey = int

# A key: pair number (PAIR_BITS) | chunk table position (POSITION_BITS) | offset in the chunk (OFFSET_BITS) |
# 1 if the record is not empty. A Redis string is at most 512 MiB, so every offset fits; a record at a position
# past the field (over two million chunks, terabytes of one dataset) is keyed past 2^96 instead, as exactly.
PAIR_BITS, POSITION_BITS, OFFSET_BITS = 12, 21, 29


def ignore(hits: int, misses: int, size: int) -> None:
    """The default observer of lookups (the app sets its metrics)."""


class RowCache:
    """Records by key, at most ``max_bytes`` in all (entries and their overhead); safe to share between threads.

    Two generations, each a plain dict: ``young`` holds the records stored or found since the last turnover,
    ``old`` the rest. A record found in ``old`` moves to ``young``; room is made by dropping ``old`` records,
    and once ``old`` is empty ``young`` becomes ``old``. So the records not used for longest go first, as in
    a least-recently-used cache, but a hit in ``young`` (every hit of a warm working set) is one dictionary
    lookup: exact recency order costs a relinking per hit (about three times the lookup, measured on a batch's
    512 lookups in a cache of 80k records), paid for every row of every batch.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # both generations
        self.hits = 0
        self.misses = 0
        self._young: dict[RowKey, bytes] = {}
        self._old: dict[RowKey, bytes] = {}
        self._lock = threading.Lock()
        self.observe: Callable[[int, int, int], None] = ignore  # (hits, misses, bytes now) after each lookup
        self._pairs: dict[tuple[str, str], int] = {}  # (uid, kind) -> its number in keys
        self.max_pairs = (1 << PAIR_BITS) - 1
        # bumped when the pair numbers run out and are drawn afresh (the cache emptied then): keys of an older
        # numbering find nothing and store nothing, so a number drawn again never meets another pair's records
        self.numbering = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def keys(self, parts: Sequence[tuple[str, str, np.ndarray, np.ndarray]]) -> tuple[list[RowKey], int]:
        """The keys of records, part after part: ``(uid, kind, chunk table position per record, (offset, count)
        entry per record)``; and the numbering they belong to, for :meth:`get_many` and :meth:`put_many`."""
        with self._lock:
            for _ in range(2):  # the numbers of every part from one numbering (a second pass follows a renumbering)
                numbering = self.numbering
                numbers = [self._number(uid, kind) for uid, kind, _, _ in parts]
                if self.numbering == numbering:
                    break
            else:
                raise ValueError(f"one read of more than {self.max_pairs} kinds of records")
        out: list[RowKey] = []
        for number, (_, _, positions, entries) in zip(numbers, parts):
            out += _keys(number, positions, entries)
        return out, numbering

    def _number(self, uid: str, kind: str) -> int:
        """The number of ``(uid, kind)`` in keys (under the lock); when they run out, the cache starts over."""
        number = self._pairs.get((uid, kind))
        if number is None:
            if len(self._pairs) >= self.max_pairs:
                self._young, self._old, self.bytes = {}, {}, 0
                self._pairs.clear()
                self.numbering += 1
            number = self._pairs[(uid, kind)] = len(self._pairs) + 1
        return number

    def get_many(self, keys: Sequence[RowKey], numbering: int) -> list[bytes | None]:
        """The records of ``keys`` (of ``numbering``; None where not cached); those found in the old generation
        move to the young."""
        with self._lock:
            if numbering != self.numbering:  # neither generation may be searched: its numbers mean other pairs now
                out: list[bytes | None] = [None] * len(keys)
            else:
                out = list(map(self._young.get, keys))
                if self._old and None in out:
                    young, old = self._young, self._old
                    for i, key in enumerate(keys):
                        if out[i] is None and (value := old.pop(key, None)) is not None:
                            young[key] = out[i] = value
            missing = out.count(None)
            self.hits += len(out) - missing
            self.misses += missing
            size = self.bytes
        self.observe(len(out) - missing, missing, size)
        return out

    def put_many(self, keys: Sequence[RowKey], values: Sequence[bytes], numbering: int) -> None:
        """Keep ``values`` under ``keys`` (of ``numbering``) in the young generation, first making room from the
        old one (in any order: none of it was used since the last turnover); when the old is empty, a turnover.
        A record larger than the whole bound is not kept."""
        with self._lock:
            if numbering != self.numbering:
                return
            fresh: dict[RowKey, bytes] = {}
            for key, value in zip(keys, values):
                if len(value) + ENTRY_OVERHEAD <= self.max_bytes and key not in self._young and key not in self._old:
                    fresh[key] = value
            need = sum(len(v) for v in fresh.values()) + ENTRY_OVERHEAD * len(fresh)
            while self.bytes + need > self.max_bytes and self.bytes:
                if not self._old:  # a turnover: what was used since the last one is now the old generation
                    self._old, self._young = self._young, {}
                _, old = self._old.popitem()
                self.bytes -= len(old) + ENTRY_OVERHEAD
            young = self._young
            for key, value in fresh.items():
                cost = len(value) + ENTRY_OVERHEAD
                if self.bytes + cost > self.max_bytes:  # more records than the whole bound: the rest are not kept
                    break
                young[key] = value
                self.bytes += cost

    def clear(self) -> None:
        with self._lock:
            self._young, self._old = {}, {}
            self.bytes = 0


def _keys(number: int, positions: np.ndarray, entries: np.ndarray) -> list[RowKey]:
    """The keys of pair ``number``'s records at chunk table ``positions``, ``entries`` ((offset, count) each)."""
    if not len(positions):
        return []
    positions = np.asarray(positions, dtype=np.int64)
    offsets = entries[:, 0].astype(np.int64)
    filled = entries[:, 1] != 0
    packed = (positions < 1 << POSITION_BITS) & (offsets < 1 << OFFSET_BITS)
    low = (positions << (OFFSET_BITS + 1)) | (offsets << 1) | filled
    keys: list[RowKey] = (low | (number << (POSITION_BITS + OFFSET_BITS + 1))).tolist()
    if not packed.all():  # a record past the packed fields: its own wide key (the same in any batch)
        high = number << 64  # pair number >= 1: every such key is past 2^96
        for i in np.flatnonzero(~packed).tolist():
            keys[i] = (high | int(positions[i])) << 33 | int(offsets[i]) << 1 | bool(filled[i])
    return keys
