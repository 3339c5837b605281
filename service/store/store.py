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
* **Batches.** On one server a batch's sequences come from one script. On a
  cluster they are grouped by chunk group (one slot each) and sent as one
  pipeline per node, all nodes at once: one round trip per node.
"""

from __future__ import annotations

import json
import secrets
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from .jobstore import DELETE_JOB, JobKeys
from .keys import Keys, chunk_id_of, group_of



@dataclass(frozen=True)
class ChunkRef:
    """What the store needs to find one dataset generation's chunks: the dataset's name, the generation's
    uid, its number of chunk groups and the chunk id at each position of its chunk table."""

    name: str
    uid: str
    groups: int
    ids: np.ndarray

# KEYS[1]: meta, KEYS[2]: tokenizer
# ARGV[1]: tokenizer.json, ARGV[2..]: meta field/value pairs
# returns 1 when created, 0 when a dataset of that name exists
CREATE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1]: meta, KEYS[2]: trash set, KEYS[3]: this generation's trash record, KEYS[4]: chunk id table,
# KEYS[5]: staging set, KEYS[6]: cache set, KEYS[7]: job set, KEYS[8..7+F]: the other fixed keys,
# KEYS[8+F..]: the meta of each cache in ARGV[3..]
# ARGV[1]: uid, ARGV[2]: F, ARGV[3..]: the cache ids the caller read
# returns 'retired', 'gone' (no such dataset), 'moved' (another generation now) or 'again' (the caches changed)
RETIRE_DATASET = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if not uid then return 'gone' end
if uid ~= ARGV[1] then return 'moved' end
if redis.call('SCARD', KEYS[6]) ~= #ARGV - 2 then return 'again' end
for a = 3, #ARGV do
  if redis.call('SISMEMBER', KEYS[6], ARGV[a]) == 0 then return 'again' end
end
local function joined(list) return table.concat(list, ',') end
redis.call('HSET', KEYS[3], 'groups', redis.call('HGET', KEYS[1], 'chunk_groups'),
  'chunk_ids', redis.call('GET', KEYS[4]) or '', 'staging', joined(redis.call('ZRANGE', KEYS[5], 0, -1)),
  'caches', joined(redis.call('SMEMBERS', KEYS[6])), 'jobs', joined(redis.call('SMEMBERS', KEYS[7])))
redis.call('SADD', KEYS[2], uid)
redis.call('UNLINK', KEYS[1])
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
return 'retired'
"""

# KEYS[1]: meta, KEYS[2]: staging set
# ARGV[1]: dataset uid, ARGV[2]: chunk id, ARGV[3]: how long the chunk may stay staged (ms)
# returns the dataset's chunk groups, -1 when the dataset is gone or replaced, or -2 when another ingest staged
# that id (it drew the same nonce: its entry is left as it is)
RESERVE_CHUNK = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return -1 end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return -2 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3]), ARGV[2])
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
COMMIT_INGEST = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return {-1, ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
# ARGV[1]: dataset uid, ARGV[2]: chunk position k, ARGV[3]: bytes of its masks (already stored beside the chunk)
# counts chunk k as built only when it is the next one to build (concurrent builders are harmless);
# returns the number of chunks built, or -1 when the dataset is gone or replaced
SAVE_MASK_CHUNK = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local built = tonumber(redis.call('HGET', KEYS[2], 'built'))
if built == tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[3])
  built = redis.call('HINCRBY', KEYS[2], 'built', 1)
