"""Every Redis key and Lua script of the service, and nothing else.

Keys (``P`` is the configured prefix, ``{name}`` a hash tag so that all keys
of one dataset live in one Redis Cluster slot)::

    P:datasets                      SET    names of all datasets (the index; no KEYS scans)
    P:ds:{name}:meta                HASH   config and counters (see DatasetMeta)
    P:ds:{name}:tokenizer           STRING tokenizer.json
    P:ds:{name}:chunks              STRING uint64 LE: first sequence id of each chunk
    P:ds:{name}:c:<k>               STRING chunk k (layout in packing.py), immutable
    P:ds:{name}:ingests             HASH   idempotency key -> JSON result of a committed ingest
    P:ds:{name}:staging             SET    staged chunk keys of ingests in flight
    P:ds:{name}:stage:<ingest>:<j>  STRING a staged chunk, with a TTL until committed

An ingest writes staged chunks (each with a TTL) and then commits them in one
Lua script that checks everything before it writes anything: a request that
fails, or a process that dies, leaves only staged keys that expire, never a
visible half-ingest.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis

# KEYS[1]: meta, KEYS[2]: tokenizer, KEYS[3]: index set
# ARGV[1]: name, ARGV[2]: tokenizer.json, ARGV[3..]: meta field/value pairs
# returns 1 when created, 0 when a dataset of that name exists
CREATE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS[1]: meta, KEYS[2]: index set, KEYS[3]: staging set, KEYS[4..]: the other fixed keys
# ARGV[1]: name, ARGV[2]: chunk key prefix
# returns the number of keys removed (0 when the dataset did not exist)
DELETE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], 'num_chunks') or '0')
local removed = 0
for k = 0, n - 1 do removed = removed + redis.call('UNLINK', ARGV[2] .. k) end
local staged = redis.call('SMEMBERS', KEYS[3])
for _, key in ipairs(staged) do removed = removed + redis.call('UNLINK', key) end
for i = 3, #KEYS do removed = removed + redis.call('UNLINK', KEYS[i]) end
removed = removed + redis.call('UNLINK', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return removed
"""

# KEYS[1]: meta, KEYS[2]: chunk table, KEYS[3]: ingests hash, KEYS[4]: staging set,
# KEYS[5..]: staged chunk keys in order
# ARGV[1]: dataset uid, ARGV[2]: idempotency key ('' for none), ARGV[3]: chunk key prefix,
# ARGV[4]: result JSON (without ids), ARGV[5..9]: sequences, tokens, documents, bytes, -,
# ARGV[10..]: sequence count of each staged chunk
# returns {status, first_sequence_id or previous result}: status 0 committed,
# 1 duplicate (the staged keys are dropped), -1 dataset gone or replaced, -2 staged key expired
COMMIT_INGEST = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return {-1, ''} end
if ARGV[2] ~= '' then
  local prev = redis.call('HGET', KEYS[3], ARGV[2])
  if prev then
    for i = 5, #KEYS do redis.call('UNLINK', KEYS[i]); redis.call('SREM', KEYS[4], KEYS[i]) end
    return {1, prev}
  end
end
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-2, KEYS[i]} end
end
local nchunks = tonumber(redis.call('HGET', KEYS[1], 'num_chunks'))
local first = tonumber(redis.call('HGET', KEYS[1], 'num_sequences'))
local nseq = first
for i = 5, #KEYS do
  redis.call('RENAME', KEYS[i], ARGV[3] .. nchunks)
  redis.call('PERSIST', ARGV[3] .. nchunks)
  redis.call('SREM', KEYS[4], KEYS[i])
  redis.call('APPEND', KEYS[2], struct.pack('<I4I4', nseq % 4294967296, math.floor(nseq / 4294967296)))
  nchunks = nchunks + 1
  nseq = nseq + tonumber(ARGV[i + 5])
end
redis.call('HSET', KEYS[1], 'num_chunks', nchunks)
redis.call('HINCRBY', KEYS[1], 'num_sequences', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'num_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'num_documents', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'generation', 1)
local result = cjson.decode(ARGV[4])
result['first_sequence_id'] = first
local encoded = cjson.encode(result)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], encoded) end
return {0, encoded}
"""

# KEYS: the chunk key of each wanted sequence (repeats allowed)
# ARGV[1]: id width in bytes, ARGV[2..]: the sequence's index inside its chunk
# returns {ntok_1, record_1, ntok_2, record_2, ...}
FETCH_SEQUENCES = """
local w = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local li = tonumber(ARGV[i + 1])
  local off, n = struct.unpack('<I4I4', redis.call('GETRANGE', KEYS[i], 4 + 8 * li, 11 + 8 * li))
  out[2 * i - 1] = n
  out[2 * i] = redis.call('GETRANGE', KEYS[i], off, off + n * w + math.floor((n + 7) / 8) - 1)
