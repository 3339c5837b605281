"""Input-boundness end to end: four workers of one job, one slowed in its own step, one starved by a throttled
path to the service; job progress and the per-worker metrics (what the dashboard's Workers row plots) flag
each as what it is, from the summaries the workers' clients send by themselves."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from client import Client

from .test_jobs import _worker_series

SEQ_LEN = 64
DELAY_S = 0.6  # what the throttled path adds to each request


class SlowLink:
    """A TCP relay to ``port`` that holds every piece a client sends for ``delay`` seconds before passing it on
    (a congested or throttled path to the service); answers come back at once."""

    def __init__(self, port: int, delay: float) -> None:
        self.upstream, self.delay = port, delay
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, server.wait_closed(), return_exceptions=True))
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.delay), pump(up_reader, writer, 0.0),
                             return_exceptions=True)  # fmt: skip

    def __enter__(self) -> "SlowLink":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def job(client: Client, bpe_tokenizer: str, corpus: list[str]) -> Iterator[str]:
    name = f"ib-{uuid.uuid4().hex[:8]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="doc")
    client.ingest(name, corpus[:60])
    client.create_job(f"{name}-job", name, batch_size=2, epochs=1000, lease_timeout_s=120)
    yield f"{name}-job"


def test_a_slowed_worker_and_a_starved_one_are_each_flagged_for_what_they_are(client, service_url, job):
    port = int(service_url.rsplit(":", 1)[1])
    stop = threading.Event()
    trained: dict[str, int] = {}
    errors: list[BaseException] = []

    def worker(name: str, url: str, step_s: float, prefetch: int) -> None:
        try:
            with Client(url) as c, c.job(job, worker=name, prefetch=prefetch, stats_every=1.0) as stream:
                for _ in stream:
                    time.sleep(step_s)  # its training step
                    trained[name] = trained.get(name, 0) + 1
                    if stop.is_set():
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    with SlowLink(port, DELAY_S) as link:
        plan = {  # name: (url, step, prefetch)
            "fast-1": (service_url, 0.1, 2),
            "fast-2": (service_url, 0.1, 2),
            "slowed": (service_url, DELAY_S, 2),  # its own step is slow; its data is always there
            "starved": (f"http://127.0.0.1:{link.port}", 0.1, 1),  # quick steps, data late
        }
        threads = [threading.Thread(target=worker, args=(n, *args)) for n, args in plan.items()]
        for t in threads:
            t.start()
        try:
            # until every worker has sent summaries covering a few of its batches (each summary covers about a
            # second; a guard, not a wait: each turn reads the service's answer)
            deadline = time.monotonic() + 120
            while True:
                progress = client.job_progress(job)
                workers = progress["workers"]
                if all("reported_batches" in workers.get(n, {}) and trained.get(n, 0) >= 6 for n in plan):
                    break
                assert not errors, errors
                assert time.monotonic() < deadline, (trained, workers)
                stop.wait(0.05)  # pacing the reads (the stop event is never set here)
            series = _worker_series(service_url, job)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert not errors, errors

    w = progress["workers"]
    assert w["starved"]["input_bound"] and w["starved"]["data_wait_share"] > 0.5, w["starved"]
    assert not w["slowed"]["input_bound"] and w["slowed"]["data_wait_share"] < 0.5, w["slowed"]
    assert w["slowed"]["straggler"] and w["starved"]["straggler"]  # both well under the median's half
    assert not w["fast-1"]["straggler"] and not w["fast-2"]["straggler"]
    assert {"starved"} <= set(progress["input_bound_workers"]) and "slowed" not in progress["input_bound_workers"]
    assert {"slowed", "starved"} == set(progress["stragglers"])
    assert w["starved"]["lease_rtt_s"] >= DELAY_S > w["slowed"]["lease_rtt_s"]
    # the same flags in /metrics, per worker: what the dashboard's Workers row plots
    assert series["maskserve_job_worker_input_bound"]["starved"] == 1
    assert series["maskserve_job_worker_input_bound"]["slowed"] == 0
    assert series["maskserve_job_worker_straggler"]["slowed"] == 1
    assert series["maskserve_job_worker_straggler"]["starved"] == 1
    assert series["maskserve_job_worker_straggler"]["fast-1"] == series["maskserve_job_worker_straggler"]["fast-2"] == 0
    assert series["maskserve_job_worker_lease_rtt_seconds"]["starved"] >= DELAY_S
