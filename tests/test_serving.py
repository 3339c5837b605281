"""Serving under load and against slow or hostile clients: CPU work off the event loop, admission
control, a bounded Redis pool, timeouts for slow clients, and ``maskserve serve --workers N``.

Nothing here synchronises by sleeping: requests are held in flight by bodies that are not yet
sent, by Redis paused with ``CLIENT PAUSE`` until the test unpauses it, or by a hook that blocks
until the test releases it; waits are on conditions (a gauge, a closed socket) with generous
upper bounds that only a broken service reaches.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi import Request

from client import Client
from wire import decode
from service.core.config import Settings
from service.store.embedded import EmbeddedRedis

from .conftest import ServerThread, metric, service_env

SEQ_LEN = 128


def _until(condition: Callable[[], bool], what: str, limit: float = 60) -> None:
    """Wait for ``condition`` (polled); ``limit`` is only a guard against a broken service."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def _dataset(c: Client, tokenizer: str, corpus: list[str]) -> str:
    name = f"srv-{uuid.uuid4().hex[:10]}"
    c.create_dataset(name, tokenizer=tokenizer, seq_len=SEQ_LEN)
    c.ingest(name, corpus[:200])
    return name


@pytest.fixture
def own_redis(tmp_path) -> Iterator[EmbeddedRedis]:
    """A server of this test's own: it is paused, which must not stall anyone else."""
    with EmbeddedRedis(tmp_path / "redis", appendonly=False) as server:
        yield server


def _server(redis_url: str, wrap: Callable | None = None, **overrides) -> ServerThread:
    base = dict(redis_url=redis_url, max_batch_size=1024, chunk_bytes=64 << 10, chunk_max_sequences=256)
    return ServerThread(Settings(**{**base, **overrides}), wrap=wrap)


# ---- the Redis pool: busy is not down ----------------------------------------------------------------------


def test_exhausted_redis_pool_is_overloaded_not_store_unavailable(own_redis, bpe_tokenizer, corpus):
    """More concurrent requests than pooled connections, while Redis is slow to answer (its scripts paused): those
    that find no free connection in time are told the service is busy (503 overloaded, Retry-After),
    never that Redis is unreachable; those that had a connection finish once Redis answers."""
    # no chunk cache: a batch it held whole would need only a read of the counters, which the pause lets through
    with _server(own_redis.url, redis_max_connections=4, redis_pool_timeout_s=0.2, chunk_cache_bytes=0) as s:
        with Client(s.url, retries=0) as c:
            name = _dataset(c, bpe_tokenizer, corpus)
            c.batch(name, 8, seed=0)  # the dataset is known to the process: batches need one round trip each
        r = redis.Redis.from_url(own_redis.url)
        r.execute_command("CLIENT", "PAUSE", "600000", "WRITE")  # holds scripts (the batch fetch), not UNPAUSE
        pool = concurrent.futures.ThreadPoolExecutor(12)
        try:
            futures = [pool.submit(httpx.get, f"{s.url}/v1/datasets/{name}/batch",
                                   params={"size": 8, "seed": i}, timeout=120) for i in range(12)]  # fmt: skip
            # the requests without a connection give up after the pool timeout, with Redis still paused
            _until(lambda: sum(f.done() for f in futures) >= 8, "8 requests were refused")
            refused = [f.result() for f in futures if f.done()]
        finally:
            r.execute_command("CLIENT", "UNPAUSE")
            pool.shutdown()
        served = [f.result() for f in futures]
        r.close()
        assert metric(s.url, 'maskserve_overloaded_total{reason="redis-connections"}') == len(refused)
    for resp in refused:
        assert resp.status_code == 503, resp.text
        assert resp.json()["type"] == "urn:maskserve:problem:overloaded"
        assert resp.headers["Retry-After"] == "1"
    assert sum(resp.status_code == 200 for resp in served) == 4
    assert not [resp for resp in served if "store-unavailable" in resp.text]


# ---- admission control -----------------------------------------------------------------------------------


