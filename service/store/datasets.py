"""A dataset's meta, counters, tokenizer and token frequencies, in the dataset's own slot."""

from __future__ import annotations

import json
from typing import Any

import anyio
import numpy as np
import redis.asyncio as aioredis

from .base import JSON_FIELDS, StoreBase, _counters, decode_meta, pairs, unpack_tokenizer


# KEYS[1]: meta, KEYS[2]: tokenizer
# ARGV[1]: tokenizer.json, ARGV[2..]: meta field/value pairs
# returns 1 when created, 0 when a dataset of that name exists
CREATE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1]: live frequency table, KEYS[2]: frozen copy
# Frequency-weighted replacements draw from a table frozen at first use, so that a mask
# stays a pure function of (seed, epoch, sequence, config) when more documents arrive.
# returns the frozen table
FREEZE_FREQUENCIES = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], redis.call('GET', KEYS[1]) or '')
end
return redis.call('GET', KEYS[2])
"""


class DatasetKeys(StoreBase):
    """Create and read datasets."""

    def _register_datasets(self, r: aioredis.Redis) -> None:
        self._create = r.register_script(CREATE_DATASET)
        self._freeze = r.register_script(FREEZE_FREQUENCIES)

    async def create_dataset(self, name: str, meta: dict[str, Any], tokenizer_blob: bytes) -> bool:
        """``tokenizer_blob``: :func:`pack_tokenizer` of the tokenizer.json (made off the event loop)."""
        await self.empty_trash(name)
        meta = {**meta, "chunk_groups": self.chunk_groups}
        fields = pairs({f: json.dumps(v) if f in JSON_FIELDS else v for f, v in meta.items()})
        k = self.keys
        # The index of names lies in another slot, so it is kept by order, not atomically: the name is added
        # before the meta (a listed name without meta is skipped, never the reverse) and again after it (a
        # delete of the previous generation, racing, may have removed it in between; see delete_dataset).
        await self.r.sadd(k.index, name)
        created = await self._create(keys=[k.ds(name, "meta"), k.ds(name, "tokenizer")], args=[tokenizer_blob, *fields])
        if created:
            await self.r.sadd(k.index, name)
        return bool(created)

    async def list_names(self) -> list[str]:
        return sorted(n.decode() for n in await self.r.smembers(self.keys.index))

    async def meta(self, name: str) -> dict[str, Any] | None:
        raw = await self.r.hgetall(self.keys.ds(name, "meta"))
        return decode_meta(raw) if raw else None

    async def counters(self, name: str) -> tuple[str, int, int] | None:
        """(uid, num_sequences, num_chunks): the per-request read of the batch path."""
        return _counters(await self.r.hmget(self.keys.ds(name, "meta"), "uid", "num_sequences", "num_chunks"))

    async def tokenizer_json(self, name: str) -> str | None:
        raw = await self.r.get(self.keys.ds(name, "tokenizer"))
        if raw is None:
            return None
        return await anyio.to_thread.run_sync(unpack_tokenizer, raw)  # up to tens of MB: not on the event loop

    async def token_counts(self, name: str, vocab_size: int) -> np.ndarray:
        """The frozen frequency table (taken from the live counts at first use, then fixed)."""
        k = self.keys
        raw = await self._freeze(keys=[k.ds(name, "freq"), k.ds(name, "freq:frozen")])
        counts = np.zeros(vocab_size, dtype=np.int64)
        table = np.frombuffer(raw or b"", dtype=">u4", count=min(vocab_size, len(raw or b"") // 4))
        counts[: len(table)] = table
        return counts
