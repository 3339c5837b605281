"""The asyncio client against a live service: the same calls, streams and errors as the blocking client (the
two carry out the same plans), a job shared by async and blocking workers, uploads produced off the event
loop, and a job stream and a batch stream riding out a replica killed and restarted under them."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client import AsyncClient, AsyncJobStream, Batch, Client, ConflictError, JobCancelled, NotFoundError

from .conftest import service_env
from .test_jobs import uid

MASKING = {"mlm_probability": 0.2, "unit": "whole_word"}


def same(a: Batch, b: Batch) -> None:
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a[k], b[k])


def test_async_calls_answer_as_the_blocking_client_does(service_url, client, bpe_tokenizer, corpus):
    name = uid("ds")

    async def main() -> dict:
        async with AsyncClient(service_url) as c:
            assert await c.health() and await c.ready()
            await c.wait_ready(timeout=5)
            created = await c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
            with pytest.raises(ConflictError):
                await c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
            with pytest.raises(NotFoundError):
                await c.dataset(uid("missing"))
            await c.delete_dataset(uid("missing"), missing_ok=True)
            ingested = await c.ingest(name, corpus[:150])
            single = [await c.batch(name, 16, seed=4, index=k, **MASKING) for k in range(3)]
            async with c.batches(name, 16, seed=4, steps=3, prefetch=3, **MASKING) as stream:
                streamed = [b async for b in stream]
            return {
                "created": created, "ingested": ingested, "info": await c.dataset(name), "single": single,
                "streamed": streamed, "names": [d["name"] for d in await c.datasets()],
                "rows": await c.sequences(name, [3, 1, 2], seed=9, epoch=1, **MASKING),
                "static": await c.build_static_masks(name, seed=1, copies=2),
                "report": await c.masking_report(name, sequences=32, **MASKING),
            }  # fmt: skip

    got = asyncio.run(main())
    assert got["created"]["name"] == name and got["ingested"]["documents"] == 150
    assert got["info"] == client.dataset(name) and name in got["names"]
    for k, (one, streamed) in enumerate(zip(got["single"], got["streamed"], strict=True)):
        expected = client.batch(name, 16, seed=4, index=k, **MASKING)  # the blocking client's, the same request
        same(one, expected)
        same(streamed, expected)
        assert one.metadata == expected.metadata
    same(got["rows"], client.sequences(name, [3, 1, 2], seed=9, epoch=1, **MASKING))
    assert got["static"]["complete"] and client.static_masks(name)[0]["complete"]
    assert got["report"] == client.masking_report(name, sequences=32, **MASKING)


def test_async_uploads_are_produced_off_the_event_loop(service_url, client, bpe_tokenizer, corpus, tmp_path: Path):
    """A file and a document list go up through the async client with their bodies produced on worker
    threads (the progress callbacks run there), and store what the blocking client stores."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = tmp_path / "docs.jsonl.gz"
    jsonl.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in corpus[:120]).encode()))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": corpus[120:220]}), parquet)
    names = {kind: (uid(f"a-{kind}"), uid(f"s-{kind}")) for kind in ("jsonl", "parquet", "docs")}
    for _, blocking in names.values():
        client.create_dataset(blocking, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest_file(names["jsonl"][1], jsonl)
    client.ingest_file(names["parquet"][1], parquet)
    client.ingest(names["docs"][1], corpus[:80])
    threads: set[str] = set()

    def on_bytes(_: int) -> None:
        threads.add(threading.current_thread().name)

    async def main() -> tuple[str, list[dict]]:
        async with AsyncClient(service_url) as c:
            for asynchronous, _ in names.values():
                await c.create_dataset(asynchronous, tokenizer=bpe_tokenizer, seq_len=64)
            results = [await c.ingest_file(names["jsonl"][0], jsonl, on_bytes=on_bytes),
                       await c.ingest_file(names["parquet"][0], parquet),
                       await c.ingest(names["docs"][0], corpus[:80], on_bytes=on_bytes)]  # fmt: skip
            return threading.current_thread().name, results

    loop_thread, results = asyncio.run(main())
    assert threads and loop_thread not in threads
    assert [r["documents"] for r in results] == [120, 100, 80]
    for asynchronous, blocking in names.values():
        a, s = client.dataset(asynchronous), client.dataset(blocking)
        assert (a["num_sequences"], a["num_tokens"]) == (s["num_sequences"], s["num_tokens"])
        same(client.sequences(asynchronous, range(a["num_sequences"])),
             client.sequences(blocking, range(s["num_sequences"])))


def _dataset(client: Client, tokenizer: str, corpus: list[str], docs: int = 100) -> tuple[str, int]:
    name = uid("ds")
    client.create_dataset(name, tokenizer=tokenizer, seq_len=64, packing="doc")
    client.ingest(name, corpus[:docs])
    return name, client.dataset(name)["num_sequences"]


def _exactly_once(keys: list[tuple[int, int]], ids: dict[tuple[int, int], list[int]], n: int, b: int,
                  epochs: int) -> None:  # fmt: skip
    counts = Counter(keys)
    assert [k for k, c in counts.items() if c > 1] == []
    bpe = -(-n // b)
    assert set(counts) == {(e, i) for e in range(epochs) for i in range(bpe)}
    for e in range(epochs):
        seen = [s for (epoch, _), rows in ids.items() if epoch == e for s in rows]
        assert sorted(seen) == list(range(n))


def test_async_and_blocking_workers_share_one_job(service_url, client, bpe_tokenizer, corpus):
    name, n = _dataset(client, bpe_tokenizer, corpus)
    job, b, epochs = uid("job"), 8, 2
    create = {"dataset": name, "batch_size": b, "epochs": epochs, "seed": 5, "masking": MASKING}
    client.create_job(job, **create)
    keys: list[tuple[int, int]] = []
    ids: dict[tuple[int, int], list[int]] = {}
    lock = threading.Lock()

    def record(batch: Batch) -> None:
        with lock:
            keys.append((batch.epoch, batch.index))
            ids[(batch.epoch, batch.index)] = [int(s) for s in batch["sequence_ids"]]

    def blocking_worker() -> None:
        with Client(service_url) as c, c.job(job, worker="blocking", stats_every=0.0) as stream:
            for batch in stream:
                record(batch)

    async def async_worker(c: AsyncClient, worker: str, explicit: bool) -> AsyncJobStream:
        stream = c.job(job, worker=worker, create=create, auto_ack=not explicit, stats_every=0.0)
        async with stream:
            async for batch in stream:
                record(batch)
                await asyncio.sleep(0)  # a training step, yielding to the other worker
                if explicit:
                    await stream.ack(batch)
        return stream

    async def main() -> list[AsyncJobStream]:
        async with AsyncClient(service_url) as c:
            return list(await asyncio.gather(async_worker(c, "async-auto", False), async_worker(c, "async-acks", True)))

    thread = threading.Thread(target=blocking_worker)
    thread.start()
    streams = asyncio.run(main())
    thread.join(120)
    assert not thread.is_alive()
    _exactly_once(keys, ids, n, b, epochs)
    assert all(not s.rejected for s in streams)
    p = client.job_progress(job)
    assert p["status"] == "done" and p["acked"] == len(keys) == epochs * -(-n // b) and p["leased"] == 0
    per_worker = {w: p["workers"][w]["acked"] for w in p["workers"]}
    assert sum(per_worker.values()) == len(keys)
    assert sum(s.acked for s in streams) == per_worker.get("async-auto", 0) + per_worker.get("async-acks", 0)


def test_a_cancelled_job_raises_in_the_async_stream(service_url, client, bpe_tokenizer, corpus):
    name, _ = _dataset(client, bpe_tokenizer, corpus, docs=40)
    job = uid("job")
    client.create_job(job, dataset=name, batch_size=4, epochs=None)

    async def main() -> int:
        got = 0
        async with AsyncClient(service_url) as c:
            with pytest.raises(JobCancelled):
                async for _ in c.job(job):
                    got += 1
                    if got == 3:
                        await c.cancel_job(job)
        return got

    assert asyncio.run(main()) >= 3
    assert client.job_progress(job)["status"] == "cancelled"


@pytest.mark.slow
def test_async_streams_ride_out_a_replica_killed_and_restarted(spawn_service, redis_url, rdb, bpe_tokenizer,
                                                               corpus, caplog):  # fmt: skip
    """Two replicas. The replica in use is SIGKILLed mid-stream (requests fail over to the other), restarted on
    its port, then the other one is killed (requests go back to the restarted one). The job stream trains
    every batch exactly once; the batch stream serves exactly the batches a quiet run serves."""
    env = service_env(REDIS_URL=redis_url)
    a, b = spawn_service(env), spawn_service(env)
    with Client(b.url) as blocking:
        name, n = _dataset(blocking, bpe_tokenizer, corpus)
        quiet = [blocking.batch(name, 8, seed=2, index=k, **MASKING) for k in range(12)]
    job, size, epochs = uid("job"), 8, 2
    caplog.set_level(logging.WARNING, logger="maskserve.client")

    async def main() -> tuple[list[Batch], list[Batch], AsyncJobStream, list[str]]:
        keys_served: list[Batch] = []
        stateless: list[Batch] = []
        used: list[str] = []
        async with AsyncClient([a.url, b.url], backoff=0.05, max_backoff=0.2) as c:
            stream = c.job(job, create={"dataset": name, "batch_size": size, "epochs": epochs, "seed": 3},
                           max_outage=60)  # fmt: skip
            batches = c.batches(name, 8, seed=2, steps=12, prefetch=2, **MASKING)
            async with stream, batches:
                steps = [lambda: None, lambda: a.stop(signal.SIGKILL), lambda: spawn_service(env, port=a.port),
                         lambda: b.stop(signal.SIGKILL)]  # fmt: skip
                async for batch in stream:
                    keys_served.append(batch)
                    if len(keys_served) % 3 == 0 and steps:
                        await asyncio.to_thread(steps.pop(0))  # one event every three batches
                        used.append(c.base_url)
                    if len(stateless) < 12:
                        stateless.append(await batches.__anext__())
                async for batch in batches:
                    stateless.append(batch)
            return keys_served, stateless, stream, used

    served, stateless, stream, used = asyncio.run(main())
    assert used[1] == b.url or used[2] == b.url, used  # the kill of a sent requests to b
    assert any("retrying" in r.getMessage() for r in caplog.records), "no request ran into a dead replica"
    keys = [(x.epoch, x.index) for x in served]
    _exactly_once(keys, {(x.epoch, x.index): [int(s) for s in x["sequence_ids"]] for x in served}, n, size, epochs)
    assert not stream.rejected
    for got, expected in zip(stateless, quiet, strict=True):
        same(got, expected)
    with Client(a.url) as c:  # the restarted replica
        p = c.job_progress(job)
    assert p["status"] == "done" and p["acked"] == len(served) and p["leased"] == 0