def _open_ingest(url: str, name: str) -> socket.socket:
    """An ingest request whose headers are sent and whose chunked body is not: it holds its slot."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/datasets/{name}/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson"
                 "\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
    return sock


def _finish_ingest(sock: socket.socket) -> int:
    line = json.dumps({"text": "the end of a held request"}).encode() + b"\n"
    sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
    sock.settimeout(120)
    head = sock.recv(65536)
    sock.close()
    return int(head.split()[1])


def test_admission_limit_refuses_heavy_requests_at_once_and_keeps_probes_fast(redis_url, rdb, bpe_tokenizer, corpus):
    with _server(redis_url, max_inflight=2, overload_retry_after_s=3) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        held = [_open_ingest(s.url, name) for _ in range(2)]
        _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 2, "both ingests were admitted")
        r = httpx.get(f"{s.url}/v1/datasets/{name}/batch", params={"size": 4}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "3"
        assert 100 <= int(r.headers["Maskserve-Retry-After-Ms"]) <= 300  # 200 ms, drawn within +-50%
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:maskserve:problem:overloaded" and r.json()["retry_after_s"] == 3
        # light requests are never refused: probes, progress, listings
        assert httpx.get(f"{s.url}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{s.url}/readyz", timeout=30).status_code == 200
        assert httpx.get(f"{s.url}/v1/datasets/{name}", timeout=30).status_code == 200
        assert metric(s.url, 'maskserve_overloaded_total{reason="requests"}') == 1
        assert [_finish_ingest(sock) for sock in held] == [200, 200]
        assert metric(s.url, "maskserve_inflight_heavy_requests") == 0
        assert c.batch(name, 4, seed=1)["input_ids"].shape[0] == 4


def test_client_waits_out_overloaded_answers(redis_url, rdb, bpe_tokenizer, corpus):
    """The thin client treats 503 overloaded as transient: it retries after Retry-After and gets its batch."""
    with _server(redis_url, max_inflight=1) as s, Client(s.url, retries=0) as setup:
        name = _dataset(setup, bpe_tokenizer, corpus)
        sock = _open_ingest(s.url, name)
        _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 1, "the ingest was admitted")
        refusals: list[int] = []

        def release(request: httpx.Request) -> None:  # the first refusal frees the slot: the retry then goes in
            refusals.append(1)
            if len(refusals) == 1:
                assert _finish_ingest(sock) == 200

        with Client(s.url, retries=3) as c:
            c._http.event_hooks["response"].append(lambda resp: release(resp.request) if resp.status_code == 503 else None)
            batch = c.batch(name, 4, seed=2)
        assert batch["input_ids"].shape[0] == 4 and len(refusals) == 1


# ---- CPU work off the event loop --------------------------------------------------------------------------


class Held:
    """A function replaced, where it is looked up, by one that blocks until the test releases it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, real: Callable, *modules: object) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

        def held(*args, **kwargs):
            self.entered.set()
            assert self.release.wait(120), f"the test never released {real.__name__}"
            return real(*args, **kwargs)

        for module in modules:
            monkeypatch.setattr(module, real.__name__, held)

    def probes_answer_meanwhile(self, url: str, call: Callable) -> object:
        """Run ``call`` on a thread; once it is held, the health probes must still answer (they could not,
        were the held work on the event loop); then release it and return its result."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                work = pool.submit(call)
                assert self.entered.wait(120), "the held work never started"
                for _ in range(3):
                    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
                    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
                assert not work.done()
            finally:
                self.release.set()
            return work.result(timeout=120)


@pytest.fixture
def held_masking(monkeypatch) -> Iterator[Held]:
    """Masking that blocks until the test releases it."""
    import service.batches.batching as batching
    import service.http.routes.masks as masks

    held = Held(monkeypatch, batching.mask_batch, batching, masks)
    yield held
    held.release.set()


@pytest.mark.parametrize("route", ["batch", "job", "report", "static"])
def test_health_probes_answer_while_masking_runs(route, redis_url, rdb, bpe_tokenizer, corpus, held_masking):
    """Masking of a large batch is held in the middle; were it on the event loop, the probes below
    could not be answered until it finished (and it finishes only after they are)."""
    held = held_masking
    with _server(redis_url, inline_tokens=0) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        def lease() -> None:
            c.create_job(f"j-{name}", name, batch_size=64)
            with c.job(f"j-{name}", prefetch=1) as stream:
                next(iter(stream))

        calls = {
            "batch": lambda: c.batch(name, 64, seed=0),
            "job": lease,
            "report": lambda: c.masking_report(name, sequences=16, epochs=2),
            "static": lambda: c.build_static_masks(name, copies=2),
        }
        held.probes_answer_meanwhile(s.url, calls[route])


@pytest.mark.parametrize("body", ["ndjson", "text", "train"])
def test_health_probes_answer_while_a_body_is_parsed(body, redis_url, rdb, bpe_tokenizer, corpus, monkeypatch):
    """Parsing JSON lines or UTF-8 text (a line or a body may be as large as the body limit) is held in the
    middle; were it on the event loop, the probes below could not be answered until it finished."""
    import service.data.ingest as ingest
    import service.http.routes.tokenizers as tokenizers

    held = Held(monkeypatch, ingest.parse, ingest, tokenizers)
    with _server(redis_url) as s, Client(s.url, retries=0) as c:
        name = f"srv-{uuid.uuid4().hex[:10]}"
        c.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        text = "\n\n".join(corpus[:50]).encode()
        ndjson = "".join(json.dumps({"text": t}) + "\n" for t in corpus[:50]).encode()
        calls = {
            "ndjson": lambda: httpx.post(f"{s.url}/v1/datasets/{name}/documents", content=ndjson,
                                         headers={"content-type": "application/x-ndjson"}, timeout=120),
            "text": lambda: httpx.post(f"{s.url}/v1/datasets/{name}/documents", params={"split": "none"},
                                       content=text, headers={"content-type": "text/plain"}, timeout=120),
            "train": lambda: httpx.post(f"{s.url}/v1/tokenizers/train", params={"vocab_size": 300},
                                        content=ndjson, headers={"content-type": "application/x-ndjson"}, timeout=120),
        }  # fmt: skip
        assert held.probes_answer_meanwhile(s.url, calls[body]).status_code == 200
        if body != "train":
            assert c.dataset(name)["num_documents"] == (50 if body == "ndjson" else 1)


def test_small_batches_are_masked_inline_and_large_ones_on_the_pool(redis_url, rdb, bpe_tokenizer, corpus, monkeypatch):
    import service.batches.batching as batching

    threads: list[str] = []
    real = batching.mask_batch

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "mask_batch", spy)
    with _server(redis_url, inline_tokens=8 * SEQ_LEN) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        c.batch(name, 8, seed=0)
        c.batch(name, 9, seed=0)
    loop_thread, pool_thread = threads
    assert "AnyIO worker thread" not in loop_thread and "AnyIO worker thread" in pool_thread


# ---- large bodies: sent in bounded pieces, counted in bytes ---------------------------------------------------

PIECE = 64 << 10


class BodyTap:
    """An ASGI wrapper around the app: records the size of every response body message of the batch route, and
    holds each response longer than a piece after its first message (when more follow) until the test releases
    it. The hold waits on a worker thread, so the event loop stays free, as it is while a slow client reads."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.held = 0
        self.release = threading.Event()

    def __call__(self, app: Callable) -> Callable:
        import anyio.to_thread

        async def tapped(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
            if scope["type"] != "http" or not scope["path"].endswith("/batch"):
                return await app(scope, receive, send)
            first, large = True, False

            async def tap(message) -> None:  # noqa: ANN001
                nonlocal first, large
                await send(message)
                if message["type"] == "http.response.start":
                    large = int(dict(message["headers"]).get(b"content-length", b"0")) > PIECE
                if message["type"] == "http.response.body":
                    self.sizes.append(len(message.get("body", b"")))
                    if first and large and message.get("more_body", False):
                        self.held += 1
                        assert await anyio.to_thread.run_sync(self.release.wait, 120), "the test never released"
                    first = False

            await app(scope, receive, tap)

        return tapped


def _get_batches(url: str, name: str, count: int, fmt: str, size: int = 1024) -> list[concurrent.futures.Future]:
    pool = concurrent.futures.ThreadPoolExecutor(count)
    futures = [pool.submit(httpx.get, f"{url}/v1/datasets/{name}/batch", params={"size": size, "seed": i,
                                                                                  "format": fmt}, timeout=120)
               for i in range(count)]  # fmt: skip
    pool.shutdown(wait=False)
    return futures


@pytest.mark.parametrize("fmt", ["safetensors", "json"])
def test_large_bodies_go_out_in_bounded_pieces_and_probes_answer_meanwhile(fmt, redis_url, rdb, bpe_tokenizer, corpus):
    """Batches of the largest size are held in the middle of their bodies, as slow clients hold them. Their
    bodies must go to the server in pieces of bounded size (one huge write holds the event loop while the
    kernel copies it, and the process cannot tell when it has gone), probes must answer meanwhile, and the
    requests still count against the admission limit until their last piece is sent."""
    tap = BodyTap()
    with _server(redis_url, wrap=tap, response_piece_bytes=PIECE) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        try:
            futures = _get_batches(s.url, name, 3, fmt)
            _until(lambda: tap.held == 3 or all(f.done() for f in futures), "the bodies were held or sent")
            assert tap.held == 3, f"bodies sent whole, in messages of {sorted(tap.sizes)[-3:]} bytes"
            for _ in range(3):
                assert httpx.get(f"{s.url}/healthz", timeout=30).status_code == 200
            assert metric(s.url, "maskserve_inflight_heavy_requests") == 3
            assert not any(f.done() for f in futures)
        finally:
            tap.release.set()
        responses = [f.result(timeout=120) for f in futures]
    assert [r.status_code for r in responses] == [200, 200, 200]
    for r in responses:
        if fmt == "json":
            assert np.asarray(r.json()["input_ids"]).shape == (1024, SEQ_LEN)
        else:
            assert decode(r.content)[0]["input_ids"].shape == (1024, SEQ_LEN)
    assert max(tap.sizes) <= PIECE and len(tap.sizes) > 3 * 8


def test_the_json_encoder_never_gets_a_whole_batch_at_once(redis_url, rdb, bpe_tokenizer, corpus, monkeypatch):
    """The JSON encoder holds the GIL for the whole of one call, stalling the event loop for as long (seconds
    for the largest batch): a JSON batch is encoded in calls of about a piece's worth each."""
    outputs: list[int] = []
    real = json.dumps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(len(out))
        return out

    monkeypatch.setattr(json, "dumps", spy)
    with _server(redis_url, response_piece_bytes=PIECE) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        outputs.clear()
        r = httpx.get(f"{s.url}/v1/datasets/{name}/batch", params={"size": 1024, "format": "json"}, timeout=120)
    assert r.status_code == 200 and len(r.content) > 16 * PIECE
    assert max(outputs) <= 2 * PIECE, f"one encoder call wrote {max(outputs)} of {len(r.content)} bytes"


@pytest.mark.parametrize("numbers", [1, 5, 64, 1 << 20])
def test_a_json_body_in_pieces_is_the_whole_document(numbers):
    from service.batches.bodies import json_pieces

    arrays = {"input_ids": np.arange(60, dtype=np.int32).reshape(6, 10) - 7, "sequence_ids": np.arange(6),
              "masked_positions": np.zeros((0, 2), np.int32), "scalar": np.array(3)}  # fmt: skip
    meta = {"dataset": "d", "seed": 7}
    got = json.loads(b"".join(json_pieces(arrays, meta, numbers)))
    assert got == {"metadata": meta, **{k: v.tolist() for k, v in arrays.items()}}


def test_response_bytes_in_flight_are_limited(redis_url, rdb, bpe_tokenizer, corpus):
    """With a large body held mid-way (a slow client), a second large batch would take the process past
    MASKSERVE_MAX_INFLIGHT_BYTES: it is refused at once with 503 overloaded (before anything is read), while
    a small one still fits; once the first body is sent, large batches are served again."""
    tap = BodyTap()
    with _server(redis_url, wrap=tap, response_piece_bytes=PIECE, max_inflight_bytes=2 << 20) as s, \
            Client(s.url, retries=0) as c:  # fmt: skip
        name = _dataset(c, bpe_tokenizer, corpus)
        try:
            (first,) = _get_batches(s.url, name, 1, "safetensors")
            _until(lambda: tap.held == 1 or first.done(), "the first body was held or sent")
            assert tap.held == 1, "the body was sent whole"
            second = httpx.get(f"{s.url}/v1/datasets/{name}/batch", params={"size": 1024}, timeout=30)
            assert second.status_code == 503, second.status_code
            assert second.json()["type"] == "urn:maskserve:problem:overloaded" and second.headers["Retry-After"] == "1"
            assert 100 <= int(second.headers["Maskserve-Retry-After-Ms"]) <= 300
            assert metric(s.url, 'maskserve_overloaded_total{reason="bytes"}') == 1
            assert c.batch(name, 8, seed=1)["input_ids"].shape == (8, SEQ_LEN)
        finally:
            tap.release.set()
        assert first.result(timeout=120).status_code == 200
        _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 0, "the first request finished")
        assert c.batch(name, 1024, seed=2)["input_ids"].shape == (1024, SEQ_LEN)


