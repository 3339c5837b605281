"""The job scripts driven directly (service.jobs.jobs.Jobs over a real Redis): edges of request ids, take-backs,
eviction, retired workers and endings that are hard to reach through HTTP timing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from service.jobs.jobs import JobConfig, Jobs
from service.store.store import Store

from .rollback import Drill, assert_converged, roll_back, snapshot

DATASET = "d"


def run(redis_url: str, body: Callable[[Jobs, aioredis.Redis], Awaitable[Any]], **jobs_kw: Any) -> Any:
    async def main() -> Any:
        r = aioredis.from_url(redis_url)
        try:
            await r.hset(f"ms:ds:{{{DATASET}}}:meta", mapping={"uid": "u1"})
            return await body(Jobs(r, "ms", **jobs_kw), r)
        finally:
            await r.aclose()

    return asyncio.run(main())


async def _create(jobs: Jobs, name: str = "j", *, bpe: int = 8, lease_s: float = 60, epochs: int | None = 1) -> None:
    cfg = JobConfig(dataset=DATASET, batch_size=4, epochs=epochs, lease_timeout_s=lease_s)
    assert (await jobs.create(name, cfg, "u1", 4 * bpe, bpe, 1))[0] == "created"


async def _redis_ms(r: aioredis.Redis) -> int:
    sec, usec = await r.time()
    return sec * 1000 + usec // 1000


def test_a_retry_after_the_lease_expired_gets_a_live_lease(redis_url: str, rdb: redis.Redis):
    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs, lease_s=0.05)
        first = (await jobs.next(DATASET, "j", "w", [], "r1")).lease
        while await _redis_ms(r) <= first.expires_ms:  # the answer was lost; the retry comes after the expiry
            await asyncio.sleep(0.01)
        again = (await jobs.next(DATASET, "j", "w", [], "r1")).lease
        assert again.lease != first.lease and again.expires_ms > await _redis_ms(r)
        assert (again.epoch, again.index) == (first.epoch, first.index) and again.redelivered

    run(redis_url, body)


def test_a_grant_answered_again_is_never_taken_back(redis_url: str, rdb: redis.Redis):
    """Replica A granted a lease and failed to build the batch; meanwhile the client's retry of the same request
    was answered with that lease by replica B. A's take-back must leave it with the worker."""

    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs)
        taken = (await jobs.next(DATASET, "j", "w", [], "once")).lease
        assert await jobs.ungrant(DATASET, "j", "w", taken)  # answered once only: it can be taken back
        granted = (await jobs.next(DATASET, "j", "w", [], "twice")).lease
        replayed = (await jobs.next(DATASET, "j", "w", [], "twice")).lease
        assert replayed.lease == granted.lease
        assert not await jobs.ungrant(DATASET, "j", "w", granted)
        other = (await jobs.next(DATASET, "j", "v", [])).lease
        assert (other.epoch, other.index) != (granted.epoch, granted.index)  # not handed to a second worker

    run(redis_url, body)


def test_released_or_evicted_leases_do_not_answer_their_old_request_ids(redis_url: str, rdb: redis.Redis):
    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs)
        a = (await jobs.next(DATASET, "j", "w", [], "ra")).lease
        b = (await jobs.next(DATASET, "j", "w", [], "rb")).lease
        assert await jobs.release(DATASET, "j", "w", [a.lease]) == 1
        assert await jobs.evict(DATASET, "j", "w") == 1  # b
        for rid, old in (("ra", a), ("rb", b)):
            again = (await jobs.next(DATASET, "j", "w", [], rid)).lease
            assert again.lease != old.lease  # a new grant, not the given-back lease
        assert await r.hlen(jobs.keys.lease_keys("j")[6]) == 2  # one entry per live lease, no more

    run(redis_url, body)


def test_a_retired_worker_s_late_request_is_not_in_order(redis_url: str, rdb: redis.Redis):
    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs)
        assert (await jobs.next(DATASET, "j", "w", [], seq=200)).lease.in_order
        await jobs.next(DATASET, "j", "v", [], seq=5)  # the limit of one worker retires w
        assert (await r.hgetall(jobs.keys.lease_keys("j")[3])).get(b"w:seq") is None
        late = (await jobs.next(DATASET, "j", "w", [], seq=100)).lease  # sent before the one numbered 200
        assert not late.in_order
        assert (await jobs.next(DATASET, "j", "w", [], seq=300)).lease.in_order

    run(redis_url, body, max_workers=1)


