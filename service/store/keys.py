"""Every Redis key name of the service, and where (which cluster slot) each one lives.

docs/storage.md describes this layout for users and operators.

``P`` is the configured prefix; ``{...}`` is a hash tag, the part of the name
Redis Cluster hashes to pick the key's slot. Three kinds of slot::

    the dataset's slot, tag {D} (D = dataset name): its metadata, counters, chunk tables,
        tokenizer, idempotency records, staging set, frequency tables, static-mask cache metas,
        the names of its jobs, and the trash of its deleted generations
    a chunk group's slot, tag {T} (T = the group's slot tag): chunk blobs and their static masks
    the job's slot, tag {J} (J = job name): every key of one job

    P:ingests:running                   HASH   ingest id -> JSON progress of an ingest running now (any dataset;
                                               each refreshed while it runs, removed when it ends; readers drop
                                               those not refreshed lately)
    P:datasets                          SET    dataset names (a hint: added before a dataset is created and
                                               removed after it is deleted; listing skips names without meta)
    P:ds:{D}:meta                       HASH   config and counters (see DatasetMeta); chunk_groups: G
    P:ds:{D}:tokenizer                  STRING tokenizer.json, zlib-compressed
    P:ds:{D}:chunks                     STRING uint64 LE: first sequence id of each committed chunk, in order
    P:ds:{D}:chunk_ids                  STRING uint64 LE: the chunk id at each position of that table
    P:ds:{D}:idem                       HASH   idempotency key -> JSON result of a committed ingest
    P:ds:{D}:idem:due                   ZSET   idempotency key -> when its record expires (ms); both keys
                                               expire with their newest record
    P:ds:{D}:ingests                    HASH   the records of earlier versions (read only, expiring)
    P:ds:{D}:staging                    ZSET   chunk id -> deadline (ms): chunks staged by ingests in flight
    P:ds:{D}:pending:<key>              STRING JSON: an ingest staged under idempotency key <key>, not yet
                                               committed (its chunk ids, counts, token counts); expires
                                               with its staged chunks
    P:ds:{D}:freq / :freq:frozen        STRING token counts (BITFIELD u32) / the copy frozen at first use
    P:ds:{D}:sm                         SET    ids of the static-mask caches
    P:ds:{D}:sm:<cache>:meta            HASH   a cache's config, seed, copies, chunks built, bytes
    P:ds:{D}:jobs                       SET    names of the dataset's jobs
    P:ds:{D}:trash                      SET    uids of deleted generations whose keys are not all gone yet
    P:ds:{D}:trash:<uid>                HASH   what such a generation left in other slots (chunk ids, caches,
                                               staged chunk ids, jobs)
    P:c:{T}:<uid>:<id>                  STRING chunk <id> of dataset generation <uid> (layout in packing.py)
    P:c:{T}:<uid>:<id>:sm:<cache>       STRING static masks of that chunk (layout in static.py)
    P:job:{J}...                        the job's keys (jobkeys.py has their layout)

**Chunk ids.** Chunk j of an ingest gets id ``nonce << 24 | j``, the nonce a
random 39-bit number per ingest (a staged chunk is written only if its id is
not staged and its key is free; else it takes a fresh nonce), so staging
changes no counter: a failed ingest leaves the dataset's slot exactly as it was.
**Chunk groups.** Chunk ``id`` belongs to group
``(nonce + j) mod G`` (G fixed per dataset at creation): the chunks of one
ingest go round the groups in turn. Group g's tag is a short string chosen so that its slot
is ``(s0 + (g * q mod G) * 16384 / G) mod 16384``, with ``s0`` the slot of the
dataset's uid and q a step coprime with G near G / 1.618: a dataset's groups
sit at evenly spaced slots, and any run of consecutive groups (the chunks of
one ingest) is spread round the whole ring. So on a cluster whose masters own
contiguous slot ranges (what ``redis-cli --cluster create`` and rebalancing
make) a dataset's chunks, bytes and read load spread evenly over all masters. Chunk keys carry the dataset's uid, not its name, so a re-created
dataset never meets a deleted one's chunks.
"""

from __future__ import annotations

import binascii
import functools
import math
from dataclasses import dataclass

SLOTS = 16384


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """A short hash tag for every cluster slot: ``slot_tags()[s]`` hashes to slot s.

    Built once per process (about 0.2 s; the app builds it off the event loop at start-up)."""
    table: list[str | None] = [None] * SLOTS
    left, i = SLOTS, 0
    while left:
        tag = format(i, "x")
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if table[slot] is None:
            table[slot] = tag
            left -= 1
        i += 1
    return tuple(t for t in table if t is not None)


def chunk_id_of(nonce: int, j: int) -> int:
    return nonce << 24 | j


def group_of(chunk_id: int, groups: int) -> int:
    """The group of a chunk id: consecutive chunks of one ingest fall in consecutive groups."""
    return ((chunk_id >> 24) + (chunk_id & 0xFFFFFF)) % groups


def key_slot(tag: str) -> int:
    """The cluster slot of a hash tag (CRC16/XMODEM mod 16384, as Redis Cluster computes it)."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def index(self) -> str:
        return f"{self.prefix}:datasets"

    @property
    def running_ingests(self) -> str:
        return f"{self.prefix}:ingests:running"

    def ds(self, name: str, part: str) -> str:
        return f"{self.prefix}:ds:{{{name}}}:{part}"

    def trash(self, name: str, uid: str) -> str:
        return self.ds(name, f"trash:{uid}")

    def mask_meta(self, name: str, cache: str) -> str:
        return self.ds(name, f"sm:{cache}:meta")

    def chunk_prefixes(self, uid: str, groups: int) -> tuple[str, ...]:
        """``chunk_prefixes(uid, G)[id % G] + str(id)`` is chunk id's key."""
        return _chunk_prefixes(self.prefix, uid, groups)

    def chunk(self, uid: str, groups: int, chunk_id: int) -> str:
        return f"{self.chunk_prefixes(uid, groups)[group_of(chunk_id, groups)]}{chunk_id}"

    def job(self, job: str) -> str:
        return f"{self.prefix}:job:{{{job}}}"



def _stride(groups: int) -> int:
    """A step coprime with ``groups`` near groups / golden ratio: consecutive groups land far apart on the ring."""
    step = max(1, round(groups / 1.618))
    while math.gcd(step, groups) != 1:
        step += 1
    return step


@functools.lru_cache(maxsize=4096)
def _chunk_prefixes(prefix: str, uid: str, groups: int) -> tuple[str, ...]:
    tags = slot_tags()
    first, stride = key_slot(uid), _stride(groups)
    slots = ((first + (g * stride % groups) * SLOTS // groups) % SLOTS for g in range(groups))
    return tuple(f"{prefix}:c:{{{tags[slot]}}}:{uid}:" for slot in slots)
