"""What every part of the store shares: the meta codec, the tokenizer codec, the exceptions, a chunk reference."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from .jobkeys import JobKeys
from .keys import Keys


@dataclass(frozen=True)
class ChunkRef:
    """What the store needs to find one dataset generation's chunks: the dataset's name, the generation's
    uid, its number of chunk groups and the chunk id at each position of its chunk table."""

    name: str
    uid: str
    groups: int
    ids: np.ndarray

INT_FIELDS = ("seq_len", "vocab_size", "num_sequences", "num_tokens", "num_documents", "num_chunks", "bytes",
              "generation", "built", "copies", "seed", "chunk_groups")  # fmt: skip

JSON_FIELDS = ("special_tokens", "all_special_ids", "masking")

def pack_tokenizer(tokenizer_json: str) -> bytes:
    """How a tokenizer.json is stored: zlib-compressed UTF-8."""
    return zlib.compress(tokenizer_json.encode(), 6)

def unpack_tokenizer(blob: bytes) -> str:
    return zlib.decompress(blob).decode()

def pairs(mapping: dict[str, Any]) -> list[Any]:
    """``{f: v, ...}`` -> ``[f, v, ...]``, the argument shape of HSET in the scripts."""
    return [x for kv in mapping.items() for x in kv]

def decode_meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }
    for f in INT_FIELDS:
        if f in meta:
            meta[f] = int(meta[f])
    for f in JSON_FIELDS:
        if f in meta:
            meta[f] = json.loads(meta[f])
    return meta

def _u64(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u8").astype(np.int64)

@dataclass(frozen=True)
class Staged:
    """A chunk an ingest staged: its id and key."""

    id: int
    key: str

def _counters(reply: Any) -> tuple[str, int, int] | None:
    """(uid, num_sequences, num_chunks) from an HMGET of a dataset's meta (None: no such dataset), or None for
    an error in its place."""
    if isinstance(reply, Exception) or reply[0] is None:
        return None
    uid, nseq, nchunks = reply
    return uid.decode(), int(nseq), int(nchunks)

class CachesFull(Exception):
    """A dataset holds as many static-mask caches as allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the dataset already has {limit} static-mask caches")
        self.limit = limit

class ChunkIdTaken(Exception):
    """Every id a chunk tried was in use already (ingests drew the same nonces): the ingest is retried."""

class StaleCounters(Exception):
    """The dataset's counters moved on since the batch was drawn (``current``: as they are now, None when gone)."""

    def __init__(self, current: tuple[str, int, int] | None) -> None:
        super().__init__("dataset counters changed")
        self.current = current


class StoreBase:
    """The client, the key builders and the settings every part of the store works with; its subclasses
    register their scripts in ``_register`` (each Lua script is registered once, by the part that owns it)."""

    r: aioredis.Redis
    reader: aioredis.Redis
    keys: Keys
    job_keys: JobKeys
    cluster: bool
    chunk_groups: int
    replica_reads: bool
    idempotency_ttl_ms: int
