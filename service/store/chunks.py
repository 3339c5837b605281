"""Chunks: their keys, the chunk tables, and batch reads (one script per node, fanned out on a cluster)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, NamedTuple

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from .base import ChunkRef, StaleCounters, StoreBase, _counters, _u64
from .keys import group_of, key_slot
from .rowcache import RowCache


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

# FETCH_RANGES for one cluster node: the keys of every chunk group (slot) the node serves, in one call. A script
# with this flag may touch keys of several slots, all served by the node that runs it (Redis >= 7.0, Valkey); the
# keys come after the six arguments, none declared (a cluster refuses declared keys of several slots).
FETCH_RANGES_NODE = (
    "#!lua flags=no-writes,allow-cross-slot-keys\n"
    "local KEYS = {}\nfor i = 7, #ARGV do KEYS[i - 6] = ARGV[i] end\n" + FETCH_RANGES
)
_FETCH_RANGES_NODE_SHA = hashlib.sha1(FETCH_RANGES_NODE.encode()).hexdigest()


def _group_of(key: str) -> str:
    """The hash tag of a chunk key (its group)."""
    return key[key.index("{") + 1 : key.index("}")]

def _packed(key_numbers: np.ndarray, pairs: np.ndarray) -> bytes:
    """(key number, offset, count) per sequence as packed uint32 triples (Lua's KEYS are 1-based)."""
    triples = np.empty((len(key_numbers), 3), dtype="<u4")
    triples[:, 0] = key_numbers
    triples[:, 1:] = pairs
    return triples.tobytes()


class RowsRead(NamedTuple):
    """One dataset's part of a batch read (``ChunkReads.fetch``'s arguments)."""

    rt: ChunkRef
    chunks: np.ndarray
    which: np.ndarray
    entries: np.ndarray
    itemsize: int
    masks: tuple[str, np.ndarray] | None
    word_starts: bool


log = logging.getLogger("maskserve")

#: a read's rows as fetched: a record per row, and a mask record per row (None without masks)
_Pieces = tuple[list[bytes], list[bytes] | None]


def _subset(r: RowsRead, rows: np.ndarray) -> RowsRead:
    """The rows ``rows`` of ``r``, read as whole records (what the row cache keeps)."""
    if len(rows) == len(r.which):
        return r._replace(word_starts=True)
    used, which = np.unique(r.which[rows], return_inverse=True)
    masks = None if r.masks is None else (r.masks[0], r.masks[1][rows])
    return RowsRead(r.rt, r.chunks[used], which.reshape(-1), r.entries[rows], r.itemsize, masks, True)


def _expected(expect: tuple[str, int, int] | None) -> str:
    """FETCH_RANGES' ARGV[6]: the counters to check, or '' for none."""
    return "" if expect is None else f"{expect[0]}:{expect[1]}:{expect[2]}"


def _check_stale(reply: Any) -> None:
    """Raise ``StaleCounters`` (with the current counters) when FETCH_RANGES answered that they moved on."""
    if reply and reply[0] == b"stale":
        uid, nseq, nchunks = (x.decode() for x in reply[1:])
        raise StaleCounters((uid, int(nseq), int(nchunks)) if uid else None)


def _plans(
    labels: np.ndarray, keys: list[str], mkeys: list[str], which: np.ndarray, entries: np.ndarray, itemsize: int,
    masks: tuple[str, np.ndarray] | None, word_starts: bool,
) -> list[tuple[np.ndarray, list[str], list[object]]]:  # fmt: skip
    """One FETCH_RANGES call per distinct label of the chunks (a chunk group, or a node): the batch rows it
    reads (in batch order), its keys (chunks, then their masks) and arguments (no counters)."""
    seq_label = labels[which]
    order = np.argsort(seq_label, kind="stable")
    plans = []
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)  # distinct chunks read by this call
        local = np.zeros(len(keys), dtype=np.int64)
        local[mine] = np.arange(1, len(mine) + 1)
        rows = order[seq_label[order] == label]
        gkeys = [keys[i] for i in mine]
        args: list[object] = [itemsize, len(rows), 1 if word_starts else 0, _packed(local[which[rows]], entries[rows]), b""]
        if masks is not None:
            args[4] = _packed(local[which[rows]] + len(mine), masks[1][rows])
            gkeys += [mkeys[i] for i in mine]
        plans.append((rows, gkeys, [*args, ""]))
    return plans


