"""Every Redis key and Lua script of the service, and nothing else.

Keys (``P`` is the configured prefix, ``{name}`` a hash tag so that all keys
of one dataset live in one Redis Cluster slot)::

    P:datasets                      SET    names of all datasets (the index; no KEYS scans)
    P:ds:{name}:meta                HASH   config and counters (see DatasetMeta)
    P:ds:{name}:tokenizer           STRING tokenizer.json, zlib-compressed
    P:ds:{name}:chunks              STRING uint64 LE: first sequence id of each chunk
    P:ds:{name}:c:<k>               STRING chunk k (layout in packing.py), immutable
    P:ds:{name}:ingests             HASH   idempotency key -> JSON result of a committed ingest
    P:ds:{name}:staging             SET    staged chunk keys of ingests in flight
    P:ds:{name}:stage:<ingest>:<j>  STRING a staged chunk, with a TTL until committed
    P:ds:{name}:freq                STRING count of each token id over all stored tokens (BITFIELD u32, big-endian)
    P:ds:{name}:freq:frozen         STRING the table frequency-weighted masking uses: a copy taken at first use
    P:ds:{name}:sm                  SET    ids of the static-mask caches
    P:ds:{name}:sm:<id>:meta        HASH   a cache's config, seed, copies, chunks built, bytes
    P:ds:{name}:sm:<id>:c:<k>       STRING static masks of data chunk k (layout in static.py)

An ingest writes staged chunks (each with a TTL) and then commits them in one
Lua script that checks everything before it writes anything: a request that
fails, or a process that dies, leaves only staged keys that expire, never a
visible half-ingest.
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
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

# A job's keys besides its hash: P:ds:{D}:job:<job>:<part> (jobstore.py has their layout)
JOB_KEY_PARTS = ("leases", "lease", "workers", "ackcount", "seen", "requests")

# KEYS[1]: meta, KEYS[2]: index set, KEYS[3]: staging set, KEYS[4..]: the other fixed keys
# ARGV[1]: name, ARGV[2]: chunk key prefix, ARGV[3]: static-mask cache set (also the caches' key prefix),
# ARGV[4]: the dataset's job set, ARGV[5]: its job key prefix, ARGV[6]: the global job index
# returns the number of keys removed (0 when the dataset did not exist)
DELETE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], 'num_chunks') or '0')
local removed = 0
for k = 0, n - 1 do removed = removed + redis.call('UNLINK', ARGV[2] .. k) end
for _, cache in ipairs(redis.call('SMEMBERS', ARGV[3])) do
  local meta = ARGV[3] .. ':' .. cache .. ':meta'
  local built = tonumber(redis.call('HGET', meta, 'built') or '0')
  for k = 0, built - 1 do removed = removed + redis.call('UNLINK', ARGV[3] .. ':' .. cache .. ':c:' .. k) end
  removed = removed + redis.call('UNLINK', meta)
end
for _, job in ipairs(redis.call('SMEMBERS', ARGV[4])) do
  local base = ARGV[5] .. job
  local epoch = tonumber(redis.call('HGET', base, 'epoch') or '-1')
  for e = 0, epoch do removed = removed + redis.call('UNLINK', base .. ':acked:' .. e) end
  for _, part in ipairs({'', @JOB_PARTS@}) do
    removed = removed + redis.call('UNLINK', base .. part)
  end
  redis.call('HDEL', ARGV[6], job)
end
removed = removed + redis.call('UNLINK', ARGV[4])
local staged = redis.call('SMEMBERS', KEYS[3])
for _, key in ipairs(staged) do removed = removed + redis.call('UNLINK', key) end
for i = 3, #KEYS do removed = removed + redis.call('UNLINK', KEYS[i]) end
removed = removed + redis.call('UNLINK', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return removed
"""
DELETE_DATASET = DELETE_DATASET.replace("@JOB_PARTS@", ", ".join(f"':{p}'" for p in JOB_KEY_PARTS))

