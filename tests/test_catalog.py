"""The per-process catalog of datasets: bounded, least recently used out first."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from service.data.catalog import Catalog
from service.store.store import Store


def test_the_catalog_keeps_the_most_recently_used_datasets(client, settings, redis_url, bpe_tokenizer):
    a, b, c, d = names = [f"lru{k}-{uuid.uuid4().hex[:8]}" for k in range(4)]
    for name in names:
        client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        catalog = Catalog(Store(r, settings.key_prefix), max_entries=3)
        first = {name: await catalog.runtime(name) for name in (a, b, c)}
        assert await catalog.runtime(a) is first[a]  # used again: b is now the least recently used
        await catalog.runtime(d)
        assert await catalog.runtime(a) is first[a]  # kept
        assert await catalog.runtime(c) is first[c]
        assert catalog.cached() == [d, a, c]  # b went, least recently used first
        assert await catalog.runtime(b) is not first[b]  # loaded again, d out
        assert catalog.cached() == [a, c, b]
        for _ in range(4):  # generation after generation of one name: one entry, one lock, still bounded
            client.delete_dataset(a)
            client.create_dataset(a, tokenizer=bpe_tokenizer, seq_len=64)
            rt = await catalog.current(a)
            assert (await catalog.tokenizer(rt)).vocab_size > 0
            assert len(catalog.cached()) <= 3
        assert catalog.cached()[-1] == a
        await r.aclose()

    asyncio.run(main())
