"""The process's cache of sequence records and static-mask records, those unused for longest first out, by bytes.

A chunk never changes once committed, and neither do the static masks stored
beside it; a re-created dataset is a new generation with a new uid. So a
record is kept under its generation's uid, its kind ("" for a sequence's whole
record, ids then word-start bits; a static-mask cache id for one copy's mask
record), its chunk id, offset and count, and can never be the bytes of another
generation or cache. The key is one short integer that holds all five
exactly (:func:`record_keys`; the uid and kind as a number the process draws
for the pair): a batch looks up a key per row, and such a key is looked up in
about 60% of the time a tuple of strings and integers takes.
What can change (a dataset's counters, whether the generation or a mask cache
still exists) is never cached here: the store checks it in Redis for every
batch (``ChunkReads``).

Filled for free from the replies of batch reads (nothing is read to fill it).
Bounded by ``max_bytes``: each entry counts its bytes plus ``ENTRY_OVERHEAD``
for the key, the dictionary slot and the bytes object's header, so the bound
holds for short records too. ``max_bytes`` 0 turns it off.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence

#: bytes counted per entry besides its record: the key tuple and its int, the ordered dict's slot and links,
#: the bytes object's header (about 250 measured with tracemalloc on CPython 3.11)
ENTRY_OVERHEAD = 256

RowKey = int


_numbers = itertools.count(1)


@functools.lru_cache(maxsize=4096)
def _prefix(uid: str, kind: str) -> int:
    """A number of the process's own for the pair ``(uid, kind)``, shifted past a record's place: drawn from a
    counter, so never another pair's. A pair forgotten here (past 4096 of them) gets a new number when met
    again, and the records kept under its old one are merely not found (they age out)."""
    return next(_numbers) << 128


def record_keys(uid: str, kind: str, chunk_ids: Sequence[int], places: Sequence[int]) -> list[RowKey]:
    """The keys of records ``places[i]`` (``offset << 32 | count``) of chunks ``chunk_ids[i]`` (below 2^64) of
    generation ``uid``, of ``kind``: ``prefix | chunk id << 64 | place``, exact."""
    prefix = _prefix(uid, kind)
    return [prefix | c << 64 | e for c, e in zip(chunk_ids, places)]


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

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get_many(self, keys: Sequence[RowKey]) -> list[bytes | None]:
        """The records of ``keys`` (None where not cached); those found in the old generation move to the young."""
        with self._lock:
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

    def put_many(self, keys: Sequence[RowKey], values: Sequence[bytes]) -> None:
        """Keep ``values`` under ``keys`` in the young generation, first making room from the old one (in any
        order: none of it was used since the last turnover); when the old is empty, a turnover. A record larger
        than the whole bound is not kept."""
        with self._lock:
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