def _gathered(plans: list[tuple[np.ndarray, list[str], list[object]]], replies: list[Any], b: int,
              masked: bool) -> _Pieces:  # fmt: skip
    """The rows of a batch put back in batch order from the replies of its plans."""
    data: list[bytes] = [b""] * b
    records: list[bytes] = [b""] * b
    for (rows, _, _), (part, mparts) in zip(plans, replies):
        for row, piece in zip(rows.tolist(), part):
            data[row] = piece
        if masked:
            for row, piece in zip(rows.tolist(), mparts):
                records[row] = piece
    return data, records if masked else None


class _Looked:
    """A read's rows as the row cache holds them: their keys (sequence records, then mask records), the records
    found (None where not), the rows missing either."""

    def __init__(self, r: RowsRead, cache: RowCache) -> None:
        uid, b = r.rt.uid, len(r.which)
        positions = r.chunks[r.which]  # each row's chunk table position
        parts = [(uid, "", positions, r.entries)]
        if r.masks is not None:
            parts.append((uid, r.masks[0], positions, r.masks[1]))
        self.keys, self.numbering = cache.keys(parts)
        self.found = cache.get_many(self.keys, self.numbering)  # one lookup for both kinds
        self.b, self.masked = b, r.masks is not None
        if None not in self.found:  # a warm batch: nothing to read
            self.miss = np.empty(0, dtype=np.int64)
            return
        absent = np.array([x is None for x in self.found], dtype=bool).reshape(-1, b).any(axis=0)
        self.miss = np.flatnonzero(absent)

    def fill(self, cache: RowCache, data: list[bytes], recs: list[bytes] | None) -> None:
        """The missing rows as read (whole records), into this read and the cache."""
        rows = self.miss.tolist()
        places = rows + [self.b + i for i in rows] if recs is not None else rows
        pieces = data + recs if recs is not None else data
        for at, piece in zip(places, pieces):
            self.found[at] = piece
        cache.put_many([self.keys[at] for at in places], pieces, self.numbering)

    def joined(self) -> tuple[bytes, bytes | None]:
        """``fetch``'s answer: the rows' whole records back to back, the mask records."""
        found, b = self.found, self.b
        return b"".join(found[:b]), b"".join(found[b:]) if self.masked else None  # type: ignore[arg-type]


