"""The process's chunk cache (sequence and static-mask records): bounded, invisible in what is served.

A warm batch reads no row from Redis (only what can change: the counters, the
generation, the mask cache), serves the bytes a process without the cache
serves, and a delete, a re-creation or a dropped mask cache is seen at once
by every process, whatever it cached.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from client import Client, decode
from service.core.config import Settings
from service.store.rowcache import ENTRY_OVERHEAD, OFFSET_BITS, POSITION_BITS, RowCache

from .conftest import ServerThread, metric, service_env

SEQ_LEN = 64
B = 16


def _evalsha_calls(rdb: redis.Redis) -> int:
    stats = rdb.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def _body(url: str, name: str, **params: object) -> bytes:
    """A served batch's arrays (safetensors body, so the exact bytes), the metadata left out."""
    r = httpx.get(f"{url}/v1/datasets/{name}/batch", params={"size": B, "seed": 7, **params}, timeout=60)
    assert r.status_code == 200, r.text
    arrays, _ = decode(r.content)
    return b"".join(arrays[k].tobytes() for k in sorted(arrays))


def _server(redis_url: str, **overrides: object) -> ServerThread:
    return ServerThread(Settings(redis_url=redis_url, max_batch_size=1024, chunk_bytes=16 << 10,
                                 chunk_max_sequences=64, **overrides))  # fmt: skip


@pytest.fixture
def pair(redis_url: str, rdb: redis.Redis) -> Iterator[tuple[str, str]]:
    """Two services on one Redis: one with the cache (the default), one without."""
    with _server(redis_url) as cached, _server(redis_url, chunk_cache_bytes=0) as plain:
        yield cached.url, plain.url


OPTIONS = [
    {"mlm_probability": 0.15},
    {"unit": "whole_word"},
    {"unit": "span", "count": "exact"},
    {"mode": "static", "copies": 3},
]


def _records(cache: RowCache, n: int, position: int = 7) -> list[int]:
    """The keys of ``n`` one-token records, back to back in the chunk at table ``position`` of generation "u"."""
    entries = np.stack([np.arange(n), np.ones(n)], axis=1).astype("<u4")
    return cache.keys([("u", "", np.full(n, position), entries)])[0]


def _kept(cache: RowCache, keys: list[int]) -> set[int]:
    """The indexes of ``keys`` the cache holds (looking them up counts as using them)."""
    return {i for i, v in enumerate(cache.get_many(keys, cache.numbering)) if v is not None}


def _put(cache: RowCache, keys: list[int], values: list[bytes]) -> None:
    cache.put_many(keys, values, cache.numbering)


def test_the_cache_keeps_at_most_its_bytes_and_what_was_used_since_the_last_turnover():
    cache = RowCache(4 * (100 + ENTRY_OVERHEAD))
    keys = _records(cache, 8)
    _put(cache, keys[:4], [bytes([i]) * 100 for i in range(4)])
    assert len(cache) == 4 and cache.bytes == cache.max_bytes
    assert cache.get_many(keys[:2], cache.numbering) == [bytes([0]) * 100, bytes([1]) * 100]
    # room for two more: a turnover makes the four the old generation, and two of them go
    _put(cache, keys[4:6], [b"x" * 100, b"y" * 100])
    assert cache.bytes == cache.max_bytes and len(cache) == 4
    assert {4, 5} <= _kept(cache, keys[:6])  # the records just stored stay
    survivors = _kept(cache, keys[:4])  # two of the first four, now used again (young)
    assert len(survivors) == 2
    # room for two more: from the old generation, which now holds none of the records used since the turnover
    _put(cache, keys[6:8], [b"p" * 100, b"q" * 100])
    assert _kept(cache, keys) == {6, 7} | (_kept(cache, keys[:6]) & ({4, 5} | survivors))
    assert len(cache) == 4 and cache.bytes <= cache.max_bytes
    big = _records(cache, 1, position=99)
    _put(cache, big, [b"z" * cache.max_bytes])  # larger than the whole bound: not kept
    assert cache.get_many(big, cache.numbering) == [None] and cache.bytes <= cache.max_bytes
    off = RowCache(0)
    _put(off, keys[:1], [b"a"])
    assert not off.enabled and off.get_many(keys[:1], off.numbering) == [None]


