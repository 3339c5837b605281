"""Ingest staging: chunk ids reserved in the dataset's slot, chunks written with a TTL, one commit."""

from __future__ import annotations

import json
import secrets
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from .base import ChunkIdTaken, Staged, StoreBase
from .keys import chunk_id_of
from .lua import NOW_MS


# KEYS[1]: meta, KEYS[2]: staging set
# ARGV[1]: dataset uid, ARGV[2]: chunk id, ARGV[3]: how long the chunk may stay staged (ms)
# returns the dataset's chunk groups, -1 when the dataset is gone or replaced, or -2 when another ingest staged
# that id (it drew the same nonce: its entry is left as it is)
RESERVE_CHUNK = NOW_MS + """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return -1 end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return -2 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'chunk_groups'))
"""

# KEYS[1]: meta, KEYS[2]: chunk table, KEYS[3]: chunk id table, KEYS[4]: the ingests hash of earlier versions
# (read only; it expires), KEYS[5]: staging set, KEYS[6]: frequency table, KEYS[7]: idempotency records,
# KEYS[8]: their deadlines
# ARGV[1]: dataset uid, ARGV[2]: idempotency key ('' for none), ARGV[3]: result JSON (without ids),
# ARGV[4]: how long a record is kept (ms), ARGV[5..8]: sequences, tokens, documents, bytes, ARGV[9]: number of
# staged chunks S, ARGV[10..9+S]: their chunk ids in order, ARGV[10+S..9+2S]: sequence count of each,
# ARGV[10+2S]: the chunk ids again as uint64 LE (ids pass 2^53: Lua's numbers could not hold them),
# ARGV[11+2S..]: token id, count pairs added to the frequency table (uint32 counters)
# returns {status, first_sequence_id or previous result, expired staged chunk ids...}: status 0 committed,
# 1 duplicate (the staged chunks stay staged: the caller drops them), -1 dataset gone or replaced,
# -2 a staged chunk is no longer staged (its deadline passed and another request swept it)
# The chunk ids after the first two fields were staged by other requests whose deadline passed: no longer
# staged, the caller unlinks their keys.
# Records past their deadline count as absent; each commit removes a few of them (more than it adds), and the
# two keys expire with their newest record, so a dataset keeps only the records of the last ARGV[4] ms.
COMMIT_INGEST = NOW_MS + """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return {-1, ''} end
local key, keep = ARGV[2], tonumber(ARGV[4])
if key ~= '' then
  local prev = redis.call('HGET', KEYS[7], key)
  if prev and tonumber(redis.call('ZSCORE', KEYS[8], key) or '0') > now then return {1, prev} end
  prev = redis.call('HGET', KEYS[4], key)
  if prev then return {1, prev} end
end
local staged = tonumber(ARGV[9])
local ids, counts = 10, 10 + staged
for i = ids, ids + staged - 1 do
  if not redis.call('ZSCORE', KEYS[5], ARGV[i]) then return {-2, ARGV[i]} end
end
local nchunks = tonumber(redis.call('HGET', KEYS[1], 'num_chunks'))
local first = tonumber(redis.call('HGET', KEYS[1], 'num_sequences'))
local nseq = first
for i = ids, ids + staged - 1 do
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('APPEND', KEYS[2], struct.pack('<I4I4', nseq % 4294967296, math.floor(nseq / 4294967296)))
  nchunks = nchunks + 1
  nseq = nseq + tonumber(ARGV[i + staged])
end
if staged > 0 then redis.call('APPEND', KEYS[3], ARGV[counts + staged]) end
local ops = {}
for a = counts + staged + 1, #ARGV, 2 do
  ops[#ops + 1] = 'INCRBY'; ops[#ops + 1] = 'u32'; ops[#ops + 1] = '#' .. ARGV[a]; ops[#ops + 1] = ARGV[a + 1]
  if #ops >= 2000 then redis.call('BITFIELD', KEYS[6], 'OVERFLOW', 'SAT', unpack(ops)); ops = {} end
end
if #ops > 0 then redis.call('BITFIELD', KEYS[6], 'OVERFLOW', 'SAT', unpack(ops)) end
redis.call('HSET', KEYS[1], 'num_chunks', nchunks)
redis.call('HINCRBY', KEYS[1], 'num_sequences', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'num_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'num_documents', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'generation', 1)
local result = cjson.decode(ARGV[3])
result['first_sequence_id'] = first
local encoded = cjson.encode(result)
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, 16)) do
  redis.call('HDEL', KEYS[7], old)
  redis.call('ZREM', KEYS[8], old)
end
if key ~= '' then
  redis.call('HSET', KEYS[7], key, encoded)
  redis.call('ZADD', KEYS[8], now + keep, key)
  redis.call('PEXPIRE', KEYS[7], keep)
  redis.call('PEXPIRE', KEYS[8], keep)
end
if redis.call('PTTL', KEYS[4]) == -1 then redis.call('PEXPIRE', KEYS[4], keep) end
local out = {0, encoded}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[5], id)
  out[#out + 1] = id
end
return out
"""