class ChunkReads(StoreBase):
    """Read chunks and the sequences of a batch."""

    row_cache: RowCache
    per_node = True  # on a cluster, one script per node (False: one per chunk group, the fallback; see _fetch_fanned)

    def _register_chunks(self, r: aioredis.Redis) -> None:
        self._fetch = r.register_script(FETCH_RANGES)

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
        """Sequences at ``entries`` ((offset, tokens) each) of their chunks: sequence i lies in the chunk at table
        position ``chunks[which[i]]`` (``chunks``: the distinct ones). Those in the process's row cache are taken
        from it; the rest are read in one round trip per node (and kept).

        Returns the sequences back to back (their ids, or with ``word_starts``
        or while the row cache is on (``whole_records``) their whole records,
        as ``packing.assemble`` takes) and, with
        ``masks=(cache id, (offset, pairs) per sequence)``, their static mask
        records back to back (else None). With ``expect`` (the counters the
        batch was drawn from) they are checked in the same round trip, and
        ``StaleCounters`` raised with the current ones when they moved on.
        Whatever was cached, what can change is read: the counters, or without
        ``expect`` the generation's uid (a ``ResponseError`` "missing chunk"
        when it is gone, as a read of its unlinked chunks would answer), and
        the static-mask cache (a "missing masks" one when it was dropped).
        """
        read = RowsRead(rt, chunks, which, entries, itemsize, masks, word_starts)
        return (await self._read([read], expect))[0]

    @property
    def whole_records(self) -> bool:
        """Whether ``fetch`` answers whole records (ids and word-start bits) whatever ``word_starts`` asks: the
        row cache keeps whole records."""
        return self.row_cache.enabled

    async def fetch_rows(self, r: RowsRead, expect: tuple[str, int, int] | None = None) -> tuple[bytes, bytes | None]:
        """``fetch`` of one ``RowsRead``."""
        return (await self._read([r], expect))[0]

    async def fetch_many(self, reads: list[RowsRead]) -> list[tuple[bytes, bytes | None]]:
        """Several ``fetch``es (of any datasets, no counters checked). What is not cached is read on one server
        in one script call when the reads share an id width and a kind of record (one round trip, one script's
        overhead); on a cluster each read's groups are sent as ``fetch`` sends them, all at once."""
        return await self._read(reads, None)

    async def _read(self, reads: list[RowsRead], expect: tuple[str, int, int] | None) -> list[tuple[bytes, bytes | None]]:
        """``fetch`` of each read (``expect``: only with one read), through the row cache when it is on."""
        cache = self.row_cache
        if not cache.enabled:
            return [(b"".join(data), None if recs is None else b"".join(recs))
                    for data, recs in await self._from_redis(reads, expect)]  # fmt: skip
        looked = [_Looked(r, cache) for r in reads]
        todo = [(i, _subset(r, look.miss)) for i, (r, look) in enumerate(zip(reads, looked)) if len(look.miss)]
        whole = [r for r, look in zip(reads, looked) if not len(look.miss)]
        fetched, _ = await asyncio.gather(  # the missing rows; what can change about the rows found
            self._from_redis([sub for _, sub in todo], expect), self._verify(whole, expect))
        for (i, _), (data, recs) in zip(todo, fetched):
            looked[i].fill(cache, data, recs)
        return [look.joined() for look in looked]

    async def _verify(self, reads: list[RowsRead], expect: tuple[str, int, int] | None) -> None:
        """Of reads served from the cache, what can change, in one round trip: the counters (``expect``) or the
        generation's uid, and the static-mask cache's existence. Raises as a script read of their rows would."""
        if not reads:
            return
        commands: list[tuple[object, ...]] = []
        for r in reads:
            commands.append(("HMGET", self.keys.ds(r.rt.name, "meta"), "uid", "num_sequences", "num_chunks"))
            if r.masks is not None:
                commands.append(("EXISTS", self.keys.mask_meta(r.rt.name, r.masks[0])))
        if len(commands) == 1:  # one command alone: about a quarter less of redis-py's CPU than a pipeline of one
            replies = iter([await self.r.execute_command(*commands[0])])
        else:
            async with self.r.pipeline(transaction=False) as p:
                for command in commands:
                    p.execute_command(*command)
                replies = iter(await p.execute())
        for r in reads:
            current = _counters(next(replies))
            if expect is not None and current != expect:
                raise StaleCounters(current)
            if current is None or current[0] != r.rt.uid:
                raise ResponseError(f"missing chunk: generation {r.rt.uid} of dataset {r.rt.name!r} is gone")
            if r.masks is not None and not next(replies):
                raise ResponseError(f"missing masks: cache {r.masks[0]} of dataset {r.rt.name!r} was dropped")

    async def _from_redis(self, reads: list[RowsRead], expect: tuple[str, int, int] | None) -> list[_Pieces]:
        """Each read's rows from Redis, as pieces (a record per row; mask records, or None)."""
        if not reads:
            return []
        if len(reads) == 1:
            return [await self._fetch_one(reads[0], expect)]
        if self.cluster or len({(r.itemsize, r.word_starts, r.masks is None) for r in reads}) > 1:
            return list(await asyncio.gather(*(self._fetch_one(r, None) for r in reads)))
        keys, mkeys, triples, mtriples = [], [], [], []
        for r in reads:
            positions = r.chunks.tolist()
            triples.append(_packed(r.which + 1 + len(keys), r.entries))
            keys += self.chunk_keys(r.rt, positions)
            if r.masks is not None:
                mtriples.append((r.which + 1 + len(mkeys), r.masks[1]))
                mkeys += self.chunk_keys(r.rt, positions, r.masks[0])
        first = reads[0]
        b = sum(len(r.which) for r in reads)
        masked = b"".join(_packed(k + len(keys), pairs) for k, pairs in mtriples)
        args = [first.itemsize, b, 1 if first.word_starts else 0, b"".join(triples), masked, ""]
        data, records = await self._fetch(keys=[*keys, *mkeys, self.keys.ds(first.rt.name, "meta")], args=args)
        out, at = [], 0
        for r in reads:
            upto = at + len(r.which)
            out.append((data[at:upto], records[at:upto] if r.masks is not None else None))
            at = upto
        return out

    async def _fetch_one(self, r: RowsRead, expect: tuple[str, int, int] | None) -> _Pieces:
        """One read from Redis: one script call on one server, one per chunk group on a cluster."""
        positions = r.chunks.tolist()
        keys = self.chunk_keys(r.rt, positions)
        mkeys = self.chunk_keys(r.rt, positions, r.masks[0]) if r.masks is not None else []
        if self.cluster:
            return await self._fetch_fanned(r.rt, keys, mkeys, r.which, r.entries, r.itemsize, r.masks,
                                            r.word_starts, expect)  # fmt: skip
        args: list[object] = [r.itemsize, len(r.which), 1 if r.word_starts else 0, _packed(r.which + 1, r.entries), b""]
        if r.masks is not None:
            args[4] = _packed(r.which + 1 + len(keys), r.masks[1])
        args.append(_expected(expect))
        reply = await self._fetch(keys=[*keys, *mkeys, self.keys.ds(r.rt.name, "meta")], args=args)
        _check_stale(reply)
        data, records = reply
        return data, records if r.masks is not None else None

    async def _fetch_fanned(
        self, rt: ChunkRef, keys: list[str], mkeys: list[str], which: np.ndarray, entries: np.ndarray,
        itemsize: int, masks: tuple[str, np.ndarray] | None, word_starts: bool, expect: tuple[str, int, int] | None,
    ) -> _Pieces:  # fmt: skip
        """The cluster's fetch: one FETCH_RANGES_NODE per master holding chunks of the batch (the one holding the
        dataset's meta checks ``expect`` in the same call), all nodes at once: one command and one round trip per
        node. Where that cannot run (replica reads, a slot moving, a server without script flags), one
        FETCH_RANGES per chunk group and the counters, in one pipeline the client sends as one batch per node."""
        meta = self.keys.ds(rt.name, "meta") if expect is not None else None
        tags = [_group_of(key) for key in keys]  # the group's tag, per distinct chunk
        if self.per_node and not self.replica_reads:
            found = await self._fetch_by_node(keys, mkeys, tags, which, entries, itemsize, masks, word_starts, meta,
                                              expect)  # fmt: skip
            if found is not None:
                return found
        plans = _plans(np.array(tags), keys, mkeys, which, entries, itemsize, masks, word_starts)
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
        return _gathered(plans, replies, len(which), masks is not None)

    async def _fetch_by_node(
        self, keys: list[str], mkeys: list[str], tags: list[str], which: np.ndarray, entries: np.ndarray,
        itemsize: int, masks: tuple[str, np.ndarray] | None, word_starts: bool, meta: str | None,
        expect: tuple[str, int, int] | None,
    ) -> _Pieces | None:  # fmt: skip
        """``_fetch_fanned``'s one call per node; None when it could not run (the caller reads by group)."""
        manager = self.r.nodes_manager  # type: ignore[attr-defined]
        nodes = {}
        labels = []
        for tag in tags:
            node = manager.get_node_from_slot(key_slot(tag))
            nodes[node.name] = node
            labels.append(node.name)
        plans = _plans(np.array(labels), keys, mkeys, which, entries, itemsize, masks, word_starts)
        names = [str(label) for label in np.unique(labels)]  # the plans' nodes, in the plans' order
        if meta is not None:  # the counters are checked by the script of the node that holds them
            node = manager.get_node_from_slot(self.r.keyslot(meta))  # type: ignore[attr-defined]
            holder = node.name
            if holder not in nodes:
                plans.append((np.empty(0, dtype=np.int64), [], [itemsize, 0, 0, b"", b"", ""]))
                names.append(holder)
                nodes[holder] = node
            at = names.index(holder)
            rows, gkeys, args = plans[at]
            plans[at] = (rows, [*gkeys, meta], [*args[:5], _expected(expect)])
        for attempt in range(2):
            # straight to each node's connections: the cluster client's routing, retry and policy layers would
            # add about a tenth of the call, and any failure here falls back to the group path, which has them
            replies = await asyncio.gather(*(
                nodes[name].execute_command("EVALSHA", _FETCH_RANGES_NODE_SHA, 0, *args, *gkeys)
                for (_, gkeys, args), name in zip(plans, names)), return_exceptions=True)  # fmt: skip
            if attempt == 0 and any(isinstance(x, NoScriptError) for x in replies):
                await self._load_everywhere(FETCH_RANGES_NODE)
                continue
            break
        for x in replies:
            if isinstance(x, ResponseError) and str(x).startswith("missing "):
                raise x  # a chunk gone, as on one server
            if isinstance(x, BaseException):
                if isinstance(x, ResponseError) and ("flag" in str(x) or "shebang" in str(x)):
                    log.warning("the cluster cannot run one script per node (%s): chunk reads go by group", x)
                    self.per_node = False
                log.debug("one script per node failed (%r): reading by group", x)
                return None  # a slot moving, a node failing: the group path follows the redirections
            _check_stale(x)
        return _gathered(plans, replies, len(which), masks is not None)

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