# KEYS[1]: meta, KEYS[2]: chunk table, KEYS[3]: ingests hash, KEYS[4]: staging set,
# KEYS[5..]: staged chunk keys in order
# ARGV[1]: dataset uid, ARGV[2]: idempotency key ('' for none), ARGV[3]: chunk key prefix,
# ARGV[4]: result JSON (without ids), ARGV[5..8]: sequences, tokens, documents, bytes,
# ARGV[9]: number of staged chunks S, ARGV[10..9+S]: sequence count of each staged chunk,
# ARGV[10+S..]: token id, count pairs added to the frequency table (KEYS[5 + S], uint32 counters)
# returns {status, first_sequence_id or previous result}: status 0 committed,
# 1 duplicate (the staged keys are dropped), -1 dataset gone or replaced, -2 staged key expired
COMMIT_INGEST = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return {-1, ''} end
if ARGV[2] ~= '' then
  local prev = redis.call('HGET', KEYS[3], ARGV[2])
  if prev then
    for i = 5, 4 + tonumber(ARGV[9]) do redis.call('UNLINK', KEYS[i]); redis.call('SREM', KEYS[4], KEYS[i]) end
    return {1, prev}
  end
end
local staged = tonumber(ARGV[9])
local last = 4 + staged
for i = 5, last do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-2, KEYS[i]} end
end
local nchunks = tonumber(redis.call('HGET', KEYS[1], 'num_chunks'))
local first = tonumber(redis.call('HGET', KEYS[1], 'num_sequences'))
local nseq = first
for i = 5, last do
  redis.call('RENAME', KEYS[i], ARGV[3] .. nchunks)
  redis.call('PERSIST', ARGV[3] .. nchunks)
  redis.call('SREM', KEYS[4], KEYS[i])
  redis.call('APPEND', KEYS[2], struct.pack('<I4I4', nseq % 4294967296, math.floor(nseq / 4294967296)))
  nchunks = nchunks + 1
  nseq = nseq + tonumber(ARGV[i + 5])