end
return out
"""

INT_FIELDS = ("seq_len", "vocab_size", "num_sequences", "num_tokens", "num_documents", "num_chunks", "bytes", "generation")
JSON_FIELDS = ("special_tokens", "all_special_ids")


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def index(self) -> str:
        return f"{self.prefix}:datasets"

    def ds(self, name: str, part: str) -> str:
        return f"{self.prefix}:ds:{{{name}}}:{part}"

    def chunk_prefix(self, name: str) -> str:
        return self.ds(name, "c:")

    def stage(self, name: str, ingest: str, j: int) -> str:
        return self.ds(name, f"stage:{ingest}:{j}")


def decode_meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    for f in INT_FIELDS:
        if f in meta:
            meta[f] = int(meta[f])
    for f in JSON_FIELDS:
        if f in meta:
            meta[f] = json.loads(meta[f])
    return meta


class Store:
    """Async access to the dataset keys; one per app, sharing one pool."""

    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        self.r = r
        self.keys = Keys(prefix)
        self._create = r.register_script(CREATE_DATASET)
        self._delete = r.register_script(DELETE_DATASET)
        self._commit = r.register_script(COMMIT_INGEST)
        self._fetch = r.register_script(FETCH_SEQUENCES)

    async def create_dataset(self, name: str, meta: dict[str, Any], tokenizer_json: str) -> bool:
        fields: list[Any] = []
        for k, v in meta.items():
            fields += [k, json.dumps(v) if k in JSON_FIELDS else v]
        k = self.keys
        created = await self._create(
            keys=[k.ds(name, "meta"), k.ds(name, "tokenizer"), k.index], args=[name, tokenizer_json, *fields]
        )
        return bool(created)

    async def list_names(self) -> list[str]:
        return sorted(n.decode() for n in await self.r.smembers(self.keys.index))

    async def meta(self, name: str) -> dict[str, Any] | None:
        raw = await self.r.hgetall(self.keys.ds(name, "meta"))
        return decode_meta(raw) if raw else None

    async def counters(self, name: str) -> tuple[str, int, int] | None:
        """(uid, num_sequences, num_chunks): the per-request read of the batch path."""
        uid, nseq, nchunks = await self.r.hmget(self.keys.ds(name, "meta"), "uid", "num_sequences", "num_chunks")
        if uid is None:
            return None
        return uid.decode(), int(nseq), int(nchunks)

    async def tokenizer_json(self, name: str) -> str | None:
        raw = await self.r.get(self.keys.ds(name, "tokenizer"))
        return raw.decode() if raw is not None else None

    async def delete_dataset(self, name: str) -> int:
        k = self.keys
        fixed = [k.ds(name, p) for p in ("tokenizer", "chunks", "ingests", "staging")]
        keys = [k.ds(name, "meta"), k.index, k.ds(name, "staging"), *fixed]
        return int(await self._delete(keys=keys, args=[name, k.chunk_prefix(name)]))

    async def chunk_table(self, name: str, start: int, end: int) -> np.ndarray:
        """First sequence id of chunks ``start..end-1`` (the table is append-only)."""
        raw = await self.r.getrange(self.keys.ds(name, "chunks"), 8 * start, 8 * end - 1)
        return np.frombuffer(raw, dtype="<u8").astype(np.int64)

    # ---- ingest ------------------------------------------------------------

    def new_ingest_id(self) -> str:
        return uuid.uuid4().hex

    async def stage_chunk(self, name: str, ingest: str, j: int, blob: bytes, ttl: int) -> str:
        key = self.keys.stage(name, ingest, j)
        staging = self.keys.ds(name, "staging")
        async with self.r.pipeline(transaction=True) as p:
            p.set(key, blob, ex=ttl)
            p.sadd(staging, key)
            p.expire(staging, ttl)
            await p.execute()
        return key

    async def drop_staged(self, name: str, staged: list[str]) -> None:
        if staged:
            async with self.r.pipeline(transaction=True) as p:
                p.unlink(*staged)
                p.srem(self.keys.ds(name, "staging"), *staged)
                await p.execute()

    async def commit_ingest(
        self, name: str, uid: str, idem_key: str, staged: list[str], chunk_counts: list[int],
        sequences: int, tokens: int, documents: int, nbytes: int, result: dict[str, Any],
    ) -> tuple[int, str]:  # fmt: skip
        k = self.keys
        keys = [k.ds(name, "meta"), k.ds(name, "chunks"), k.ds(name, "ingests"), k.ds(name, "staging"), *staged]
        args = [uid, idem_key, k.chunk_prefix(name), json.dumps(result), sequences, tokens, documents, nbytes, 0]
        status, payload = await self._commit(keys=keys, args=[*args, *chunk_counts])
        return int(status), payload.decode() if isinstance(payload, bytes) else str(payload)

    # ---- batches -------------------------------------------------------------

    async def fetch(self, name: str, chunk_ids: np.ndarray, local: np.ndarray, itemsize: int) -> list[tuple[int, bytes]]:
        prefix = self.keys.chunk_prefix(name)
        keys = [f"{prefix}{c}" for c in chunk_ids.tolist()]
        flat = await self._fetch(keys=keys, args=[itemsize, *local.tolist()])
        return list(zip(flat[0::2], flat[1::2]))
