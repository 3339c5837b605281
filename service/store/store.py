"""Every Lua script of the datasets, and the async access to their keys (the layout is in keys.py).

Every script takes all of its keys in ``KEYS`` and touches one slot, so the
same scripts run on one server and on Redis Cluster. What spans slots (chunks
spread over chunk groups, a dataset's jobs) is done in steps ordered so that
no reader ever sees a partial state:

* **Ingest.** Each chunk gets an id from the dataset's slot (``RESERVE_CHUNK``,
  which records it in the staging set with a deadline) and is written to its
  group's slot with a TTL. At the end the request removes the TTLs and then
  commits in the dataset's slot (``COMMIT_INGEST``): only the chunk tables make
  chunks visible, so a request that fails, or a process that dies, leaves
  nothing visible; its staged chunks expire, and a later commit or delete
  unlinks any that were already made permanent (their deadline passed while
  they were still in the staging set).
* **Delete.** ``RETIRE_DATASET`` removes every key of the dataset's slot at
  once (the dataset is gone for every reader) and leaves a trash record of what
  lies in other slots (chunks, static masks, staged chunks, jobs); then those are
  unlinked, node by node, and the record dropped. A delete or create of the same
  name finishes any trash an interrupted delete left behind.
* **Batches.** Sequences (and static masks) a process read once are kept in
  its row cache (``rowcache``), keyed by generation uid; a batch reads from
  Redis only the rows it lacks, plus what can change (the counters or the
  generation's uid, and the mask cache's existence) in one small round trip.
  On one server the rows it lacks come from one script. On a cluster they are
  grouped by chunk group (one slot each) and sent as one pipeline per node,
  all nodes at once: one round trip per node.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from .base import (
    INT_FIELDS, JSON_FIELDS, CachesFull, ChunkIdTaken, ChunkRef, Staged, StaleCounters, StoreBase, decode_meta,
    pack_tokenizer, pairs, unpack_tokenizer,
)  # fmt: skip
from .chunks import ChunkReads
from .datasets import DatasetKeys
from .jobkeys import JobKeys
from .keys import Keys
from .masks import MaskCaches
from .rowcache import RowCache
from .staging import IngestStaging
from .trash import Trash

__all__ = [
    "CachesFull", "ChunkIdTaken", "ChunkRef", "INT_FIELDS", "JSON_FIELDS", "Keys", "Staged", "StaleCounters",
    "Store", "decode_meta", "pack_tokenizer", "pairs", "unpack_tokenizer",
]


class Store(DatasetKeys, IngestStaging, ChunkReads, MaskCaches, Trash):
    """Async access to the dataset keys; one per app, sharing one client (a pool, or a cluster client).

    ``cluster``: the client is a ``RedisCluster``; batches fan out per node (see the module docstring).
    ``chunk_groups``: G of datasets created from now on. ``reader``: on a cluster, a client that reads
    from replicas, used for chunk reads only (chunks are immutable; everything else goes to masters).
    ``idempotency_ttl_s``: how long an ingest's idempotency key is remembered. ``chunk_cache_bytes``: the bound
    of the process's cache of sequence and static-mask records (``rowcache``; 0: none)."""

    def __init__(
        self, r: aioredis.Redis, prefix: str, *, cluster: bool = False, chunk_groups: int = 64,
        reader: aioredis.Redis | None = None, idempotency_ttl_s: int = 7 * 86400, chunk_cache_bytes: int = 0,
    ) -> None:  # fmt: skip
        self.r = r
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.reader = reader or r
        self.keys = Keys(prefix)
        self.job_keys = JobKeys(prefix)
        self.cluster = cluster
        self.chunk_groups = chunk_groups
        self.replica_reads = reader is not None
        self.row_cache = RowCache(chunk_cache_bytes)
        self._register_datasets(r)
        self._register_staging(r)
        self._register_chunks(r)
        self._register_masks(r)
        self._register_trash(r)