# KEYS[1]: idempotency records, KEYS[2]: their deadlines, KEYS[3]: the ingests hash of earlier versions
# ARGV[1]: idempotency key; returns the committed ingest's result JSON, or false
COMMITTED = NOW_MS + """
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if rec and tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0') > now then return rec end
return redis.call('HGET', KEYS[3], ARGV[1])
"""

_STAGE_TRIES = 4  # ids a chunk tries (each of a fresh 39-bit nonce) before its ingest fails


class IngestStaging(StoreBase):
    """Stage an ingest's chunks and commit them."""

    def _register_staging(self, r: aioredis.Redis) -> None:
        self._reserve = r.register_script(RESERVE_CHUNK)
        self._commit = r.register_script(COMMIT_INGEST)
        self._committed = r.register_script(COMMITTED)

    def new_ingest_id(self) -> int:
        """A random nonce: chunk j of the ingest gets id ``nonce << 24 | j`` (see keys.py), below 2^63."""
        return secrets.randbits(39)

    async def stage_chunk(self, name: str, uid: str, ingest: int, j: int, blob: bytes, ttl: int) -> Staged | None:
        """Record chunk j of an ingest as staged, and store it with a TTL (None: the dataset is gone).

        Nothing counts chunks in the dataset's slot: a request that fails leaves it as it was. When the id is
        another ingest's (the same nonce drawn, so staged by it or committed), the chunk gets the id of a fresh
        nonce, and the other ingest's entries are left alone; :class:`ChunkIdTaken` after ``_STAGE_TRIES``."""
        k = self.keys
        staging = k.ds(name, "staging")
        for _ in range(_STAGE_TRIES):
            chunk_id = chunk_id_of(ingest, j)
            groups = int(await self._reserve(keys=[k.ds(name, "meta"), staging], args=[uid, chunk_id, ttl * 1000]))
            if groups == -1:
                return None
            if groups >= 0:
                staged = Staged(chunk_id, k.chunk(uid, groups, chunk_id))
                if await self.r.set(staged.key, blob, ex=ttl, nx=True):
                    return staged
                await self.r.zrem(staging, chunk_id)  # this ingest's own entry: a committed chunk holds the id
            ingest = self.new_ingest_id()
        raise ChunkIdTaken(f"chunk {j} found its id taken {_STAGE_TRIES} times")

    async def report_ingest(self, ingest: str, record: dict[str, Any]) -> None:
        """Publish the progress of running ingest ``ingest`` (an id of its own, not a chunk nonce)."""
        await self.r.hset(self.keys.running_ingests, ingest, json.dumps(record))

    async def end_ingest(self, ingest: str) -> None:
        await self.r.hdel(self.keys.running_ingests, ingest)

    async def running_ingests(self, fresh_since: float) -> list[dict[str, Any]]:
        """The ingests running now, oldest first: those whose record was refreshed at or after ``fresh_since``
        (unix seconds). Older records are a dead process's, and are removed."""
        records = await self.r.hgetall(self.keys.running_ingests)
        running, stale = [], []
        for ingest, raw in records.items():
            record = json.loads(raw)
            if record.get("updated", 0) >= fresh_since:
                running.append(record)
            else:
                stale.append(ingest)
        if stale:
            await self.r.hdel(self.keys.running_ingests, *stale)
        return sorted(running, key=lambda r: r["started"])

    async def drop_staged(self, name: str, staged: list[Staged]) -> None:
        if staged:
            await self.unlink([s.key for s in staged])
            await self.r.zrem(self.keys.ds(name, "staging"), *(s.id for s in staged))

    async def committed(self, name: str, idem_key: str) -> str | None:
        """The stored result of the ingest committed under ``idem_key`` (within the records' lifetime), or None."""
        k = self.keys
        raw = await self._committed(keys=[k.ds(name, "idem"), k.ds(name, "idem:due"), k.ds(name, "ingests")],
                                    args=[idem_key])  # fmt: skip
        return raw.decode() if isinstance(raw, bytes) else raw

    async def save_pending(self, name: str, idem_key: str, record: dict[str, Any], ttl: int) -> None:
        """Keep what committing a staged ingest needs, for as long as its chunks stay staged."""
        await self.r.set(self.keys.ds(name, f"pending:{idem_key}"), json.dumps(record), ex=ttl)

    async def pending(self, name: str, idem_key: str) -> dict[str, Any] | None:
        raw = await self.r.get(self.keys.ds(name, f"pending:{idem_key}"))
        return None if raw is None else json.loads(raw)

    async def drop_pending(self, name: str, idem_key: str) -> None:
        await self.r.unlink(self.keys.ds(name, f"pending:{idem_key}"))

    async def commit_ingest(
        self, name: str, uid: str, idem_key: str, staged: list[Staged], chunk_counts: list[int],
        sequences: int, tokens: int, documents: int, nbytes: int, result: dict[str, Any],
        token_counts: np.ndarray, *, own_chunks: bool = True,
    ) -> tuple[int, str]:  # fmt: skip
        """Make the staged chunks permanent, then visible (one script in the dataset's slot).

        ``own_chunks``: the staged chunks are this call's alone, so a duplicate drops them; a commit of a
        pending (staged) ingest shares them with any other commit of the same key, and never drops them."""
        k = self.keys
        if staged:
            async with self.r.pipeline(transaction=False) as p:
                for s in staged:
                    p.persist(s.key)
                    p.exists(s.key)
                kept = await p.execute()
            for s, exists in zip(staged, kept[1::2]):
                if not exists:
                    return -2, s.key
        keys = [k.ds(name, "meta"), k.ds(name, "chunks"), k.ds(name, "chunk_ids"), k.ds(name, "ingests"),
                k.ds(name, "staging"), k.ds(name, "freq"), k.ds(name, "idem"), k.ds(name, "idem:due")]  # fmt: skip
        args = [uid, idem_key, json.dumps(result), self.idempotency_ttl_ms, sequences, tokens, documents, nbytes,
                len(staged),
                *(s.id for s in staged), *chunk_counts, np.array([s.id for s in staged], dtype="<u8").tobytes()]  # fmt: skip
        nz = np.flatnonzero(token_counts)
        counts = np.stack([nz, token_counts[nz]], axis=1).ravel().tolist()
        status, payload, *expired = await self._commit(keys=keys, args=[*args, *counts])
        if expired:  # chunks of requests that never committed in time: no longer staged, so unlinked
            groups = int(await self.r.hget(k.ds(name, "meta"), "chunk_groups") or self.chunk_groups)
            await self.unlink([k.chunk(uid, groups, int(i)) for i in expired])
        if int(status) == 1 and own_chunks:  # a repeat of a committed request: its own chunks were never needed
            await self.drop_staged(name, staged)
        if int(status) == 0:
            await self.r.sadd(k.index, name)  # heals a listing an interrupted create or delete left behind
        return int(status), payload.decode() if isinstance(payload, bytes) else str(payload)
