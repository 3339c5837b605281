"""The thin client.

``httpx.MockTransport`` stands in for the network only where client-side
behaviour is under test (retries, error mapping, corrupt bodies); everything
about batches themselves runs against the real service.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import time
import uuid
import warnings

import httpx
import numpy as np
import pytest
import torch

from client import (
    APIError,
    AuthenticationError,
    BadRequestError,
    AsyncClient,
    Batch,
    Client,
    ConflictError,
    GatewayError,
    MaskserveError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTooLargeError,
    ServiceUnavailableError,
    TransportError,
    UnsupportedMediaTypeError,
    encode,
)

CT = "application/vnd.safetensors"
PROBLEM = "application/problem+json"


def problem_response(status: int, **extra) -> httpx.Response:
    body = {"type": f"urn:maskserve:problem:test-{status}", "title": f"Title {status}", "status": status,
            "detail": f"detail for {status}", **extra}  # fmt: skip
    return httpx.Response(status, json=body, headers={"content-type": PROBLEM})


def good_body(index: int = 0) -> bytes:
    arrays = {
        "input_ids": np.arange(12, dtype=np.int32).reshape(3, 4),
        "attention_mask": np.ones((3, 4), dtype=np.uint8),
        "labels": np.full((3, 4), -100, dtype=np.int32),
        "sequence_ids": np.array([5, 6, 7], dtype=np.int64),
    }
    return encode(arrays, {"dataset": "d", "seed": 11, "epoch": 0, "index": index})


class Recorder:
    """A MockTransport handler that answers from a script and records requests."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