def test_a_record_used_since_the_last_turnover_outlives_every_one_that_was_not():
    cache = RowCache(6 * (100 + ENTRY_OVERHEAD))
    keys = _records(cache, 12, position=1)
    _put(cache, keys[:6], [b"a" * 100] * 6)
    _put(cache, keys[6:7], [b"b" * 100])  # a turnover: 0..5 old, one of them dropped for 6
    assert _kept(cache, keys[:3]) == {0, 1, 2}  # found in the old generation: young again
    _put(cache, keys[7:9], [b"c" * 100] * 2)  # room for two: the old generation's last two (of 3..5)
    assert _kept(cache, keys) == {0, 1, 2, 6, 7, 8}
    _put(cache, keys[9:10], [b"d" * 100])  # the old generation is empty: another turnover, one goes
    assert len(_kept(cache, keys)) == 6 and 9 in _kept(cache, keys)


def test_keys_tell_every_generation_kind_chunk_and_record_apart():
    """One integer holds a record's parts exactly: no two records share a key, whatever the strings split, for
    positions and offsets inside the packed layout and past it, and for an empty record and the next one at
    its offset; a record's key is the same each time it is asked for."""
    cache = RowCache(1 << 20)
    positions = [0, 1, (1 << POSITION_BITS) - 1, 1 << POSITION_BITS, (1 << 40) + 3]
    entries = np.array([[0, 0], [0, 5], [5, 0], [5, 1], [(1 << OFFSET_BITS) - 1, 2], [1 << OFFSET_BITS, 1],
                        [(1 << 32) - 1, 7]], dtype="<u4")  # fmt: skip
    pairs = [("ab", "c"), ("a", "bc"), ("abc", ""), ("ab", ""), ("", "abc"), ("a" * 32, "f" * 16)]
    parts = [(uid, kind, np.full(len(entries), p), entries) for uid, kind in pairs for p in positions]
    keys, numbering = cache.keys(parts)
    assert len(set(keys)) == len(keys) == len(pairs) * len(positions) * len(entries)
    assert cache.keys(parts) == (keys, numbering)  # found again
    mixed = cache.keys([("ab", "c", np.full(len(entries), 1), entries)])[0]
    assert all(0 <= k < 1 << 63 for k in mixed[:5]) and all(k >= 1 << 64 for k in mixed[5:])  # offsets past 2^29
    alone = [cache.keys([("ab", "c", np.ones(1), entries[i : i + 1])])[0][0] for i in range(len(entries))]
    assert alone == mixed  # a record's key does not depend on the other records of its batch


def test_when_pair_numbers_run_out_the_cache_starts_over_and_older_keys_find_and_store_nothing():
    cache = RowCache(1 << 20)
    cache.max_pairs = 2
    one = np.array([[0, 4]], dtype="<u4")
    first, numbering = cache.keys([("g1", "", np.zeros(1), one)])
    cache.put_many(first, [b"g1 bytes"], numbering)
    cache.keys([("g2", "", np.zeros(1), one)])
    assert cache.get_many(first, numbering) == [b"g1 bytes"]
    # a third pair: the numbers are drawn afresh, and g3 gets the number g1 had
    third, renumbered = cache.keys([("g3", "", np.zeros(1), one)])
    assert renumbered != numbering and third == first and len(cache) == 0
    cache.put_many(first, [b"g1 bytes"], numbering)  # a read of the old numbering, finishing late
    assert cache.get_many(third, renumbered) == [None]  # never another generation's bytes
    cache.put_many(third, [b"g3 bytes"], renumbered)
    assert cache.get_many(first, numbering) == [None] and cache.get_many(third, renumbered) == [b"g3 bytes"]
    # g3's record in the old generation (a turnover made room for another): still not found by g1's key
    cache.put_many(cache.keys([("g3", "", np.ones(1), one)])[0], [b"a" * 10], renumbered)
    cache.max_bytes = cache.bytes
    cache.put_many(cache.keys([("g3", "", np.full(1, 2), one)])[0], [b"b" * 10], renumbered)
    assert cache.get_many(first, numbering) == [None]
    assert cache.get_many(third, renumbered) == [b"g3 bytes"]  # it was in the old generation


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_a_warm_batch_reads_no_rows_from_redis_and_serves_the_same_bytes(pair, rdb, bpe_tokenizer, corpus, options):
    cached, plain = pair
    name = f"cc-{uuid.uuid4().hex[:10]}"
    with Client(cached) as c:
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        c.ingest(name, corpus[:150])
        if options.get("mode") == "static":
            c.build_static_masks(name, seed=7, copies=3)
    for index in range(3):
        first = _body(cached, name, index=index, **options)
        misses = metric(cached, "maskserve_chunk_cache_misses_total")
        hits = metric(cached, "maskserve_chunk_cache_hits_total")
        scripts = _evalsha_calls(rdb)
        again = _body(cached, name, index=index, **options)
        assert _evalsha_calls(rdb) == scripts  # no script read a row: only the counters were asked
        assert metric(cached, "maskserve_chunk_cache_misses_total") == misses
        records = B * (2 if options.get("mode") == "static" else 1)
        assert metric(cached, "maskserve_chunk_cache_hits_total") == hits + records
        assert first == again == _body(plain, name, index=index, **options)
    assert 0 < metric(cached, "maskserve_chunk_cache_bytes") <= Settings().chunk_cache_bytes


