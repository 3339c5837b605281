"""The process's cache of sequence records and static-mask records, least recently used first out, by bytes.

A chunk never changes once committed, and neither do the static masks stored
beside it; a re-created dataset is a new generation with a new uid. So a
record is kept under ``(uid, kind, chunk id << 64 | offset << 32 | count)`` (``kind``: ""
for a sequence's whole record, ids then word-start bits; a static-mask cache
id for one copy's mask record) and can never be the bytes of another
generation or cache. What can change (a dataset's counters, whether the
generation or a mask cache still exists) is never cached here: the store
checks it in Redis for every batch (``ChunkReads``).

Filled for free from the replies of batch reads (nothing is read to fill it).
Bounded by ``max_bytes``: each entry counts its bytes plus ``ENTRY_OVERHEAD``
for the key, the dictionary slot and the bytes object's header, so the bound
holds for short records too. ``max_bytes`` 0 turns it off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

#: bytes counted per entry besides its record: the key tuple and its int, the ordered dict's slot and links,
#: the bytes object's header (about 250 measured with tracemalloc on CPython 3.11)
ENTRY_OVERHEAD = 256

RowKey = tuple[str, str, int]


def ignore(hits: int, misses: int, size: int) -> None:
    """The default observer of lookups (the app sets its metrics)."""


class RowCache:
    """Records by key, at most ``max_bytes`` in all (entries and their overhead); safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[RowKey, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.observe: Callable[[int, int, int], None] = ignore  # (hits, misses, bytes now) after each lookup

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def get_many(self, keys: Sequence[RowKey]) -> list[bytes | None]:
        """The records of ``keys`` (None where not cached); the found ones become the most recently used."""
        items = self._items
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                value = items.get(key)
                if value is not None:
                    items.move_to_end(key)
                out.append(value)
            found = len(out) - out.count(None)
            self.hits += found
            self.misses += len(out) - found
            size = self.bytes
        self.observe(found, len(out) - found, size)
        return out

    def put_many(self, keys: Sequence[RowKey], values: Sequence[bytes]) -> None:
        """Keep ``values`` under ``keys``, dropping the least recently used past the bound. A record larger than
        the whole bound is not kept."""
        items = self._items
        with self._lock:
            for key, value in zip(keys, values):
                cost = len(value) + ENTRY_OVERHEAD
                if cost > self.max_bytes or key in items:
                    continue
                items[key] = value
                self.bytes += cost
            while self.bytes > self.max_bytes and items:
                _, old = items.popitem(last=False)
                self.bytes -= len(old) + ENTRY_OVERHEAD

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
