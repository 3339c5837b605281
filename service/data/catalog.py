"""Per-process cache of what never changes about a dataset.

A dataset's config, tokenizer and vocabulary are fixed at creation, and its
chunk table only grows; both are cached here keyed by the dataset's ``uid``
(a re-created dataset of the same name gets a new uid, so stale entries are
never used). The counters that do change are read from Redis on every request,
so replicas stay stateless.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from ..core.errors import Conflict, DatasetNotFound, DatasetReplaced
from ..core.work import ignore_stage
from ..masking.masking import Vocab
from ..store.store import ChunkRef, Store
from .tokenization import TokenizerInfo, describe, load_tokenizer


@dataclass
class DatasetRuntime:
    name: str
    uid: str
    meta: dict[str, Any]
    vocab: Vocab
    id_dtype: np.dtype
    chunk_starts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    chunk_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # per table position
    tokenizer: TokenizerInfo | None = None
    weighted: Vocab | None = None  # the vocab with the frozen token counts
    # (num_sequences, num_chunks) as last read: the batch route draws from these optimistically
    # and its fetch checks them (batching.draw_with_retry)
    seen: tuple[int, int] | None = None
    # one tokenizer load at a time per generation (it lives and goes with the cached entry)
    loading: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def chunk_ref(self) -> ChunkRef:
        """This generation's chunks, as the store finds them."""
        return ChunkRef(self.name, self.uid, int(self.meta["chunk_groups"]), self.chunk_ids)

    def locate(self, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ids -> (chunk index, index inside the chunk)."""
        chunk = np.searchsorted(self.chunk_starts, seq_ids, side="right") - 1
        return chunk, seq_ids - self.chunk_starts[chunk]


@dataclass(frozen=True)
class Chunks:
    """The distinct chunks a batch reads (sorted) and, per sequence, which of them holds it."""

    ids: np.ndarray
    which: np.ndarray

    @classmethod
    def of(cls, chunk: np.ndarray) -> "Chunks":
        ordered = np.sort(chunk)
        ids = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered
        return cls(ids, np.searchsorted(ids, chunk))


_GROUPED_UP_TO = 16


class TableCache:
    """LRU, by bytes, of chunk tables: immutable once written, so safe to keep."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> np.ndarray | None:
        table = self._items.get(key)
        if table is not None:
            self._items.move_to_end(key)
        return table

    def drop(self, uid: str, kind: str) -> None:
        for key in [k for k in self._items if k[0] == uid and k[1] == kind]:
            self.bytes -= self._items.pop(key).nbytes

    def put(self, key: tuple[str, str, int], table: np.ndarray) -> None:
        if key in self._items:
            return
        self._items[key] = table
        self.bytes += table.nbytes
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes


class Catalog:
    """The runtimes of at most ``max_entries`` datasets (the least recently used goes first), and an LRU of
    their chunk tables by bytes."""

    def __init__(self, store: Store, max_entries: int = 256, table_cache_bytes: int = 256 << 20) -> None:
        self.store = store
        self.max_entries = max_entries
        self._cache: OrderedDict[str, DatasetRuntime] = OrderedDict()  # least recently used first
        self.table_cache = TableCache(table_cache_bytes)
        self.observe: Callable[[str, float], None] = ignore_stage  # batch stages (the app's metrics)

    async def entries(
        self, rt: DatasetRuntime, chunks: Chunks, index: np.ndarray, num_sequences: int,
        mask_cache: str | None = None, copies: int = 1,
    ) -> np.ndarray | None:  # fmt: skip
        """(offset, n) of each sequence in its data chunk, or of each ``index`` entry in its
        static-mask chunk when ``mask_cache`` is given; None when a mask chunk is not built."""
        kind = mask_cache or "data"
        tables: list[np.ndarray | None] = [self.table_cache.get((rt.uid, kind, k)) for k in chunks.ids.tolist()]
        missing = [i for i, t in enumerate(tables) if t is None]
        if missing:
            starts = rt.chunk_starts
            ks = [int(chunks.ids[i]) for i in missing]
            counts = [(int(starts[k + 1]) if k + 1 < len(starts) else num_sequences) - int(starts[k]) for k in ks]
            keys = self.store.chunk_keys(rt.chunk_ref, ks, mask_cache)
            if mask_cache is not None:
                counts = [c * copies for c in counts]
            for i, k, t in zip(missing, ks, await self.store.tables(keys, counts)):
                if t is None:
                    if mask_cache is not None:
                        return None
                    raise Conflict(f"dataset {rt.name!r} changed while the batch was read; retry")
                self.table_cache.put((rt.uid, kind, k), t)
                tables[i] = t
        try:
            if len(tables) == 1:
                return tables[0][index].astype(np.int64)
            if len(tables) <= _GROUPED_UP_TO:  # a few chunks: one gather per chunk
                out = np.empty((len(index), 2), dtype=np.int64)
                for i, t in enumerate(tables):
                    rows = chunks.which == i
                    out[rows] = t[index[rows]]
                return out
            # a batch spread over many chunks (a large dataset): one lookup per row beats one pass per chunk
            return np.array([tables[w][i] for w, i in zip(chunks.which.tolist(), index.tolist())], dtype=np.int64)
        except IndexError:  # sequences past a table's end: the caller's counters are not this dataset's
            self.table_cache.drop(rt.uid, kind)
            raise Conflict(f"dataset {rt.name!r} changed while the batch was read; retry") from None

    async def runtime(self, name: str, uid: str | None = None) -> DatasetRuntime:
        """The cached runtime for ``name``; with ``uid``, of that generation only (reloaded when the cached one
        is another): :class:`DatasetReplaced` when the name now holds another."""
        rt = self._cache.get(name)
        if rt is not None and (uid is None or rt.uid == uid):
            self._cache.move_to_end(name)
            return rt
        meta = await self.store.meta(name)
        if meta is None:
            raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
        rt = self._load(name, meta)
        if uid is not None and rt.uid != uid:
            raise DatasetReplaced(f"dataset {name!r} was deleted and created again while it was read; retry",
                                  dataset=name)  # fmt: skip
        return rt

    async def holds(self, name: str, uid: str) -> bool:
        """Whether generation ``uid`` is the one of ``name`` now (read from Redis)."""
        counters = await self.store.counters(name)
        return counters is not None and counters[0] == uid

    def _load(self, name: str, meta: dict[str, Any]) -> DatasetRuntime:
        """A runtime for ``meta`` (the name's current generation), cached."""
        if "chunk_groups" not in meta:  # written before chunks were spread over groups
            raise Conflict(
                f"dataset {name!r} was stored by an earlier version, whose key layout this one does not read: "
                f"delete it and ingest it again", dataset=name,
            )  # fmt: skip
        special = meta["special_tokens"]
        vocab = Vocab.build(meta["vocab_size"], meta["all_special_ids"], special["mask"], special["pad"])
        rt = DatasetRuntime(name=name, uid=meta["uid"], meta=meta, vocab=vocab, id_dtype=np.dtype(meta["id_dtype"]))
        self._cache.pop(name, None)
        while len(self._cache) >= self.max_entries:
            self._cache.popitem(last=False)
        self._cache[name] = rt
        return rt

    def cached(self) -> list[str]:
        """The names of the cached datasets, least recently used first."""
        return list(self._cache)

    async def current(self, name: str) -> DatasetRuntime:
        """The runtime of the dataset that exists now (checked against Redis)."""
        counters = await self.store.counters(name)
        if counters is None:
            raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
        return await self.runtime(name, counters[0])

    async def with_chunks(self, rt: DatasetRuntime, num_chunks: int) -> DatasetRuntime:
        """Extend the cached chunk tables to ``num_chunks`` entries."""
        have = len(rt.chunk_starts)
        if have < num_chunks:
            starts, ids = await self.store.chunk_table(rt.name, have, num_chunks)
            if len(starts) != num_chunks - have or len(ids) != len(starts):
                raise Conflict(f"dataset {rt.name!r} changed while the batch was read; retry")
            if len(rt.chunk_starts) == have:  # another request may have extended it meanwhile
                rt.chunk_ids = np.concatenate([rt.chunk_ids, ids])
                rt.chunk_starts = np.concatenate([rt.chunk_starts, starts])
        return rt

    async def weighted_vocab(self, rt: DatasetRuntime) -> Vocab:
        """The vocab with the dataset's frozen token counts (for frequency-weighted replacements)."""
        if rt.weighted is None:
            counts = await self.store.token_counts(rt.name, rt.vocab.is_special.shape[0])
            v = rt.vocab
            rt.weighted = Vocab(mask_id=v.mask_id, pad_id=v.pad_id, is_special=v.is_special, counts=counts)
        return rt.weighted

    async def tokenizer(self, rt: DatasetRuntime) -> TokenizerInfo:
        if rt.tokenizer is None:
            async with rt.loading:
                if rt.tokenizer is None:
                    raw = await self.store.tokenizer_json(rt.name)
                    if raw is None:
                        raise DatasetNotFound(f"no dataset named {rt.name!r}", dataset=rt.name)
                    tok = await anyio.to_thread.run_sync(load_tokenizer, raw)
                    rt.tokenizer = describe(tok, rt.meta["special_tokens"])
        return rt.tokenizer

    def known(self, name: str) -> tuple[str, int, int] | None:
        """(uid, num_sequences, num_chunks) as last read for the cached runtime of ``name``."""
        rt = self._cache.get(name)
        return None if rt is None or rt.seen is None else (rt.uid, *rt.seen)

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