def test_a_cache_smaller_than_the_dataset_stays_in_its_bound_and_serves_the_same_bytes(redis_url, rdb, bpe_tokenizer,
                                                                                          corpus):  # fmt: skip
    bound = 40 * (SEQ_LEN * 2 + 8 + ENTRY_OVERHEAD)  # about 40 sequences of the dataset's ~600
    with _server(redis_url, chunk_cache_bytes=bound) as small, _server(redis_url, chunk_cache_bytes=0) as plain:
        name = f"cc-{uuid.uuid4().hex[:10]}"
        with Client(small.url) as c:
            c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
            c.ingest(name, corpus[:150])
            batches = -(-c.dataset(name)["num_sequences"] // B)
        for index in [*range(batches), *range(batches)]:
            assert _body(small.url, name, index=index) == _body(plain.url, name, index=index)
            assert metric(small.url, "maskserve_chunk_cache_bytes") <= bound
        scanned = metric(small.url, "maskserve_chunk_cache_hits_total")
        assert scanned < 2 * batches * B / 4  # a scan over many times the bound finds little in it
        _body(small.url, name, index=0)
        _body(small.url, name, index=0)  # the last batch read is still there
        assert metric(small.url, "maskserve_chunk_cache_hits_total") == scanned + B


def test_a_dropped_static_cache_is_refused_though_its_records_are_cached(client, service_url, bpe_tokenizer, corpus):
    name = f"cc-{uuid.uuid4().hex[:10]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    client.ingest(name, corpus[:100])
    built = client.build_static_masks(name, seed=7, copies=3)
    _body(service_url, name, index=0, mode="static", copies=3)
    _body(service_url, name, index=0, mode="static", copies=3)  # served from the cache
    client.drop_static_masks(name, built["cache"])
    r = httpx.get(f"{service_url}/v1/datasets/{name}/batch",
                  params={"size": B, "seed": 7, "index": 0, "mode": "static", "copies": 3})  # fmt: skip
    assert r.status_code == 409 and r.json()["type"] == "urn:maskserve:problem:static-masks-missing", r.text
    assert name in r.json()["detail"]


def test_every_process_serves_a_re_created_dataset_as_it_is_now(spawn_service, redis_url, rdb, bpe_tokenizer, corpus):
    """Two worker processes cache a dataset's rows; it is deleted and created again under its name with other
    documents: every answer, from either process, is the new generation's (as a process without the cache
    serves it), none the old one's."""
    svc = spawn_service(service_env(REDIS_URL=redis_url), workers=2)
    plain = spawn_service(service_env(REDIS_URL=redis_url, MASKSERVE_CHUNK_CACHE_BYTES="0"))
    name = f"cc-{uuid.uuid4().hex[:10]}"

    def served(url: str) -> list[bytes]:
        return [_body(url, name, index=i) for i in range(4)]  # a new connection each: spread over the processes

    with Client(svc.url) as c:
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        c.ingest(name, corpus[:150])
        old = served(svc.url)
        for _ in range(4):
            assert served(svc.url) == old  # both processes now hold these rows
        c.delete_dataset(name)
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        c.ingest(name, corpus[150:300])
    now = served(plain.url)
    assert all(a != b for a, b in zip(now, old))
    for _ in range(6):
        assert served(svc.url) == now