# ---- static builds: bounded per call, in memory, by quota ----------------------------------------------------


def test_static_build_memory_does_not_hold_every_copy(bpe_tokenizer, corpus):
    """Building K copies of a chunk keeps one full masked copy at a time plus compact records:
    the peak grows by far less than one full copy per extra copy."""
    import tracemalloc

    from service.masking.masking import MaskSpec, Vocab, mask_batch
    from service.masking.static import encode_chunk

    rng = np.random.default_rng(0)
    b, n = 256, 512
    ids = rng.integers(5, 2000, size=(b, n)).astype(np.uint16)
    lengths = np.full(b, n)
    vocab = Vocab.build(2000, [0, 2, 3], mask_id=4, pad_id=1)
    spec = MaskSpec()
    seq_ids = np.arange(b)

    def peak(k: int) -> int:
        tracemalloc.start()
        copies = (mask_batch(ids, lengths, seq_ids, seed=0, epoch=c, spec=spec, vocab=vocab) for c in range(k))
        encode_chunk(copies, np.dtype(np.uint16))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    one = mask_batch(ids, lengths, seq_ids, seed=0, epoch=0, spec=spec, vocab=vocab)
    full_copy = sum(a.nbytes for a in (one.input_ids, one.labels, one.attention_mask, one.selected,
                                       one.special_tokens_mask))  # fmt: skip
    growth = (peak(20) - peak(2)) / 18  # holding every copy whole costs about twice a full copy each
    assert growth < full_copy / 3, (growth, full_copy)