end
return built
"""

# KEYS[1]: cache meta, KEYS[2]: cache set; ARGV[1]: cache id
# (its mask chunks, in other slots, are unlinked first by the caller); returns 1 when it existed
DROP_MASK_CACHE = """
local n = redis.call('UNLINK', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
"""

# KEYS[1]: meta, KEYS[2]: job set; ARGV[1]: dataset uid, ARGV[2]: job name
# returns 1 when the job is now listed with the dataset, 0 when the dataset is gone or replaced
ADD_JOB = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

INT_FIELDS = ("seq_len", "vocab_size", "num_sequences", "num_tokens", "num_documents", "num_chunks", "bytes",
              "generation", "built", "copies", "seed", "chunk_groups")  # fmt: skip
JSON_FIELDS = ("special_tokens", "all_special_ids", "masking")
# the dataset's keys in its own slot that RETIRE_DATASET removes besides those it names one by one
_FIXED = ("tokenizer", "chunks", "ingests", "idem", "idem:due", "freq", "freq:frozen")
_RETIRE_TRIES = 16
_STAGE_TRIES = 4  # ids a chunk tries (each of a fresh 39-bit nonce) before its ingest fails


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


class Store:
    """Async access to the dataset keys; one per app, sharing one client (a pool, or a cluster client).

    ``cluster``: the client is a ``RedisCluster``; batches fan out per node (see the module docstring).
    ``chunk_groups``: G of datasets created from now on. ``reader``: on a cluster, a client that reads
    from replicas, used for chunk reads only (chunks are immutable; everything else goes to masters).
    ``idempotency_ttl_s``: how long an ingest's idempotency key is remembered."""

    def __init__(
        self, r: aioredis.Redis, prefix: str, *, cluster: bool = False, chunk_groups: int = 64,
        reader: aioredis.Redis | None = None, idempotency_ttl_s: int = 7 * 86400,
    ) -> None:  # fmt: skip
        self.r = r
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.reader = reader or r
        self.keys = Keys(prefix)
        self.job_keys = JobKeys(prefix)
        self.cluster = cluster
        self.chunk_groups = chunk_groups
        self.replica_reads = reader is not None
        self._create = r.register_script(CREATE_DATASET)
        self._retire = r.register_script(RETIRE_DATASET)
        self._reserve = r.register_script(RESERVE_CHUNK)
        self._commit = r.register_script(COMMIT_INGEST)
        self._fetch = r.register_script(FETCH_RANGES)
        self._open_cache = r.register_script(OPEN_MASK_CACHE)
        self._save_masks = r.register_script(SAVE_MASK_CHUNK)
        self._drop_cache = r.register_script(DROP_MASK_CACHE)
        self._freeze = r.register_script(FREEZE_FREQUENCIES)
        self._add_job = r.register_script(ADD_JOB)
        self._delete_job = r.register_script(DELETE_JOB)

    # ---- datasets ------------------------------------------------------------

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

    async def delete_dataset(self, name: str) -> int:
        """Delete the dataset and everything it owns; returns 0 when there was none, else a positive count
        of keys removed. Retried after an interruption, it finishes what the first attempt left."""
        k = self.keys
        state = "again"
        for _ in range(_RETIRE_TRIES):
            async with self.r.pipeline(transaction=False) as p:  # one slot: one node, one round trip
                p.hget(k.ds(name, "meta"), "uid")
                p.smembers(k.ds(name, "sm"))
                uid, caches = await p.execute()
            if uid is None:
                state = "gone"
                break
            uid, cache_ids = uid.decode(), sorted(c.decode() for c in caches)
            keys = [k.ds(name, "meta"), k.ds(name, "trash"), k.trash(name, uid), k.ds(name, "chunk_ids"),
                    k.ds(name, "staging"), k.ds(name, "sm"), k.ds(name, "jobs"), *(k.ds(name, f) for f in _FIXED),
                    *(k.mask_meta(name, c) for c in cache_ids)]  # fmt: skip
            state = (await self._retire(keys=keys, args=[uid, len(_FIXED), *cache_ids])).decode()
            if state not in ("again", "moved"):
                break
        if state in ("again", "moved"):
            raise RuntimeError(f"dataset {name!r} kept changing while it was deleted")
        removed = await self.empty_trash(name)
        if state == "gone":
            return 0
        await self.r.srem(k.index, name)  # after: a listed name without meta is skipped
        if await self.r.exists(k.ds(name, "meta")):  # a create of the name ran meanwhile: it stays listed
            await self.r.sadd(k.index, name)
        return 1 + removed

    async def empty_trash(self, name: str) -> int:
        """Unlink what deleted generations of ``name`` left in other slots; returns the keys removed."""
        k = self.keys
        removed = 0
        for uid in sorted(u.decode() for u in await self.r.smembers(k.ds(name, "trash"))):
            record = {f.decode(): v for f, v in (await self.r.hgetall(k.trash(name, uid))).items()}
            if record:
                removed += await self._unlink_generation(uid, record)
            async with self.r.pipeline(transaction=False) as p:
                p.execute_command("UNLINK", k.trash(name, uid))  # (a cluster pipeline has no unlink method)
                p.srem(k.ds(name, "trash"), uid)
                await p.execute()
        return removed

    async def _unlink_generation(self, uid: str, record: dict[str, bytes]) -> int:
        groups = int(record["groups"])
        ids = [*_u64(record["chunk_ids"]).tolist(), *(int(i) for i in _split(record["staging"]))]
        caches = _split(record["caches"])
        keys = [self.keys.chunk(uid, groups, i) + suffix for i in ids for suffix in ("", *(f":sm:{c}" for c in caches))]
        removed = await self.unlink(keys)
        for job in _split(record["jobs"]):
            removed += await self.delete_job(job, uid)
        return removed

    async def unlink(self, keys: list[str]) -> int:
        """UNLINK keys of any slots: one command per key, one pipeline (one round trip per node)."""
        removed = 0
        for start in range(0, len(keys), 4096):
            async with self.r.pipeline(transaction=False) as p:
                for key in keys[start : start + 4096]:
                    p.execute_command("UNLINK", key)  # (a cluster pipeline has no unlink method)
                removed += sum(int(n) for n in await p.execute())
        return removed

    async def token_counts(self, name: str, vocab_size: int) -> np.ndarray:
        """The frozen frequency table (taken from the live counts at first use, then fixed)."""
        k = self.keys
        raw = await self._freeze(keys=[k.ds(name, "freq"), k.ds(name, "freq:frozen")])
        counts = np.zeros(vocab_size, dtype=np.int64)
        table = np.frombuffer(raw or b"", dtype=">u4", count=min(vocab_size, len(raw or b"") // 4))
        counts[: len(table)] = table
        return counts

    # ---- jobs' entries in the dataset's slot ------------------------------------

    async def add_job(self, name: str, uid: str, job: str) -> bool:
        """List ``job`` with its dataset (False: the dataset is gone or replaced)."""
        k = self.keys
        return bool(await self._add_job(keys=[k.ds(name, "meta"), k.ds(name, "jobs")], args=[uid, job]))

    async def delete_job(self, job: str, dataset_uid: str = "") -> int:
        """Delete the job's keys (only if it reads generation ``dataset_uid``, when given); returns keys removed."""
        jk = self.job_keys
        for _ in range(_RETIRE_TRIES):
            epoch = await self.r.hget(jk.job(job), "epoch")
            epochs = int(epoch) + 1 if epoch is not None else 0
            n = int(await self._delete_job(keys=jk.all_keys(job, epochs), args=[dataset_uid, epochs]))
            if n != -2:  # -2: the job entered another epoch meanwhile
                return max(n, 0)
        raise RuntimeError(f"job {job!r} kept changing while it was deleted")

    async def job_names(self, names: list[str]) -> dict[str, list[str]]:
        """The jobs listed with each of the datasets ``names``."""
        async with self.r.pipeline(transaction=False) as p:
            for name in names:
                p.smembers(self.keys.ds(name, "jobs"))
            listed = await p.execute()
        return {name: sorted(j.decode() for j in jobs) for name, jobs in zip(names, listed)}

    async def unlist_job(self, name: str, job: str) -> None:
        await self.r.srem(self.keys.ds(name, "jobs"), job)

    # ---- chunks --------------------------------------------------------------

    def chunk_keys(self, rt: ChunkRef, positions: list[int], cache: str | None = None) -> list[str]:
        """Keys of the chunks at ``positions`` of the chunk table (or of their static masks of ``cache``)."""
        prefixes = self.keys.chunk_prefixes(rt.uid, rt.groups)
        groups = len(prefixes)
        ids = rt.ids[positions].tolist() if positions else []
        suffix = "" if cache is None else f":sm:{cache}"
        return [f"{prefixes[group_of(i, groups)]}{i}{suffix}" for i in ids]

    async def chunk_table(self, name: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """First sequence id and chunk id of table positions ``start..end-1`` (both tables are append-only)."""
        async with self.r.pipeline(transaction=False) as p:
            p.getrange(self.keys.ds(name, "chunks"), 8 * start, 8 * end - 1)
            p.getrange(self.keys.ds(name, "chunk_ids"), 8 * start, 8 * end - 1)
            starts, ids = await p.execute()
        return _u64(starts), _u64(ids)

    async def read_chunk(self, rt: ChunkRef, k: int) -> bytes | None:
        return await self.r.get(self.chunk_keys(rt, [k])[0])

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

    async def save_mask_chunk(self, rt: ChunkRef, cache: str, k: int, blob: bytes) -> int:
        """Store the masks of chunk k beside it and count them if k is the next one; returns the cache's
        chunks built (-1: dataset gone, and the masks are unlinked again)."""
        key = self.chunk_keys(rt, [k], cache)[0]
        await self.r.set(key, blob)
        keys = [self.keys.ds(rt.name, "meta"), self.keys.mask_meta(rt.name, cache)]
        built = int(await self._save_masks(keys=keys, args=[rt.uid, k, len(blob)]))
        if built < 0:
            await self.r.unlink(key)
        return built

    async def drop_mask_cache(self, name: str, cache: str) -> int:
        """Unlink the cache's mask chunks (beside their data chunks), then its meta."""
        k = self.keys
        async with self.r.pipeline(transaction=False) as p:
            p.hmget(k.ds(name, "meta"), "uid", "chunk_groups")
            p.get(k.ds(name, "chunk_ids"))
            (uid, groups), ids = await p.execute()
        removed = 0
        if uid is not None:
            keys = [f"{self.keys.chunk(uid.decode(), int(groups), i)}:sm:{cache}" for i in _u64(ids or b"").tolist()]
            removed = await self.unlink(keys)
        return removed + int(await self._drop_cache(keys=[k.mask_meta(name, cache), k.ds(name, "sm")], args=[cache]))

    # ---- ingest ------------------------------------------------------------

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

    async def drop_staged(self, name: str, staged: list[Staged]) -> None:
        if staged:
            await self.unlink([s.key for s in staged])
            await self.r.zrem(self.keys.ds(name, "staging"), *(s.id for s in staged))

    async def commit_ingest(
        self, name: str, uid: str, idem_key: str, staged: list[Staged], chunk_counts: list[int],
        sequences: int, tokens: int, documents: int, nbytes: int, result: dict[str, Any],
        token_counts: np.ndarray,
    ) -> tuple[int, str]:  # fmt: skip
        """Make the staged chunks permanent, then visible (one script in the dataset's slot)."""
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
        if int(status) == 1:  # a repeat of a committed request: its own chunks were never needed
            await self.drop_staged(name, staged)
        if int(status) == 0:
            await self.r.sadd(k.index, name)  # heals a listing an interrupted create or delete left behind
        return int(status), payload.decode() if isinstance(payload, bytes) else str(payload)

    # ---- batches -------------------------------------------------------------

    async def tables(self, keys: list[str], counts: list[int]) -> list[np.ndarray | None]:
        """The (offset, n) tables at the head of chunk blobs, ``counts[i]`` entries each (None: no such key).
        Read from a replica when configured; what it lacks (it may lag a fresh ingest) is read from masters."""
        tables = await self._tables(self.reader, keys, counts)
        lacking = [i for i, t in enumerate(tables) if t is None]
        if lacking and self.replica_reads:
            again = await self._tables(self.r, [keys[i] for i in lacking], [counts[i] for i in lacking])
            for i, t in zip(lacking, again):
                tables[i] = t
        return tables

    @staticmethod
    async def _tables(client: aioredis.Redis, keys: list[str], counts: list[int]) -> list[np.ndarray | None]:
        async with client.pipeline(transaction=False) as p:
            for key, count in zip(keys, counts):
                p.getrange(key, 4, 3 + 8 * count)
            raw = await p.execute()
        return [
            np.frombuffer(r, dtype="<u4").reshape(-1, 2) if len(r) == 8 * c else None for r, c in zip(raw, counts)
        ]

    async def fetch(
        self, rt: ChunkRef, chunks: np.ndarray, which: np.ndarray, entries: np.ndarray, itemsize: int, *,
        masks: tuple[str, np.ndarray] | None = None, word_starts: bool = False,
        expect: tuple[str, int, int] | None = None,
    ) -> tuple[bytes, bytes | None]:  # fmt: skip
        """Sequences at ``entries`` ((offset, tokens) each) of their chunks, in one round trip per node:
        sequence i lies in the chunk at table position ``chunks[which[i]]`` (``chunks``: the distinct ones).

        Returns the sequences back to back (their ids, or with ``word_starts``
        their whole records, as ``packing.assemble`` takes) and, with
        ``masks=(cache id, (offset, pairs) per sequence)``, their static mask
        records back to back (else None). With ``expect`` (the counters the
        batch was drawn from) they are checked in the same round trip, and
        ``StaleCounters`` raised with the current ones when they moved on.
        """
        positions = chunks.tolist()
        keys = self.chunk_keys(rt, positions)
        mkeys = self.chunk_keys(rt, positions, masks[0]) if masks is not None else []
        if self.cluster:
            return await self._fetch_fanned(rt, keys, mkeys, which, entries, itemsize, masks, word_starts, expect)
        args: list[object] = [itemsize, len(which), 1 if word_starts else 0, _packed(which + 1, entries), b""]
        if masks is not None:
            args[4] = _packed(which + 1 + len(keys), masks[1])
        args.append("" if expect is None else f"{expect[0]}:{expect[1]}:{expect[2]}")
        reply = await self._fetch(keys=[*keys, *mkeys, self.keys.ds(rt.name, "meta")], args=args)
        if reply[0] == b"stale":
            uid, nseq, nchunks = (x.decode() for x in reply[1:])
            raise StaleCounters((uid, int(nseq), int(nchunks)) if uid else None)
        data, records = reply
        return b"".join(data), b"".join(records) if masks else None

    async def _fetch_fanned(
        self, rt: ChunkRef, keys: list[str], mkeys: list[str], which: np.ndarray, entries: np.ndarray,
        itemsize: int, masks: tuple[str, np.ndarray] | None, word_starts: bool, expect: tuple[str, int, int] | None,
    ) -> tuple[bytes, bytes | None]:  # fmt: skip
        """The cluster's fetch: one FETCH_RANGES per chunk group (one slot each) and, with ``expect``, the
        counters, all in one pipeline that the client sends as one batch per node, to all nodes at once."""
        chunk_group = np.array([_group_of(key) for key in keys])  # the group's tag, per distinct chunk
        seq_group = chunk_group[which]
        order = np.argsort(seq_group, kind="stable")
        plans = []
        for tag in np.unique(chunk_group):
            in_group = np.flatnonzero(chunk_group == tag)  # distinct chunks of this group
            local = np.full(len(keys), 0, dtype=np.int64)
            local[in_group] = np.arange(1, len(in_group) + 1)
            rows = order[seq_group[order] == tag]  # the batch rows read here, in batch order
            gkeys = [keys[i] for i in in_group]
            args: list[object] = [itemsize, len(rows), 1 if word_starts else 0, _packed(local[which[rows]], entries[rows]), b""]
            if masks is not None:
                args[4] = _packed(local[which[rows]] + len(in_group), masks[1][rows])
                gkeys += [mkeys[i] for i in in_group]
            plans.append((rows, gkeys, [*args, ""]))
        meta = self.keys.ds(rt.name, "meta") if expect is not None else None
        replies = await self._run_fetches(self.reader, plans, meta, replica=self.replica_reads)
        failed = any(isinstance(x, Exception) for x in replies)
        if self.replica_reads and (failed or (expect is not None and _counters(replies[-1]) != expect)):
            # A replica may lag the master (a fresh ingest, a re-created dataset): what it could not answer,
            # or counters other than the caller's, are asked of the masters before anything is concluded.
            replies = await self._run_fetches(self.r, plans, meta, replica=False)
        for x in replies:
            if isinstance(x, Exception):
                raise x  # a short range (a chunk gone) is a ResponseError, as on one server
        if expect is not None:
            current = _counters(replies[-1])
            if current != expect:
                raise StaleCounters(current)
        data: list[bytes] = [b""] * len(which)
        records: list[bytes] = [b""] * len(which)
        for (rows, _, _), (part, mparts) in zip(plans, replies):
            for row, piece in zip(rows.tolist(), part):
                data[row] = piece
            if masks is not None:
                for row, piece in zip(rows.tolist(), mparts):
                    records[row] = piece
        return b"".join(data), b"".join(records) if masks else None

    async def _run_fetches(
        self, client: aioredis.Redis, plans: list[tuple[np.ndarray, list[str], list[object]]], meta: str | None, *,
        replica: bool,
    ) -> list[Any]:  # fmt: skip
        """One FETCH_RANGES per plan and, with ``meta``, the counters: one pipeline (one batch per node).
        Errors are returned in place of their replies."""
        for attempt in range(2):
            async with client.pipeline(transaction=False) as p:
                for _, gkeys, args in plans:
                    p.execute_command("EVALSHA_RO" if replica else "EVALSHA", self._fetch.sha, len(gkeys), *gkeys, *args)
                if meta is not None:
                    p.hmget(meta, "uid", "num_sequences", "num_chunks")
                replies = await p.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(x, NoScriptError) for x in replies):
                await self._load_everywhere(FETCH_RANGES)
                continue
            break
        return replies

    async def _load_everywhere(self, script: str) -> None:
        """Load ``script`` on every node, replicas included (a promoted replica, or a replica serving reads,
        may not have it)."""
        for client in {id(self.r): self.r, id(self.reader): self.reader}.values():
            await client.execute_command("SCRIPT LOAD", script, target_nodes="all")


def _split(raw: bytes | None) -> list[str]:
    return [x for x in (raw or b"").decode().split(",") if x]


def _counters(reply: Any) -> tuple[str, int, int] | None:
    """(uid, num_sequences, num_chunks) from an HMGET of a dataset's meta (None: no such dataset), or None for
    an error in its place."""
    if isinstance(reply, Exception) or reply[0] is None:
        return None
    uid, nseq, nchunks = reply
    return uid.decode(), int(nseq), int(nchunks)


def _group_of(key: str) -> str:
    """The hash tag of a chunk key (its group)."""
    return key[key.index("{") + 1 : key.index("}")]


def _packed(key_numbers: np.ndarray, pairs: np.ndarray) -> bytes:
    """(key number, offset, count) per sequence as packed uint32 triples (Lua's KEYS are 1-based)."""
    triples = np.empty((len(key_numbers), 3), dtype="<u4")
    triples[:, 0] = key_numbers
    triples[:, 1:] = pairs
    return triples.tobytes()


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
