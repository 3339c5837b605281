"""The client's job streams under faults: order, lost answers, refused connections, 503s,
replicas that are down, and what closing a stream acks or gives back.

The network faults are injected by an httpx transport in front of the real one, so the
service and Redis are real and only the chosen requests fail, deterministically.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from client import AsyncClient, Client, TransportError

from .conftest import ServerThread, free_port
from .test_jobs import ds, uid  # noqa: F401 - ds is a fixture

PROBLEM_503 = b'{"type": "urn:maskserve:problem:overloaded", "title": "Overloaded", "status": 503}'


class Faults(httpx.BaseTransport):
    """Real HTTP, except where ``plan(path, n)`` says otherwise for the n-th call (1-based) to ``path``'s
    last segment: 'refuse' (never sent), 'lose' (sent and answered, the answer lost), '503'
    (an overloaded replica, Retry-After 0), or None. ``jitter`` delays answers by up to that many seconds."""

    def __init__(self, plan: Callable[[str, int], str | None] = lambda path, n: None, jitter: float = 0.0) -> None:
        self.inner = httpx.HTTPTransport()
        self.plan = plan
        self.jitter = jitter
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.rng = random.Random(0)

    def _decide(self, request: httpx.Request) -> tuple[str | None, float]:
        """This request's fault and the delay of its answer; raises or answers for a fault that never sends."""
        kind = request.url.path.rsplit("/", 1)[-1]
        with self.lock:
            self.calls[kind] += 1
            fault = self.plan(kind, self.calls[kind])
            delay = self.rng.random() * self.jitter
            if fault:
                self.faults[fault] += 1
        if fault == "refuse":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        return fault, delay

    @staticmethod
    def _overloaded(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "0", "Content-Type": "application/problem+json"},
                              content=PROBLEM_503, request=request)  # fmt: skip

    @staticmethod
    def _lost(request: httpx.Request) -> httpx.ReadError:
        return httpx.ReadError("connection reset before the answer (injected)", request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault, delay = self._decide(request)
        if fault == "503":
            return self._overloaded(request)
        resp = self.inner.handle_request(request)
        if fault == "lose":
            resp.read()
            resp.close()
            raise self._lost(request)
        if delay:
            threading.Event().wait(delay)
        return resp

    def close(self) -> None:
        self.inner.close()


class AsyncFaults(Faults, httpx.AsyncBaseTransport):
    """:class:`Faults` for the :class:`AsyncClient`, over real async HTTP."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.inner_async = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault, delay = self._decide(request)
        if fault == "503":
            return self._overloaded(request)
        resp = await self.inner_async.handle_async_request(request)
        if fault == "lose":
            await resp.aread()
            await resp.aclose()
            raise self._lost(request)
        if delay:
            await asyncio.sleep(delay)
        return resp

    async def aclose(self) -> None:
        await self.inner_async.aclose()


def _drain_with(kind: str, url: str, transport: Faults, create: dict, **kw) -> tuple[list[tuple[int, int]], dict, object]:
    """Create a job and drain it as one worker through ``transport``, with the blocking or the async client:
    the keys it got, in order, the job's progress and the stream."""
    job = uid("job")
    if kind == "sync":
        with Client(url, transport=transport, backoff=0.01) as c:
            c.create_job(job, **create)
            with c.job(job, **kw) as stream:
                keys = [(bt.epoch, bt.index) for bt in stream]
            return keys, c.job_progress(job), stream

    async def main():
        async with AsyncClient(url, transport=transport, backoff=0.01) as c:
            await c.create_job(job, **create)
            async with c.job(job, **kw) as stream:
                keys = [(bt.epoch, bt.index) async for bt in stream]
            return keys, await c.job_progress(job), stream

    return asyncio.run(main())


def _drain(c: Client, job: str, **kw) -> list[tuple[int, int]]:
    with c.job(job, **kw) as stream:
        return [(bt.epoch, bt.index) for bt in stream]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_yields_its_leases_in_order(service_url: str, ds, kind: str):
    """However the answers of concurrent lease requests arrive, one worker's batches come in (epoch, index) order,
    across epoch boundaries too; with either client."""
    name, n = ds
    for trial in range(3):
        transport = (Faults if kind == "sync" else AsyncFaults)(jitter=0.02)
        create = {"dataset": name, "batch_size": 16, "epochs": 3, "seed": trial}
        keys, _, _ = _drain_with(kind, service_url, transport, create, prefetch=4)
        bpe = -(-n // 16)
        assert keys == [(e, i) for e in range(3) for i in range(bpe)], f"trial {trial}: out of order"


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("fault", ["refuse", "lose", "503"])
def test_a_stream_rides_out_failed_lease_requests(service_url: str, ds, fault: str, kind: str):
    """Every 3rd lease request fails (never sent / answer lost / 503): the stream retries with the same request id,
    so no lease leaks and no batch is handed out twice, and the acks that rode on a failed request are not lost;
    with either client."""
    name, n = ds
    transport = (Faults if kind == "sync" else AsyncFaults)(lambda path, k: fault if path == "next" and k % 3 == 0 else None)
    keys, p, stream = _drain_with(kind, service_url, transport, {"dataset": name, "batch_size": 16, "epochs": 2},
                                  worker="w", prefetch=2)  # fmt: skip
    bpe = -(-n // 16)
    assert transport.faults[fault] >= 5
    assert keys == [(e, i) for e in range(2) for i in range(bpe)]
    assert p["status"] == "done" and p["acked"] == 2 * bpe and stream.acked == 2 * bpe and not stream.rejected
    assert p["handed_out"] == 2 * bpe and p["redelivered"] == 0  # a lost answer did not cost a lease


def test_closing_acks_the_batches_handed_out_and_gives_back_the_rest(client: Client, ds):
    """A worker that stops after N steps: its N batches count, its prefetched ones go to the next worker at once,
    and no batch is trained twice."""
    name, n = ds
    job = uid("job")
    client.create_job(job, name, batch_size=16)
    stream = client.job(job, worker="first", prefetch=3)
    first = [next(stream) for _ in range(3)]  # three training steps, then the worker stops
    stream.close()
    p = client.job_progress(job)
    assert p["acked"] == 3 and p["workers"]["first"]["acked"] == 3
    rest = _drain(client, job, worker="second", prefetch=1)
    keys = [(b.epoch, b.index) for b in first] + rest
    assert sorted(keys) == [(0, i) for i in range(-(-n // 16))]  # each batch once
    assert client.job_progress(job)["status"] == "done"


def test_poll_says_at_once_when_the_service_has_nothing_for_this_worker(client: Client, ds):
    """A stream polled while every remaining batch is leased to another worker returns None after its
    patience instead of waiting for those leases to run out; it gets the batches once they are given back,
    and ends with the job."""
    name, n = ds
    job = uid("job")
    bpe = -(-n // 16)
    client.create_job(job, name, batch_size=16, lease_timeout_s=3600)
    holder = client.job(job, worker="holder", prefetch=bpe)
    held = next(holder)
    deadline = time.monotonic() + 60
    while client.job_progress(job)["leased"] < bpe:  # the holder leases the whole epoch (its prefetch)
        assert time.monotonic() < deadline, "the holder's prefetch never leased the epoch"
    waiter = client.job(job, worker="waiter", prefetch=2)
    assert waiter.poll(0.05) is None and waiter.poll(0.0) is None
    holder.close()  # acks the one it trained, gives back the rest
    got = []
    while True:
        assert time.monotonic() < deadline, f"the waiter got {got} and no end"
        try:
            batch = waiter.poll(0.05)
        except StopIteration:
            break
        if batch is not None:
            got.append((batch.epoch, batch.index))
    assert sorted(got + [(held.epoch, held.index)]) == [(0, i) for i in range(bpe)]
    p = client.job_progress(job)
    assert p["status"] == "done" and p["redelivered"] == bpe - 1 and p["acked"] == bpe


def test_poll_comes_back_while_the_service_does_not_answer():
    """A stream whose service is unreachable keeps retrying (up to max_outage), but poll() returns None after
    its patience meanwhile: a data-parallel rank goes on with the others instead of holding them (and the
    leases their prefetch holds) for the whole outage."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, retries=0, backoff=0.05, max_backoff=0.2) as c:
        stream = c.job(uid("job"), worker="w", max_outage=600)
        try:
            assert stream.poll(0.1) is None
            assert stream.poll(0.0) is None
        finally:
            stream.close()


def test_leaving_the_block_on_an_error_gives_back_the_untrained_batch(client: Client, ds):
    name, _ = ds
    job = uid("job")
    client.create_job(job, name, batch_size=16)
    with pytest.raises(RuntimeError):
        with client.job(job, worker="crashes", prefetch=2) as stream:
            trained = next(stream)
            failed = next(stream)  # the step on this one fails
            raise RuntimeError("the training step failed")
    p = client.job_progress(job)
    assert p["acked"] == 1 and p["workers"]["crashes"]["acked"] == 1
    with client.job(job, worker="next", prefetch=1) as again:
        first = next(again)
    assert (first.epoch, first.index) == (failed.epoch, failed.index) != (trained.epoch, trained.index)
    assert first.metadata["lease"] != failed.metadata["lease"]


def test_acks_that_cannot_be_sent_are_kept_and_reported(service_url: str, ds):
    """close() does not swallow a failed ack: it raises, and the acks stay queued until they get through."""
    name, _ = ds
    down = threading.Event()
    transport = Faults(lambda kind, k: "refuse" if down.is_set() else None)
    with Client(service_url, transport=transport, backoff=0.01, max_backoff=0.05) as c:
        job = uid("job")
        c.create_job(job, name, batch_size=16)
        stream = c.job(job, worker="w", prefetch=1, max_outage=0.3)
        batch = next(stream)
        down.set()
        with pytest.raises(TransportError):
            stream.close()
        assert c.job_progress  # the client itself is fine
        down.clear()
        assert c.job_progress(job)["acked"] == 0
        stream.flush()  # the network is back: the ack that failed goes out now
        assert stream.acked == 1 and c.job_progress(job)["acked"] == 1
        assert c.job_progress(job)["workers"]["w"]["acked"] == 1 and batch.index == 0


def test_requests_fail_over_between_replicas(service_url: str, ds):
    name, n = ds
    dead = f"http://127.0.0.1:{free_port()}"
    with Client([dead, service_url], backoff=0.01) as c:
        assert c.dataset(name)["num_sequences"] == n  # the first replica refuses; the second answers
        assert c.base_url == service_url
        job = uid("job")
        c.create_job(job, name, batch_size=64)
        assert len(_drain(c, job)) == -(-n // 64)
    with Client(f"{dead},{service_url}", retries=0) as c:  # a comma-separated list works too
        with pytest.raises(TransportError):
            c.dataset(name)  # no retries: the dead replica's error is final
        assert c.dataset(name)["num_sequences"] == n  # ...but the next call goes to the other one


class _AckLog(httpx.BaseTransport):
    """Real HTTP; records how many acks each lease request the service took carried, and the status of
    those it refused."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.carried: list[int] = []
        self.refused: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if request.url.path.endswith("/next"):
            assert "ack" not in request.url.params  # acks travel in the body: the request line stays short
            if resp.status_code < 400 or resp.status_code == 410:  # not refused: the service took them
                self.carried.append(len(json.loads(request.content)["acks"]) if request.content else 0)
            else:
                self.refused.append(resp.status_code)
        return resp


def test_acks_can_go_in_groups_and_the_job_still_ends_with_every_batch_counted(service_url: str, ds):
    """``ack_every=3``: lease requests carry no ack until three are pending, then all three; at the end
    of the job the service waits for the held acks (204), and the next request carries them."""
    name, n = ds
    transport = _AckLog()
    with Client(service_url, transport=transport) as c:
        job = uid("job")
        c.create_job(job, name, batch_size=64, epochs=1, seed=0, epoch_boundary="handout")
        batches = -(-n // 64)
        with c.job(job, prefetch=1, ack_every=3, ack_delay=1e9) as stream:
            seen = [(bt.epoch, bt.index) for bt in stream]
        progress = c.job_progress(job)
    assert len(seen) == batches and progress["status"] == "done"
    assert stream.acked == batches and not stream.rejected
    carried = [k for k in transport.carried if k]
    assert carried and all(k >= 3 for k in carried[:-1]), transport.carried
    assert sum(transport.carried) == batches  # every ack went with a lease request, none by a separate call


def test_a_lease_request_carries_a_bounded_number_of_acks(service_url: str, ds):
    """Acks held back (here: acked without sending, more than one request can carry) go in the bodies of
    several lease requests, none past the cap, so no body outgrows the service's limits; all are counted."""
    from client._jobs import MAX_PIGGYBACK

    name, n = ds
    wanted = MAX_PIGGYBACK + 40
    assert n >= wanted + 2
    transport = _AckLog()
    with Client(service_url, transport=transport) as c:
        job = uid("job")
        c.create_job(job, name, batch_size=1, epochs=1, seed=0)
        with c.job(job, prefetch=1, auto_ack=False) as stream:
            held = []
            for bt in stream:
                held.append(bt)
                if len(held) == wanted:
                    break
            for bt in held:
                stream.ack(bt, send=False)
            next(stream)
            next(stream)
        assert max(transport.carried) == MAX_PIGGYBACK
        assert sum(transport.carried) >= wanted and stream.acked >= wanted and not stream.rejected


@pytest.mark.parametrize("limit", [{"max_acks": 16}, {"max_json_bytes": 1024}])
def test_a_stream_sends_fewer_acks_per_request_once_the_service_refuses_as_many(
    settings, rdb, bpe_tokenizer, corpus, limit
):
    """A service configured for fewer acks per request (MASKSERVE_MAX_ACKS), or smaller JSON bodies
    (MASKSERVE_MAX_JSON_BYTES), than the client sends refuses the request before doing anything; the stream
    splits its pending acks into requests that fit from then on, and every batch is counted once."""
    with ServerThread(settings.model_copy(update=limit)) as server:
        transport = _AckLog()
        with Client(server.url, transport=transport) as c:
            name = uid("ds")
            c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
            c.ingest(name, corpus[:200])
            job = uid("job")
            batches = 120
            assert c.dataset(name)["num_sequences"] > batches
            c.create_job(job, name, batch_size=1, epochs=1, seed=0)
            with c.job(job, prefetch=1, ack_every=40, ack_delay=1e9) as stream:
                for i, _ in enumerate(stream):
                    if i + 1 == batches:
                        break
            progress = c.job_progress(job)
    assert transport.refused and set(transport.refused) == {422 if "max_acks" in limit else 413}
    assert max(transport.carried) <= 16 and stream.acked == batches and not stream.rejected
    assert progress["acked"] == batches