def test_static_build_stops_after_its_time_budget_and_the_next_call_goes_on(redis_url, rdb, bpe_tokenizer, corpus):
    with _server(redis_url, static_build_max_s=1e-6, chunk_max_sequences=32) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        chunks = c.dataset(name)["num_chunks"]
        assert chunks >= 3
        first = httpx.post(f"{s.url}/v1/datasets/{name}/static-masks", json={"copies": 2}, timeout=60).json()
        assert first["chunks"] == chunks and first["built"] == 1 and not first["complete"]
        done = c.build_static_masks(name, copies=2)  # the client calls until complete
        assert done["complete"] and done["built"] == chunks


def test_static_build_stops_when_its_client_has_gone(redis_url, rdb, bpe_tokenizer, corpus, held_masking):
    entered, release = held_masking.entered, held_masking.release
    with _server(redis_url, chunk_max_sequences=32) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        assert c.dataset(name)["num_chunks"] >= 3
        host, port = s.url.removeprefix("http://").split(":")
        body = json.dumps({"copies": 1}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST /v1/datasets/{name}/static-masks HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            assert entered.wait(120)
        release.set()  # the first chunk completes after its client is gone; no other is started
        _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 0, "the build returned")
        (cache,) = c.static_masks(name)
        assert cache["built"] == 1 and not cache["complete"]