class Blocking:
    """An :class:`AsyncClient` called from blocking test code: each call runs to its end on the wrapper's own
    event loop, so one test body checks both clients."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kw: self._loop.run_until_complete(attr(*args, **kw))

    def __enter__(self) -> "Blocking":
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


@pytest.fixture(params=["sync", "async"])
def mock_client(request):
    """A client of either kind over ``httpx.MockTransport(handler)``: both carry out the same plans, so each
    test of retries, failover and errors holds for both."""

    def make(handler, retries: int = 3) -> Client | Blocking:
        mock = httpx.MockTransport(handler)
        if request.param == "sync":
            return Client("http://maskserve.invalid", transport=mock, retries=retries, backoff=0)
        return Blocking(AsyncClient("http://maskserve.invalid", transport=mock, retries=retries, backoff=0))

    return make


def ok(body: bytes | None = None) -> httpx.Response:
    return httpx.Response(200, content=body if body is not None else good_body(), headers={"content-type": CT})


# ---- retries and errors (client side, mocked network) ----------------------


@pytest.mark.parametrize("status", [502, 503, 504])
def test_retries_transient_status_then_succeeds(mock_client, status):
    rec = Recorder(problem_response(status), problem_response(status), ok())
    with mock_client(rec, retries=3) as c:
        b = c.batch("d", 3, seed=11)
    assert len(rec.requests) == 3
    np.testing.assert_array_equal(b["input_ids"], np.arange(12).reshape(3, 4))
    assert b.seed == 11
    # every attempt is the same request
    assert len({str(r.url) for r in rec.requests}) == 1


def test_gives_up_after_retries_with_typed_error(mock_client):
    rec = Recorder(problem_response(503, retry_after=1))
    with mock_client(rec, retries=2) as c, pytest.raises(ServiceUnavailableError) as info:
        c.batch("d", 3, seed=1)
    assert len(rec.requests) == 3
    assert info.value.status == 503
    assert info.value.type == "urn:maskserve:problem:test-503"
    assert info.value.extra == {"retry_after": 1}


def test_no_retry_on_400(mock_client):
    rec = Recorder(problem_response(400, line=3), ok())
    with mock_client(rec, retries=3) as c, pytest.raises(BadRequestError) as info:
        c.batch("d", 3, seed=1)
    assert len(rec.requests) == 1
    err = info.value
    assert (err.status, err.type, err.title, err.detail) == (400, "urn:maskserve:problem:test-400", "Title 400",
                                                             "detail for 400")  # fmt: skip
    assert err.extra == {"line": 3}


def test_transport_error_after_retries(mock_client):
    rec = Recorder(httpx.ConnectError("connection refused"))
    with mock_client(rec, retries=2) as c, pytest.raises(TransportError) as info:
        c.batch("d", 3, seed=1)
    assert len(rec.requests) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert isinstance(info.value, MaskserveError)


def test_transport_error_then_success(mock_client):
    rec = Recorder(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), ok())
    with mock_client(rec, retries=2) as c:
        assert len(c.batch("d", 3, seed=1)) == 3
    assert len(rec.requests) == 3


def test_retries_zero_means_one_attempt(mock_client):
    rec = Recorder(problem_response(503), ok())
    with mock_client(rec, retries=0) as c, pytest.raises(ServiceUnavailableError):
        c.batch("d", 3, seed=1)
    assert len(rec.requests) == 1


def test_non_idempotent_call_not_retried(mock_client):
    rec = Recorder(problem_response(503), httpx.Response(201, json={"name": "x"}))
    with mock_client(rec, retries=3) as c, pytest.raises(ServiceUnavailableError):
        c.create_dataset("x", tokenizer={"model": {}}, seq_len=16)
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    "status,cls",
    [(400, BadRequestError), (401, AuthenticationError), (403, AuthenticationError), (404, NotFoundError),
     (406, UnsupportedMediaTypeError), (409, ConflictError), (413, PayloadTooLargeError),
     (415, UnsupportedMediaTypeError), (422, BadRequestError), (503, ServiceUnavailableError), (500, APIError),
     (418, APIError)],  # fmt: skip
)
def test_problem_bodies_become_typed_errors(mock_client, status, cls):
    rec = Recorder(problem_response(status, dataset="wiki"))
    with mock_client(rec, retries=0) as c:
        with pytest.raises(cls) as info:
            c.dataset("wiki")
        assert type(info.value) is cls
        assert info.value.status == status and info.value.extra == {"dataset": "wiki"}
        assert info.value.detail == f"detail for {status}"
        with pytest.raises(cls):
            c.batch("wiki", 2, seed=0)  # the streamed path maps errors the same way


def test_error_without_problem_body(mock_client):
    rec = Recorder(httpx.Response(404, text="plain not found"))
    with mock_client(rec, retries=0) as c, pytest.raises(NotFoundError) as info:
        c.dataset("x")
    assert info.value.type == "about:blank"
    assert info.value.title == "Not Found"
    assert "plain not found" in info.value.detail


def nginx_page(status: int, reason: str) -> httpx.Response:
    page = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} {reason}"
            "</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")  # fmt: skip
    return httpx.Response(status, text=page, headers={"content-type": "text/html"})


@pytest.mark.parametrize(
    "status,reason,cls,retried",
    [(414, "Request-URI Too Large", RequestTooLargeError, False),
     (431, "Request Header Fields Too Large", RequestTooLargeError, False),
     (502, "Bad Gateway", GatewayError, True), (503, "Service Temporarily Unavailable", ServiceUnavailableError, True),
     (504, "Gateway Time-out", GatewayError, True)],  # fmt: skip
)
def test_a_proxys_html_error_page_is_a_typed_error_with_its_status(mock_client, status, reason, cls, retried):
    """Not a problem: the class of the status, the page's title as the detail; 502/503/504 retried as from
    the service (idempotent calls), a request too large for the proxy not (it would be refused again)."""
    rec = Recorder(nginx_page(status, reason))
    with mock_client(rec, retries=2) as c:
        for call in (lambda: c.dataset("wiki"), lambda: c.batch("wiki", 2, seed=0)):  # plain and streamed paths
            rec.requests.clear()
            with pytest.raises(cls) as info:
                call()
            assert type(info.value) is cls and len(rec.requests) == (3 if retried else 1)
            err = info.value
            assert (err.status, err.type, err.detail, err.extra) == (status, "about:blank", f"{status} {reason}", {})
            assert str(err).startswith(f"{status} ") and f"{status} {reason}" in str(err) and "<" not in str(err)
        rec.requests.clear()
        with pytest.raises(cls):
            c.create_dataset("x", tokenizer={"model": {}}, seq_len=16)  # not idempotent: never sent twice
        assert len(rec.requests) == 1


def corrupt_bodies() -> list:
    valid = good_body()
    neg = json.dumps({"input_ids": {"dtype": "I32", "shape": [-1, -4], "data_offsets": [0, 16]}}).encode()
    meta = json.dumps({"__metadata__": "x"}).encode()
    return [
        pytest.param(b"not safetensors at all", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(valid[: len(valid) // 2], id="truncated"),
        pytest.param(len(neg).to_bytes(8, "little") + neg + bytes(16), id="negative-dims"),
        pytest.param(len(meta).to_bytes(8, "little") + meta, id="metadata-not-object"),
    ]


@pytest.mark.parametrize("body", corrupt_bodies())
def test_corrupt_batch_body_raises_protocol_error(mock_client, body):
    rec = Recorder(ok(body))
    with mock_client(rec, retries=2) as c, pytest.raises(ProtocolError):
        c.batch("d", 3, seed=1)


def test_body_shorter_than_content_length_raises_protocol_error(mock_client):
    def short(_):
        return httpx.Response(200, headers={"content-length": "4096", "content-type": CT},
                              stream=httpx.ByteStream(good_body()[:100]))  # fmt: skip

    with mock_client(Recorder(short), retries=0) as c, pytest.raises(ProtocolError):
        c.batch("d", 3, seed=1)


def test_gzip_compressed_batch_is_decoded(mock_client):
    """A proxy may compress the response; httpx asks for gzip by default."""
    body = good_body()
    compressed = gzip.compress(body)
    assert len(compressed) < len(body)
    rec = Recorder(httpx.Response(200, content=compressed, headers={"content-type": CT, "content-encoding": "gzip"}))
    with mock_client(rec, retries=0) as c:
        b = c.batch("d", 3, seed=1)
    np.testing.assert_array_equal(b["input_ids"], np.arange(12).reshape(3, 4))


def test_json_endpoint_not_json_is_protocol_error(mock_client):
    rec = Recorder(httpx.Response(200, text="<html>"))
    with mock_client(rec, retries=0) as c, pytest.raises(ProtocolError):
        c.dataset("x")


# ---- real service ----------------------------------------------------------


@pytest.fixture
def ds(client, bpe_tokenizer, corpus):
    name = f"c-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    client.ingest(name, corpus[:200])
    return name


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.metadata == b.metadata
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype


def test_batch_against_service(client, ds):
    b = client.batch(ds, 16, seed=3, index=2, mlm_probability=0.2)
    assert len(b) == 16 and b.index == 2 and b.seed == 3 and b.step == 2
    assert b["input_ids"].shape == (16, 64) and b["input_ids"].dtype == np.int32
    assert b["sequence_ids"].dtype == np.int64
    # arrays are writable views of one received buffer
    assert all(a.flags.writeable for a in b.arrays.values())
    assert np.shares_memory(b["input_ids"], b["labels"]) is False
    base = b["input_ids"].base
    while getattr(base, "base", None) is not None and not isinstance(base, (bytes, bytearray, memoryview)):
        base = base.base
    assert all(np.shares_memory(a, np.frombuffer(base, np.uint8)) for a in b.arrays.values())


def test_no_seed_reports_service_seed(client, ds):
    b = client.batch(ds, 4)
    assert b.seed > 0
    again = client.batch(ds, 4, seed=b.seed)
    assert_same_batch(b, again)


def test_batches_prefetch_in_order_and_equal_single_fetches(client, ds):
    start, steps = 5, 12
    stream = client.batches(ds, batch_size=8, seed=9, start=start, steps=steps, prefetch=4, mlm_probability=0.3)
    got = list(stream)
    assert [b.index for b in got] == list(range(start, start + steps))
    assert [b.step for b in got] == list(range(start, start + steps))
    for b in got:
        assert_same_batch(b, client.batch(ds, 8, seed=9, index=b.index, mlm_probability=0.3))
    # resuming at a later start replays the same stream
    tail = list(client.batches(ds, batch_size=8, seed=9, start=start + 7, steps=5, mlm_probability=0.3))
    for a, b in zip(got[7:], tail):
        assert_same_batch(a, b)
    assert list(client.batches(ds, batch_size=8, seed=9, steps=0)) == []


def test_batches_unbounded_stream_can_be_closed(client, ds):
    with client.batches(ds, batch_size=4, seed=1, prefetch=2) as stream:
        first = [next(stream).index for _ in range(6)]
    assert first == list(range(6))
    with pytest.raises(StopIteration):
        next(stream)


def test_batches_error_propagates(client):
    with pytest.raises(NotFoundError):
        list(client.batches("no-such-dataset", batch_size=4, steps=3))


def test_batch_torch_dtypes_and_values(client, ds):
    b = client.batch(ds, 8, seed=2, mlm_probability=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" warning
        t = b.torch()
    assert set(t) == {"input_ids", "attention_mask", "labels"}
    for name, tensor in t.items():
        assert tensor.dtype == torch.int64
        assert tuple(tensor.shape) == b[name].shape
        np.testing.assert_array_equal(tensor.numpy(), b[name])
    cpu = b.torch("cpu")
    assert all(cpu[k].device.type == "cpu" and cpu[k].dtype == torch.int64 for k in cpu)


def test_batch_numpy_int64_on_request(client, ds):
    b = client.batch(ds, 8, seed=2, mlm_probability=0.5, special_tokens_mask=True)
    plain = b.numpy()
    assert plain["input_ids"].dtype == np.int32 and plain["labels"].dtype == np.int32
    wide = b.numpy(int64=True)
    assert set(wide) == set(plain)
    for name, a in wide.items():
        assert a.dtype == np.int64, name
        np.testing.assert_array_equal(a, plain[name])
    assert (wide["labels"] == -100).any() and (wide["labels"] >= 0).any()
    assert wide["sequence_ids"] is plain["sequence_ids"], "an int64 array is not copied"


def test_batch_torch_does_not_copy_what_is_already_int64():
    buf = bytearray(encode({
        "input_ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "attention_mask": np.ones((2, 3), dtype=np.int64),
        "labels": np.full((2, 3), -100, dtype=np.int64),
    }))  # fmt: skip
    from client import decode

    arrays, meta = decode(buf)
    t = Batch(arrays, meta).torch()
    for name, tensor in t.items():
        assert tensor.dtype == torch.int64
        assert np.shares_memory(tensor.numpy(), arrays[name]), f"{name} was copied"
    arrays["attention_mask"][0, 0] = 0
    assert t["attention_mask"][0, 0].item() == 0


def _loader_items(url: str, name: str, workers: int) -> list[tuple[int, list[int], list[list[int]]]]:
    from torch.utils.data import DataLoader

    from client.torch import MaskedBatches

    ds = MaskedBatches(url, name, batch_size=8, seed=4, start=3, steps=7, prefetch=2, mlm_probability=0.25,
                       metadata=True)
    out = []
    for item in DataLoader(ds, batch_size=None, num_workers=workers):
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (8, 64)
        out.append((int(item["index"]), item["sequence_ids"].tolist(), item["labels"].tolist()))
    return out


def test_masked_batches_yield_model_inputs_unless_metadata_is_asked(service_url, client, ds):
    from client.torch import MaskedBatches

    plain = next(iter(MaskedBatches(service_url, ds, batch_size=4, seed=1, steps=1)))
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 for t in plain.values())
    full = next(iter(MaskedBatches(service_url, ds, batch_size=4, seed=1, steps=1, metadata=True)))
    assert set(full) == {"input_ids", "attention_mask", "labels", "sequence_ids", "index"}
    for name in plain:
        assert torch.equal(plain[name], full[name])
    assert full["sequence_ids"].tolist() == client.batch(ds, 4, seed=1)["sequence_ids"].tolist()


def test_job_batches_yield_model_inputs_unless_metadata_is_asked(service_url, ds):
    from client.torch import JobBatches

    create = {"dataset": ds, "batch_size": 16, "seed": 3, "epochs": 1}
    plain = next(iter(JobBatches(service_url, "plain-job", create=create, worker="w")))
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    full = next(iter(JobBatches(service_url, "meta-job", create=create, worker="w", metadata=True)))
    assert set(full) == {"input_ids", "attention_mask", "labels", "sequence_ids", "epoch", "index"}
    assert int(full["epoch"]) == 0 and full["sequence_ids"].shape == (16,)


def test_masked_batches_single_process(service_url, client, ds):
    items = _loader_items(service_url, ds, 0)
    assert [i for i, _, _ in items] == list(range(3, 10))
    for index, seq_ids, labels in items:
        b = client.batch(ds, 8, seed=4, index=index, mlm_probability=0.25)
        assert seq_ids == b["sequence_ids"].tolist()
        assert labels == b["labels"].tolist()


def test_masked_batches_same_stream_with_two_workers(service_url, ds):
    started = time.monotonic()
    one = _loader_items(service_url, ds, 0)
    two = _loader_items(service_url, ds, 2)
    assert [i for i, _, _ in two] == list(range(3, 10))
    assert two == one
    assert time.monotonic() - started < 60


# ---- ingest idempotency ----------------------------------------------------


def test_ingest_same_idempotency_key_is_stored_once(client, bpe_tokenizer, corpus):
    name = f"i-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    first = client.ingest(name, corpus[:30], idempotency_key="k-1")
    again = client.ingest(name, corpus[:30], idempotency_key="k-1")
    assert first["duplicate"] is False and again["duplicate"] is True
    assert {k: v for k, v in again.items() if k != "duplicate"} == {k: v for k, v in first.items() if k != "duplicate"}
    assert client.dataset(name)["num_sequences"] == first["sequences"]
    other = client.ingest(name, corpus[:30], idempotency_key="k-2")
    assert other["duplicate"] is False and other["first_sequence_id"] == first["sequences"]
    assert client.dataset(name)["num_sequences"] == 2 * first["sequences"]


def test_ingest_list_retried_under_same_key_after_lost_response(mock_client, service_url, client, bpe_tokenizer, corpus):
    """The first attempt reaches the service and commits, but its response is lost;
    the client retries with the same Idempotency-Key and the data is stored once."""
    name = f"r-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=64)
    seen: list[tuple[str | None, bytes]] = []
    with httpx.Client(base_url=service_url, timeout=30) as real:

        def forward(request: httpx.Request) -> httpx.Response:
            body = request.read()
            seen.append((request.headers.get("idempotency-key"), body))
            upstream = real.request(request.method, request.url.path, params=request.url.params, content=body,
                                    headers={k: request.headers[k] for k in ("content-type", "idempotency-key")})  # fmt: skip
            if len(seen) == 1:
                raise httpx.ReadError("connection reset after the request was sent")
            return httpx.Response(upstream.status_code, content=upstream.content,
                                  headers={"content-type": upstream.headers["content-type"]})  # fmt: skip

        with mock_client(forward, retries=2) as c:
            res = c.ingest(name, corpus[:25])
    assert len(seen) == 2
    assert seen[0][0] and seen[0][0] == seen[1][0], "retry must reuse the Idempotency-Key"
    assert seen[0][1] == seen[1][1] and seen[0][1].count(b"\n") == 25, "the retry resends the whole body"
    assert res["duplicate"] is True and res["documents"] == 25
    info = client.dataset(name)
    assert info["num_sequences"] == res["sequences"] and info["num_documents"] == 25


def test_ingest_generator_is_not_retried(mock_client):
    rec = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json={}))
    with mock_client(rec, retries=3) as c, pytest.raises(TransportError):
        c.ingest("d", (t for t in ["a", "b"]))
    assert len(rec.requests) == 1


def test_every_summary_after_the_first_carries_a_lease_round_trip():
    """The service keeps only a worker's latest summary: one sent while no lease was answered since the previous
    one carries the round trip of the latest leases again, rather than none."""
    with Client("http://maskserve.invalid", transport=httpx.MockTransport(lambda r: httpx.Response(500))) as c:
        stream = c.job("j", worker="w", stats_every=0.0)
        stream._batches, stream._leases, stream._lease_s = 2, 2, 0.5  # two batches, both leases answered
        first = stream._take_stats()
        stream._batches = 1  # one more batch trained, its lease answered before the last summary
        second = stream._take_stats()
        stream._batches, stream._leases, stream._lease_s = 1, 1, 0.1
        third = stream._take_stats()
        stream.close()  # nothing leased, nothing to ack: no request
    assert (first["leases"], first["lease_s"]) == (2, 0.5)
    assert (second["batches"], second["leases"], second["lease_s"]) == (1, 2, 0.5)
    assert (third["leases"], third["lease_s"]) == (1, 0.1)
