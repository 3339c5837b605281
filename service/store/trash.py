"""Deleting a dataset across slots (retire, then empty the trash node by node), and the dataset's list of jobs."""

from __future__ import annotations

import redis.asyncio as aioredis

from .base import StoreBase, _u64
from .jobstore import DELETE_JOB


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

# KEYS[1]: meta, KEYS[2]: job set; ARGV[1]: dataset uid, ARGV[2]: job name
# returns 1 when the job is now listed with the dataset, 0 when the dataset is gone or replaced
ADD_JOB = """
if redis.call('HGET', KEYS[1], 'uid') ~= ARGV[1] then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# the dataset's keys in its own slot that RETIRE_DATASET removes besides those it names one by one
_FIXED = ("tokenizer", "chunks", "ingests", "idem", "idem:due", "freq", "freq:frozen")

_RETIRE_TRIES = 16


def _split(raw: bytes | None) -> list[str]:
    return [x for x in (raw or b"").decode().split(",") if x]


class Trash(StoreBase):
    """Delete datasets, empty their trash, and list a dataset's jobs."""

    def _register_trash(self, r: aioredis.Redis) -> None:
        self._retire = r.register_script(RETIRE_DATASET)
        self._add_job = r.register_script(ADD_JOB)
        self._delete_job = r.register_script(DELETE_JOB)

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

    async def add_job(self, name: str, uid: str, job: str) -> bool:
        """List ``job`` with its dataset (False: the dataset is gone or replaced)."""
        k = self.keys
        return bool(await self._add_job(keys=[k.ds(name, "meta"), k.ds(name, "jobs")], args=[uid, job]))

    async def delete_job(self, job: str, dataset_uid: str = "") -> int:
        """Delete the job's keys (only if it reads generation ``dataset_uid``, when given); returns keys removed."""
        jk = self.job_keys
        for _ in range(_RETIRE_TRIES):
            epoch, top = await self.r.hmget(jk.job(job), ["epoch", "acked_top"])  # top: acked ahead, after a roll back
            epochs = max(int(epoch), int(top or -1)) + 1 if epoch is not None else 0
            n = int(await self._delete_job(keys=jk.all_keys(job, epochs), args=[dataset_uid, epochs]))
            if n != -2:  # -2: the job entered another epoch meanwhile
                if n > 0:
                    await self.r.unlink(jk.stats(job))  # its workers' summaries (they expire by themselves too)
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