def test_static_caches_and_copies_are_bounded(redis_url, rdb, bpe_tokenizer, corpus):
    with _server(redis_url, max_mask_caches=2, max_static_copies=12) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        r = httpx.post(f"{s.url}/v1/datasets/{name}/static-masks", json={"copies": 13}, timeout=60)
        assert r.status_code == 422 and r.json()["type"] == "urn:maskserve:problem:limit-exceeded"
        assert c.static_masks(name) == []
        c.build_static_masks(name, copies=2, seed=0)
        c.build_static_masks(name, copies=2, seed=1)
        r = httpx.post(f"{s.url}/v1/datasets/{name}/static-masks", json={"copies": 2, "seed": 2}, timeout=60)
        assert r.status_code == 422 and r.json()["limit"] == 2
        assert sorted(x["seed"] for x in c.static_masks(name)) == [0, 1]
        again = c.build_static_masks(name, copies=2, seed=1)  # an existing cache is not a new one
        assert again["complete"]


# ---- slow clients ---------------------------------------------------------------------------------------------


def _closed_by_server(sock: socket.socket, limit: float = 60) -> bool:
    """Block until the server closes the connection (True), or ``limit`` passes (False)."""
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.fixture
def strict_service(spawn_service, redis_url, rdb):
    env = service_env(REDIS_URL=redis_url, MASKSERVE_HEADER_TIMEOUT_S="0.5")
    return spawn_service(env)


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
def test_connections_whose_headers_never_complete_are_closed(strict_service, sent):
    with socket.create_connection(("127.0.0.1", strict_service.port)) as sock:
        sock.sendall(sent)
        assert _closed_by_server(sock)


