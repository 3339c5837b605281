"""Persistence: the embedded server's data directory survives service restarts,
however the service stops, and the embedded server never outlives it; a job
ends after a restart that lost the server's unsynced writes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from client import Client
from service.store.durability import Durability
from service.store.embedded import EmbeddedRedis
from service.jobs.jobs import JobConfig, Jobs

from .conftest import service_env
from .rollback import DATASET, JOB, Drill, assert_converged


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z " in stat.read_text())


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["graceful", "sigkill"])
def test_restart_keeps_datasets(spawn_service, tmp_path: Path, bpe_tokenizer: str, corpus: list[str], how):
    env = service_env(MASKSERVE_DATA_DIR=str(tmp_path / "data"))
    first = spawn_service(env)
    with Client(first.url) as c:
        c.create_dataset("kept", tokenizer=bpe_tokenizer, seq_len=64, packing="doc")
        c.ingest("kept", corpus[:200])
        before = c.dataset("kept")
        batch = c.batch("kept", 32, seed=7, index=3)
    server_pid = int((tmp_path / "data" / "server.pid").read_text())

    first.stop(how)
    deadline = time.monotonic() + 10
    while _pid_alive(server_pid):  # the embedded server follows its service out
        assert time.monotonic() < deadline, "embedded server outlived its service"
        time.sleep(0.05)

    second = spawn_service(env)
    with Client(second.url) as c:
        after = c.dataset("kept")
        again = c.batch("kept", 32, seed=7, index=3)
    assert after == before
    for name in ("input_ids", "labels", "attention_mask", "sequence_ids"):
        assert (again[name] == batch[name]).all()


def test_a_job_converges_after_a_restart_loses_unsynced_grants(tmp_path: Path):
    """A power loss mid-job: the append-only file is cut back to its last completed fsync (acks are confirmed
    only once fsynced, so they all survive; the grants after the last one do not) and the server restarts
    from it, while the workers still hold the batches granted in the lost window."""
    server = EmbeddedRedis(tmp_path / "redis").start()  # appendonly, fsync every second
    bpe, epochs = 10, 2

    async def connect() -> tuple[aioredis.Redis, Jobs]:
        r = aioredis.from_url(server.url)
        return r, Jobs(r, "ms", await Durability(r, "require").probe())

    async def main() -> None:
        r, jobs = await connect()
        await r.hset(f"ms:ds:{{{DATASET}}}:meta", mapping={"uid": "u1"})
        cfg = JobConfig(dataset=DATASET, batch_size=4, epochs=epochs, lease_timeout_s=60)
        assert (await jobs.create(JOB, cfg, "u1", 4 * bpe, bpe, 1))[0] == "created"
        drill = Drill(jobs, r, 4)
        await drill.rounds(2)  # its last request carried acks: confirmed once fsynced, everything before too
        aof = next((server.data_dir / "appendonlydir").glob("*.incr.aof"))
        synced = aof.stat().st_size
        before = Counter(drill.granted)
        await drill.rounds(2, ack=False)  # grants only: nothing waits for their fsync
        lost = set(drill.granted - before)
        await r.aclose()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.stop()
        assert aof.stat().st_size > synced
        os.truncate(aof, synced)
        server.start()
        drill.r, drill.jobs = await connect()
        try:
            assert (await drill.jobs.state(DATASET, JOB))["next"] == 8  # the lost grants are gone
            for w in drill.workers[:2]:  # these ack at once, the others with their next request
                await drill.ack_all(w)
            await drill.drain(max_rounds=4 * bpe * epochs)
            await assert_converged(drill, bpe, epochs, lost)
        finally:
            await drill.r.aclose()

    try:
        asyncio.run(main())
    finally:
        server.stop()
