"""Static-mask caches: their meta in the dataset's slot, their blobs beside the chunks they mask."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from .base import CachesFull, ChunkRef, StoreBase, _u64, decode_meta, pairs


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


class MaskCaches(StoreBase):
    """Open, fill, list and drop static-mask caches."""

    def _register_masks(self, r: aioredis.Redis) -> None:
        self._open_cache = r.register_script(OPEN_MASK_CACHE)
        self._save_masks = r.register_script(SAVE_MASK_CHUNK)
        self._drop_cache = r.register_script(DROP_MASK_CACHE)

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