def test_a_kept_alive_connection_gets_a_new_header_deadline_per_request(strict_service):
    with socket.create_connection(("127.0.0.1", strict_service.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request's headers start, and stall
        assert _closed_by_server(sock)


def test_a_body_that_stalls_gets_408(redis_url, rdb):
    with _server(redis_url, body_timeout_s=0.3) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/jobs/x/ack HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"worker\": ")  # fmt: skip
            sock.settimeout(60)
            head = sock.recv(65536)
        status, _, rest = head.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", head
        assert b"urn:maskserve:problem:request-timeout" in rest


def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(redis_url, rdb, bpe_tokenizer, corpus):
    with _server(redis_url, send_timeout_s=0.5, max_inflight=1) as s, Client(s.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        host, port = s.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(f"GET /v1/datasets/{name}/batch?size=1024&format=json HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            # never read: the response (megabytes of JSON) cannot be sent; the slot must come back regardless
            _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 0, "the slow reader was dropped")
        assert c.batch(name, 4, seed=0)["input_ids"].shape[0] == 4


# ---- maskserve serve --workers N ----------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_processes_share_one_port_and_one_embedded_store(spawn_service, tmp_path, bpe_tokenizer, corpus):
    """Two worker processes under one manager, the manager's embedded server shared by both; a killed
    manager takes its workers (and the server) with it, leaving the port free."""
    env = service_env(MASKSERVE_DATA_DIR=str(tmp_path / "data"))
    svc = spawn_service(env, workers=2)
    pids: set[int] = set()
    probes = 0
    with Client(svc.url, retries=0) as c:
        name = _dataset(c, bpe_tokenizer, corpus)
        with httpx.Client(base_url=svc.url, timeout=30) as h:
            for i in range(400):  # fresh connections: the kernel spreads them over both listeners' accepts
                pids.add(httpx.get(f"{svc.url}/healthz", timeout=30).json()["process"])
                probes += 1
                if len(pids) == 2:
                    break
            assert len(pids) == 2, "one worker took every connection"
            # /metrics, whichever worker answers, counts the requests of both (a worker counts a request once its
            # answer is sent, so the last one may be counted a moment after its client read it)
            def counted() -> float:
                text = h.get("/metrics").text
                served = re.search(r'^maskserve_requests_total\{route="/healthz",status="200"\} (\S+)$', text, re.M)
                assert served and float(served.group(1)) <= probes
                return float(served.group(1))

            _until(lambda: counted() == probes, "both workers' /healthz requests are counted")
            for seed in range(8):  # every batch is drawn from the one store, whichever worker answers
                assert h.get(f"/v1/datasets/{name}/batch", params={"size": 8, "seed": seed}).status_code == 200
    svc.stop(signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie until reaped by init: it holds nothing
            return f.read().split(") ")[1].startswith("Z")

    _until(lambda: all(gone(p) for p in pids), "the workers exited with their manager")

    def port_free() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", svc.port)) != 0

    _until(port_free, "the port was released")


def test_client_retries_a_refused_dataset_creation(redis_url, rdb, bpe_tokenizer, corpus):
    """Creating a dataset is not idempotent, yet an ``overloaded`` refusal did nothing: the client sends it again."""
    from client import OverloadedError

    with _server(redis_url, max_inflight=1) as s, Client(s.url, retries=0) as setup:
        name = _dataset(setup, bpe_tokenizer, corpus)
        sock = _open_ingest(s.url, name)
        _until(lambda: metric(s.url, "maskserve_inflight_heavy_requests") == 1, "the ingest was admitted")
        with pytest.raises(OverloadedError) as refused:
            setup.create_dataset("second", tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        assert 0.1 <= refused.value.retry_after <= 0.3 and setup.datasets()[0]["name"] == name
        seen: list[int] = []

        def on_response(resp: httpx.Response) -> None:
            seen.append(resp.status_code)
            if resp.status_code == 503:
                assert _finish_ingest(sock) == 200

        with Client(s.url, retries=2) as c:
            c._http.event_hooks["response"].append(on_response)
            c.create_dataset("second", tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
        assert seen == [503, 201]
        assert sorted(d["name"] for d in setup.datasets()) == sorted([name, "second"])


def test_the_process_manager_imports_none_of_the_app():
    """Under --workers N the manager only supervises: the app (FastAPI, numpy, tokenizers...) is imported by
    the workers alone, so the manager stays small."""
    import subprocess
    import sys

    probe = (
        "import sys, uvicorn\n"
        "uvicorn.run = lambda *a, **k: None  # the manager's work up to starting workers, without starting them\n"
        "from service.core.config import Settings\n"
        "from service.http.serving import serve\n"
        "serve(Settings(redis_url='redis://127.0.0.1:1'), host='127.0.0.1', port=1, workers=2,\n"
        "      log_level='warning', access_log=False)\n"
        "print(sorted(m for m in ('service.http.app', 'fastapi', 'numpy', 'tokenizers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_batch_routes_are_served_directly_and_only_endpoints_of_path_strings_and_the_request_can_be():
    """The two batch routes are answered by Starlette in front of FastAPI's routes (which stay in the OpenAPI
    document); an endpoint that takes more (a query parameter, a typed path parameter) is refused when the
    app is built, since nothing would parse it."""
    from fastapi import APIRouter, Depends

    from service.http.app import DirectRoute, create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1"))  # built, not started: no Redis needed
    direct = [r for r in app.router.routes if isinstance(r, DirectRoute)]
    assert {r.path: r.methods for r in direct} == {"/v1/datasets/{name}/batch": {"GET", "HEAD"},
                                                   "/v1/jobs/{name}/next": {"POST"}}  # fmt: skip
    paths = app.openapi()["paths"]
    assert "get" in paths["/v1/datasets/{name}/batch"] and "post" in paths["/v1/jobs/{name}/next"]

    router = APIRouter()
    router.add_api_route("/q/{name}", _with_query)
    router.add_api_route("/t/{n}", _typed_path)
    for route in router.routes:
        with pytest.raises(TypeError, match="path parameters"):
            DirectRoute(route)
    guarded = APIRouter(dependencies=[Depends(_typed_path)])  # say, a check of the caller
    guarded.add_api_route("/g/{name}", _plain)
    with pytest.raises(TypeError, match="dependencies"):
        DirectRoute(guarded.routes[0])
    plain = APIRouter()
    plain.add_api_route("/p/{name}", _plain)
    assert DirectRoute(plain.routes[0]).name == "_plain"


async def _with_query(name: str, request: Request, size: int = 1) -> None: ...


async def _typed_path(n: int, request: Request) -> None: ...


async def _plain(name: str, request: Request) -> None: ...
