"""Drills for jobs whose keys roll back to an earlier state while workers hold leases granted later (a failover
that loses a master's last writes, a restart from an append-only file that lost its unsynced tail)."""

from __future__ import annotations

from collections import Counter

import redis.asyncio as aioredis

from service.jobs.jobs import Jobs

DATASET, JOB = "d", "j"


class Worker:
    """A worker of the drills: the lease ids it holds (trained, not acked yet)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held: list[str] = []


class Drill:
    """Drives workers against job ``j`` of dataset ``d`` and records what the tests assert: each batch's grants,
    and any ``duplicate`` ack that left a lease alive on its batch."""

    def __init__(self, jobs: Jobs, r: aioredis.Redis, workers: int) -> None:
        self.jobs, self.r = jobs, r
        self.workers = [Worker(f"w{k}") for k in range(workers)]
        self.granted: Counter[tuple[int, int]] = Counter()
        self.duplicate_left_lease: list[str] = []

    async def take(self, w: Worker, acks: list[str]) -> str:
        """``w`` acks ``acks`` and asks for a batch; returns the state of the answer."""
        res = await self.jobs.next(DATASET, JOB, w.name, acks)
        await res.confirm()
        await self._judge(acks, res.acks or [])
        if res.state == "lease":
            self.granted[(res.lease.epoch, res.lease.index)] += 1
            w.held.append(res.lease.lease)
        return res.state

    async def ack_all(self, w: Worker) -> None:
        acks, w.held = w.held, []
        await self._judge(acks, await self.jobs.ack(DATASET, JOB, w.name, acks) or [])

    async def _judge(self, acks: list[str], verdicts: list[str]) -> None:
        leases = self.jobs.keys.lease_keys(JOB)[1]
        for lease, verdict in zip(acks, verdicts):
            member = ":".join(lease.split(":")[:2])
            if verdict == "duplicate" and await self.r.zscore(leases, member) is not None:
                self.duplicate_left_lease.append(lease)

    async def rounds(self, n: int, *, ack: bool = True) -> None:
        """``n`` rounds in which each worker acks what it holds (unless not ``ack``) and takes one batch."""
        for _ in range(n):
            for w in self.workers:
                acks, w.held = (w.held, []) if ack else ([], w.held)
                await self.take(w, acks)

    async def drain(self, max_rounds: int) -> None:
        """Round robin until every worker is told the job is done, or a round hands out nothing while nobody
        holds anything (stuck), or ``max_rounds`` pass."""
        for _ in range(max_rounds):
            states = []
            for w in self.workers:
                acks, w.held = w.held, []
                states.append(await self.take(w, acks))
            if all(s == "done" for s in states) or (
                all(s == "wait" for s in states) and not any(w.held for w in self.workers)
            ):
                return


async def snapshot(r: aioredis.Redis, jobs: Jobs, epochs: int) -> dict[str, bytes | None]:
    return {key: await r.dump(key) for key in jobs.keys.all_keys(JOB, epochs)}


async def roll_back(r: aioredis.Redis, snap: dict[str, bytes | None]) -> None:
    """The job's keys as they were at ``snap``."""
    for key, value in snap.items():
        if value is None:
            await r.delete(key)
        else:
            await r.restore(key, 0, value, replace=True)


async def assert_converged(drill: Drill, bpe: int, epochs: int, lost: set[tuple[int, int]]) -> None:
    """The job is done, each batch acked exactly once, no lease left, and only batches granted in the lost
    window (``lost``) trained twice, none more."""
    jobs, r = drill.jobs, drill.r
    st = await jobs.state(DATASET, JOB)
    assert st["status"] == "done", (st["epoch"], st["next"], st["acked"], dict(drill.granted))
    assert st["acked"] == bpe * epochs
    acked_per_epoch = await r.hgetall(jobs.keys.lease_keys(JOB)[4])
    assert {int(e): int(c) for e, c in acked_per_epoch.items()} == {e: bpe for e in range(epochs)}
    for e in range(epochs):
        assert await r.bitcount(jobs.keys.acked(JOB, e)) == bpe
    assert await r.zcard(jobs.keys.lease_keys(JOB)[1]) == 0
    assert drill.duplicate_left_lease == []
    assert set(drill.granted) == {(e, i) for e in range(epochs) for i in range(bpe)}
    assert {batch for batch, n in drill.granted.items() if n > 1} <= lost
    assert max(drill.granted.values()) <= 2