end
local ops = {}
for a = 10 + staged, #ARGV, 2 do
  ops[#ops + 1] = 'INCRBY'; ops[#ops + 1] = 'u32'; ops[#ops + 1] = '#' .. ARGV[a]; ops[#ops + 1] = ARGV[a + 1]
  if #ops >= 2000 then redis.call('BITFIELD', KEYS[last + 1], 'OVERFLOW', 'SAT', unpack(ops)); ops = {} end
end
if #ops > 0 then redis.call('BITFIELD', KEYS[last + 1], 'OVERFLOW', 'SAT', unpack(ops)) end
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

# KEYS: the distinct chunk keys the batch reads (data chunks, then static-mask chunks), then
# the dataset's meta hash
# ARGV[1]: id width in bytes, ARGV[2]: B, ARGV[3]: 1 to fetch whole records (ids and word-start bits),
# ARGV[4]: per sequence, (key number, offset, tokens) as packed uint32 triples,
# ARGV[5]: with masks, per sequence, (key number, offset, pairs) of its mask record, packed likewise ('' without)
# ARGV[6]: '' or the counters the caller drew the batch from, 'uid:num_sequences:num_chunks'
# (the callers read the chunks' immutable tables once and cache them, so a sequence costs one GETRANGE)
# returns two arrays, of B strings each: each sequence's ids (or whole record), and its mask record
# (arrays, not joined strings: Lua's table.concat re-copies its growing buffer, quadratic in the batch);
# or, when the counters are not those of ARGV[6], {'stale', uid, num_sequences, num_chunks} as they are
# ('' for a dataset that is gone), before reading anything
# a range that comes back short (a dataset deleted mid-request) is an error reply naming the key
FETCH_RANGES = """
if ARGV[6] ~= '' then
  local c = redis.call('HMGET', KEYS[#KEYS], 'uid', 'num_sequences', 'num_chunks')
  if not c[1] or (c[1] .. ':' .. c[2] .. ':' .. c[3]) ~= ARGV[6] then
    return {'stale', c[1] or '', c[2] or '', c[3] or ''}
  end
end
local w = tonumber(ARGV[1])
local b = tonumber(ARGV[2])
local whole = ARGV[3] == '1'
local entries = ARGV[4]
local data, masks = {}, {}
for i = 1, b do
  local k, off, n = struct.unpack('<I4I4I4', entries, 12 * i - 11)
  local size = n * w
  if whole then size = size + math.floor((n + 7) / 8) end
  local part = redis.call('GETRANGE', KEYS[k], off, off + size - 1)
  if #part ~= size then return redis.error_reply('missing chunk ' .. KEYS[k]) end
  data[i] = part
end
if ARGV[5] ~= '' then
  local mentries = ARGV[5]
  for i = 1, b do
    local k, off, m = struct.unpack('<I4I4I4', mentries, 12 * i - 11)
    if m > 0 then
      local part = redis.call('GETRANGE', KEYS[k], off, off + m * 2 * w - 1)
      if #part ~= m * 2 * w then return redis.error_reply('missing masks ' .. KEYS[k]) end
      masks[i] = part
    else
      masks[i] = ''
    end
  end
end
return {data, masks}
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

# KEYS[1]: dataset meta, KEYS[2]: cache meta, KEYS[3]: cache set
# ARGV[1]: dataset uid, ARGV[2]: cache id, ARGV[3]: most caches per dataset, ARGV[4..]: field/value pairs of a
# new cache's meta
# returns the cache meta as a flat field/value list ({} when the dataset is gone, 'full' when a new cache would
# pass the limit)
OPEN_MASK_CACHE = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return {} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return 'full' end
  redis.call('HSET', KEYS[2], unpack(ARGV, 4))
  redis.call('SADD', KEYS[3], ARGV[2])
end
return redis.call('HGETALL', KEYS[2])
"""

# KEYS[1]: dataset meta, KEYS[2]: cache meta
# ARGV[1]: dataset uid, ARGV[2]: chunk index k, ARGV[3]: the blob, ARGV[4]: mask chunk key prefix
# stores chunk k only when it is the next one to build (concurrent builders are harmless);
# returns the number of chunks built, or -1 when the dataset is gone or replaced
SAVE_MASK_CHUNK = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local built = tonumber(redis.call('HGET', KEYS[2], 'built'))
if built == tonumber(ARGV[2]) then
  redis.call('SET', ARGV[4] .. ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'bytes', #ARGV[3])
  built = redis.call('HINCRBY', KEYS[2], 'built', 1)
end
return built
"""

# KEYS[1]: cache meta, KEYS[2]: cache set; ARGV[1]: cache id, ARGV[2]: mask chunk key prefix
# returns the number of keys removed
DROP_MASK_CACHE = """
local built = tonumber(redis.call('HGET', KEYS[1], 'built') or '0')
local removed = 0
for k = 0, built - 1 do removed = removed + redis.call('UNLINK', ARGV[2] .. k) end
removed = removed + redis.call('UNLINK', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return removed
"""

INT_FIELDS = ("seq_len", "vocab_size", "num_sequences", "num_tokens", "num_documents", "num_chunks", "bytes",
              "generation", "built", "copies", "seed")  # fmt: skip
JSON_FIELDS = ("special_tokens", "all_special_ids", "masking")


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

    def mask_meta(self, name: str, cache: str) -> str:
        return self.ds(name, f"sm:{cache}:meta")

    def mask_chunk_prefix(self, name: str, cache: str) -> str:
        return self.ds(name, f"sm:{cache}:c:")


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


class Store:
    """Async access to the dataset keys; one per app, sharing one pool."""

    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        self.r = r
        self.keys = Keys(prefix)
        self._create = r.register_script(CREATE_DATASET)
        self._delete = r.register_script(DELETE_DATASET)
        self._commit = r.register_script(COMMIT_INGEST)
        self._fetch = r.register_script(FETCH_RANGES)
        self._open_cache = r.register_script(OPEN_MASK_CACHE)
        self._save_masks = r.register_script(SAVE_MASK_CHUNK)
        self._drop_cache = r.register_script(DROP_MASK_CACHE)
        self._freeze = r.register_script(FREEZE_FREQUENCIES)

    async def create_dataset(self, name: str, meta: dict[str, Any], tokenizer_blob: bytes) -> bool:
        """``tokenizer_blob``: :func:`pack_tokenizer` of the tokenizer.json (made off the event loop)."""
        fields = pairs({f: json.dumps(v) if f in JSON_FIELDS else v for f, v in meta.items()})
        k = self.keys
        created = await self._create(
            keys=[k.ds(name, "meta"), k.ds(name, "tokenizer"), k.index], args=[name, tokenizer_blob, *fields]
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
        if raw is None:
            return None
        return await anyio.to_thread.run_sync(unpack_tokenizer, raw)  # up to tens of MB: not on the event loop

    async def delete_dataset(self, name: str) -> int:
        k = self.keys
        fixed = [k.ds(name, p) for p in ("tokenizer", "chunks", "ingests", "staging", "freq", "freq:frozen", "sm")]
        keys = [k.ds(name, "meta"), k.index, k.ds(name, "staging"), *fixed]
        args = [name, k.chunk_prefix(name), k.ds(name, "sm"), k.ds(name, "jobs"), k.ds(name, "job:"), f"{k.prefix}:jobs"]
        return int(await self._delete(keys=keys, args=args))

    async def token_counts(self, name: str, vocab_size: int) -> np.ndarray:
        """The frozen frequency table (taken from the live counts at first use, then fixed)."""
        k = self.keys
        raw = await self._freeze(keys=[k.ds(name, "freq"), k.ds(name, "freq:frozen")])
        counts = np.zeros(vocab_size, dtype=np.int64)
        table = np.frombuffer(raw or b"", dtype=">u4", count=min(vocab_size, len(raw or b"") // 4))
        counts[: len(table)] = table
        return counts

    # ---- static masks --------------------------------------------------------

    async def open_mask_cache(
        self, name: str, uid: str, cache: str, fields: dict[str, Any], max_caches: int
    ) -> dict[str, Any] | None:
        """Create the cache's meta unless it exists; returns it (None: dataset gone). Raises
        :class:`CachesFull` when the dataset already has ``max_caches`` others."""
        k = self.keys
        raw = await self._open_cache(
            keys=[k.ds(name, "meta"), k.mask_meta(name, cache), k.ds(name, "sm")],
            args=[uid, cache, max_caches, *pairs(fields)],
        )
        if raw == b"full":
            raise CachesFull(max_caches)
        if not raw:
            return None
        return decode_meta(dict(zip(raw[0::2], raw[1::2])))

    async def mask_cache(self, name: str, cache: str) -> dict[str, Any] | None:
        raw = await self.r.hgetall(self.keys.mask_meta(name, cache))
        return decode_meta(raw) if raw else None

    async def mask_caches(self, name: str) -> list[dict[str, Any]]:
        out = []
        for cache in sorted(c.decode() for c in await self.r.smembers(self.keys.ds(name, "sm"))):
            meta = await self.mask_cache(name, cache)
            if meta is not None:
                out.append(meta)
        return out

    async def read_chunk(self, name: str, k: int) -> bytes | None:
        return await self.r.get(f"{self.keys.chunk_prefix(name)}{k}")

    async def save_mask_chunk(self, name: str, uid: str, cache: str, k: int, blob: bytes) -> int:
        """Store masks of chunk k if it is the next one; returns the cache's chunks built (-1: dataset gone)."""
        keys = [self.keys.ds(name, "meta"), self.keys.mask_meta(name, cache)]
        return int(await self._save_masks(keys=keys, args=[uid, k, blob, self.keys.mask_chunk_prefix(name, cache)]))

    async def drop_mask_cache(self, name: str, cache: str) -> int:
        k = self.keys
        return int(await self._drop_cache(
            keys=[k.mask_meta(name, cache), k.ds(name, "sm")], args=[cache, k.mask_chunk_prefix(name, cache)]
        ))  # fmt: skip

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
        token_counts: np.ndarray,
    ) -> tuple[int, str]:  # fmt: skip
        k = self.keys
        keys = [k.ds(name, "meta"), k.ds(name, "chunks"), k.ds(name, "ingests"), k.ds(name, "staging"), *staged,
                k.ds(name, "freq")]  # fmt: skip
        args = [uid, idem_key, k.chunk_prefix(name), json.dumps(result), sequences, tokens, documents, nbytes,
                len(staged), *chunk_counts]  # fmt: skip
        nz = np.flatnonzero(token_counts)
        pairs = np.stack([nz, token_counts[nz]], axis=1).ravel().tolist()
        status, payload = await self._commit(keys=keys, args=[*args, *pairs])
        return int(status), payload.decode() if isinstance(payload, bytes) else str(payload)

    # ---- batches -------------------------------------------------------------

    async def tables(self, keys: list[str], counts: list[int]) -> list[np.ndarray | None]:
        """The (offset, n) tables at the head of chunk blobs, ``counts[i]`` entries each (None: no such key)."""
        async with self.r.pipeline(transaction=False) as p:
            for key, count in zip(keys, counts):
                p.getrange(key, 4, 3 + 8 * count)
            raw = await p.execute()
        return [
            np.frombuffer(r, dtype="<u4").reshape(-1, 2) if len(r) == 8 * c else None for r, c in zip(raw, counts)
        ]

    async def fetch(
        self, name: str, chunks: np.ndarray, which: np.ndarray, entries: np.ndarray, itemsize: int, *,
        masks: tuple[str, np.ndarray] | None = None, word_starts: bool = False,
        expect: tuple[str, int, int] | None = None,
    ) -> tuple[bytes, bytes | None]:  # fmt: skip
        """Sequences at ``entries`` ((offset, tokens) each) of their chunks, in one round trip:
        sequence i lies in chunk ``chunks[which[i]]`` (``chunks``: the distinct chunks).

        Returns the sequences back to back (their ids, or with ``word_starts``
        their whole records, as ``packing.assemble`` takes) and, with
        ``masks=(cache id, (offset, pairs) per sequence)``, their static mask
        records back to back (else None). With ``expect`` (the counters the
        batch was drawn from) the script first checks them and raises
        ``StaleCounters`` with the current ones when they moved on.
        """
        prefix = self.keys.chunk_prefix(name)
        keys = [f"{prefix}{c}" for c in chunks.tolist()]

        def packed(first_key: int, pairs: np.ndarray) -> bytes:
            triples = np.empty((len(which), 3), dtype="<u4")
            triples[:, 0] = which + first_key  # Lua's KEYS are 1-based
            triples[:, 1:] = pairs
            return triples.tobytes()

        args: list[object] = [itemsize, len(which), 1 if word_starts else 0, packed(1, entries), b""]
        if masks is not None:
            mprefix = self.keys.mask_chunk_prefix(name, masks[0])
            args[4] = packed(len(keys) + 1, masks[1])
            keys += [f"{mprefix}{c}" for c in chunks.tolist()]
        args.append("" if expect is None else f"{expect[0]}:{expect[1]}:{expect[2]}")
        keys.append(self.keys.ds(name, "meta"))
        reply = await self._fetch(keys=keys, args=args)
        if reply[0] == b"stale":
            uid, nseq, nchunks = (x.decode() for x in reply[1:])
            raise StaleCounters((uid, int(nseq), int(nchunks)) if uid else None)
        data, records = reply
        return b"".join(data), b"".join(records) if masks else None


class CachesFull(Exception):
    """A dataset holds as many static-mask caches as allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the dataset already has {limit} static-mask caches")
        self.limit = limit


class StaleCounters(Exception):
    """The dataset's counters moved on since the batch was drawn (``current``: as they are now, None when gone)."""

    def __init__(self, current: tuple[str, int, int] | None) -> None:
        super().__init__("dataset counters changed")
        self.current = current