def test_a_cancelled_job_stays_cancelled_when_its_last_leases_are_acked(redis_url: str, rdb: redis.Redis):
    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs, bpe=2)
        leases = [(await jobs.next(DATASET, "j", "w", [])).lease for _ in range(2)]
        assert await jobs.cancel(DATASET, "j")
        assert await jobs.ack(DATASET, "j", "w", [x.lease for x in leases]) == ["acked", "acked"]
        assert (await jobs.state(DATASET, "j"))["status"] == "cancelled"

    run(redis_url, body)


# ---- a job whose keys roll back (a failover, or a restart from an AOF that lost its last writes) -------------


def test_a_job_converges_after_its_keys_roll_back_under_held_leases(redis_url: str, rdb: redis.Redis):
    """Grants made after the state the job's keys roll back to are lost while workers still hold them: the
    workers' late acks count once, the cursor skips what they acked, and the job ends."""

    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        bpe, epochs = 10, 2
        await _create(jobs, bpe=bpe, epochs=epochs)
        drill = Drill(jobs, r, 4)
        await drill.rounds(2)  # 8 batches handed out, 4 acked; each worker holds one
        taken = await snapshot(r, jobs, epochs)
        before = Counter(drill.granted)
        await drill.rounds(2, ack=False)  # the lost window: 8 more grants, across the epoch boundary
        lost = set(drill.granted - before)
        assert {e for e, _ in lost} == {0, 1}
        await roll_back(r, taken)
        assert (await jobs.state(DATASET, "j"))["next"] == 8
        for w in drill.workers[:2]:  # these ack at once, the others with their next request
            await drill.ack_all(w)
        await drill.drain(max_rounds=4 * bpe * epochs)
        await assert_converged(drill, bpe, epochs, lost)

    run(redis_url, body)


def test_a_duplicate_ack_ends_the_lease_on_its_batch(redis_url: str, rdb: redis.Redis):
    """A lease on a batch that is already acked (left by a roll back under an earlier version) trains nothing
    new: its ack answers ``duplicate`` and ends it, and the job then ends."""

    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        await _create(jobs, bpe=2)
        a, b = [(await jobs.next(DATASET, "j", "w", [])).lease for _ in range(2)]
        taken = await snapshot(r, jobs, 1)
        assert await jobs.ack(DATASET, "j", "w", [a.lease]) == ["acked"]
        acked_bits = await r.dump(jobs.keys.acked("j", 0))
        counters = await r.hgetall(jobs.keys.job("j"))
        await roll_back(r, taken)  # a's lease back, with its batch acked
        await r.restore(jobs.keys.acked("j", 0), 0, acked_bits, replace=True)
        await r.hset(jobs.keys.job("j"), mapping={"acked": counters[b"acked"]})
        assert await jobs.ack(DATASET, "j", "w", [a.lease, b.lease]) == ["duplicate", "acked"]
        assert await r.zcard(jobs.keys.lease_keys("j")[1]) == 0
        assert (await jobs.state(DATASET, "j"))["status"] == "done"

    run(redis_url, body)


def test_deleting_a_job_whose_keys_rolled_back_leaves_nothing_for_its_successor(redis_url: str, rdb: redis.Redis):
    """A late ack of a batch in an epoch after the cursor's (granted in the lost window) writes that epoch's
    acked bitmap; deleting the job removes it too, so a job created again under the name starts clean and
    ends, instead of answering ``duplicate`` for batches it never trained and never finishing."""

    async def body(jobs: Jobs, r: aioredis.Redis) -> None:
        bpe, epochs = 2, 2
        await _create(jobs, bpe=bpe, epochs=epochs)
        drill = Drill(jobs, r, 1)
        (w,) = drill.workers
        await drill.rounds(2, ack=False)  # epoch 0's two batches, held
        taken = await snapshot(r, jobs, epochs)
        await drill.rounds(2)  # the lost window: epoch 0 acked, epoch 1's two batches granted
        held = list(w.held)
        assert {lease.split(":")[0] for lease in held} == {"1"}
        await roll_back(r, taken)
        assert await jobs.ack(DATASET, "j", w.name, held[:1]) == ["late"]  # acked ahead of the cursor's epoch
        assert await jobs.cancel(DATASET, "j")
        assert await Store(r, "ms").delete_job("j") > 0
        assert [k async for k in r.scan_iter(match="ms:job:*")] == []
        await _create(jobs, bpe=bpe, epochs=epochs)
        again = Drill(jobs, r, 1)
        await again.drain(max_rounds=4 * bpe * epochs)
        assert (await jobs.state(DATASET, "j"))["status"] == "done"
        assert (await jobs.state(DATASET, "j"))["acked"] == bpe * epochs

    run(redis_url, body)
