"""The thin client: datasets, ingest, and masked batches with background prefetch."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from ._batch import Batch, Closing
from ._errors import APIError, OverloadedError, ProtocolError, ServiceUnavailableError, TransportError, error_from_response
from wire import CONTENT_TYPE, WireFormatError, decode

DEFAULT_URL = "http://127.0.0.1:8000"
_RETRY_STATUS = (502, 503, 504)

Document = str | Mapping[str, Any] | Sequence[int]


class Client:
    """Synchronous client for one maskserve service (or several replicas of it).

    >>> with Client("http://127.0.0.1:8000") as c:          # doctest: +SKIP
    ...     for batch in c.batches("wiki", batch_size=64, steps=100):
    ...         loss = model(**batch.torch("cuda"))

    ``base_url`` may name several replicas (a list, or one string separated
    by commas): a request that cannot reach one, or gets 502/503/504 from it,
    moves on to the next. ``transport`` (or a ready ``http`` client) lets
    tests swap the network. Idempotent calls are retried ``retries`` times on
    transport errors and 502/503/504, with exponential backoff from
    ``backoff`` seconds up to ``max_backoff`` (or the service's
    ``Retry-After``); ingests carry an Idempotency-Key so a retried upload is
    stored once.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        urls = base_url or os.environ.get("MASKSERVE_URL") or DEFAULT_URL
        if isinstance(urls, str):
            urls = urls.split(",")
        self.base_urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.base_urls:
            raise ValueError("no service URL given")
        self._url = 0  # index of the replica in use
        token = token if token is not None else os.environ.get("MASKSERVE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._http = http or httpx.Client(
            headers=headers, timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )  # fmt: skip

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self.base_urls[self._url % len(self.base_urls)]

    def _fail_over(self, failed: str) -> None:
        if self.base_url == failed:  # another thread may have moved on already
            self._url = (self._url + 1) % len(self.base_urls)

    # ---- plumbing ----------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, method: str, path: str, *, idempotent: bool, read_into: bool = False, patience: float | None = None,
        should_stop: Callable[[], bool] | None = None, on_retry: Callable[[Exception, int], None] | None = None,
        **kw: Any,
    ) -> httpx.Response | tuple[httpx.Response, bytearray]:  # fmt: skip
        """One request, retried on transport errors and 502/503/504 when ``idempotent``, and whatever it
        is when the service answered ``overloaded`` (it did nothing with it) and its body can be sent again.

        Retries stop after ``retries`` attempts, or, with ``patience``, once that many seconds have
        passed since the first failure; ``should_stop()`` ends them early. ``on_retry(error, n)`` is
        told of each failure that will be retried.
        """
        attempt = 0
        first_failure: float | None = None
        while True:
            url = self.base_url
            try:
                if read_into:
                    with self._http.stream(method, url + path, **kw) as resp:
                        if resp.status_code >= 400:
                            resp.read()
                            raise error_from_response(resp.status_code, resp.content, resp.headers)
                        return resp, _read_into(resp)
                resp = self._http.request(method, url + path, **kw)
                if resp.status_code >= 400:
                    raise error_from_response(resp.status_code, resp.content, resp.headers)
                return resp
            except httpx.TransportError as exc:
                err: Exception = TransportError(f"{method} {url}{path}: {exc.__class__.__name__}: {exc}")
                err.__cause__ = exc
                delay = None
            except APIError as exc:
                if exc.status not in _RETRY_STATUS:
                    raise
                err, delay = exc, exc.retry_after
            self._fail_over(url)
            attempt += 1
            now = time.monotonic()
            first_failure = first_failure or now
            out_of_time = now - first_failure >= patience if patience is not None else attempt > self.retries
            replayable = isinstance(kw.get("content"), (bytes, str, type(None)))  # not a consumed generator
            retryable = idempotent or (isinstance(err, OverloadedError) and replayable)
            if not retryable or out_of_time or (should_stop is not None and should_stop()):
                raise err
            if on_retry is not None:
                on_retry(err, attempt)
            if delay is None:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
            if patience is not None:
                delay = min(delay, max(0.0, first_failure + patience - now))
            time.sleep(delay)

    def _json(self, method: str, path: str, *, idempotent: bool = True, **kw: Any) -> Any:
        resp = self._send(method, path, idempotent=idempotent, **kw)
        assert isinstance(resp, httpx.Response)
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise ProtocolError(f"{method} {path}: response is not JSON") from None

    # ---- service -----------------------------------------------------------

    def health(self) -> bool:
        try:
            return self._json("GET", "/healthz", idempotent=False)["status"] == "ok"
        except (TransportError, APIError):
            return False

    def ready(self) -> bool:
        try:
            self._json("GET", "/readyz", idempotent=False)
            return True
        except (TransportError, APIError):
            return False

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Block until ``/readyz`` answers, or raise :class:`ServiceUnavailableError`."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(503, title="Service Unavailable", detail=f"{self.base_url} not ready after {timeout}s")
            time.sleep(interval)

    # ---- datasets ----------------------------------------------------------

    def train_tokenizer(
        self, texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 8000, min_frequency: int = 2
    ) -> dict[str, Any]:
        """Have the service train a tokenizer on ``texts``; returns tokenizer.json."""
        params = {"kind": kind, "vocab_size": vocab_size, "min_frequency": min_frequency}
        body = _ndjson({"text": t} for t in texts)
        return self._json("POST", "/v1/tokenizers/train", idempotent=False, params=params, content=body,
                          headers={"Content-Type": "application/x-ndjson"})  # fmt: skip

    def create_dataset(
        self,
        name: str,
        *,
        tokenizer: Mapping[str, Any] | str | Path,
        seq_len: int,
        packing: str = "complete",
        special_tokens: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a dataset. ``tokenizer``: a tokenizer.json dict, its text, or a path to one."""
        if isinstance(tokenizer, Path) or (isinstance(tokenizer, str) and not tokenizer.lstrip().startswith("{")):
            tokenizer = Path(tokenizer).read_text()
        if isinstance(tokenizer, str):
            tokenizer = json.loads(tokenizer)
        body = {"name": name, "seq_len": seq_len, "packing": packing, "tokenizer": tokenizer}
        if special_tokens:
            body["special_tokens"] = dict(special_tokens)
        return self._json("POST", "/v1/datasets", idempotent=False, json=body)

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")["datasets"]

    def dataset(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{name}")

    def tokenizer(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{name}/tokenizer")

    def delete_dataset(self, name: str, *, missing_ok: bool = False) -> None:
        from ._errors import NotFoundError

        try:
            self._json("DELETE", f"/v1/datasets/{name}")
        except NotFoundError:
            if not missing_ok:
                raise

    def ingest(
        self,
        name: str,
        docs: Iterable[Document],
        *,
        idempotency_key: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Stream documents (texts, ``{"text"|"ids": ...}`` dicts, or id lists) as NDJSON.

        The upload is atomic: all of it is stored, or nothing. When ``docs``
        can be iterated again (a list, not a generator) a failed upload is
        retried under the same Idempotency-Key, so it is stored exactly once.
        ``on_bytes(n)`` is called as body bytes are sent (for progress bars).
        """
        key = idempotency_key or uuid.uuid4().hex
        replayable = iter(docs) is not docs
        return self._json(
            "POST", f"/v1/datasets/{name}/documents", idempotent=replayable,
            content=_Replayable(lambda: _ndjson(map(_as_record, docs), on_bytes)),
            headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": key},
        )  # fmt: skip

    def ingest_file(
        self, name: str, path: str | Path, *, split: str = "none", idempotency_key: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Stream a file: ``.jsonl``/``.ndjson`` as NDJSON, anything else as plain text."""
        path = Path(path)
        ctype = "application/x-ndjson" if path.suffix in (".jsonl", ".ndjson") else "text/plain"
        params = {} if ctype != "text/plain" else {"split": split}
        return self._json(
            "POST", f"/v1/datasets/{name}/documents", idempotent=True, params=params,
            content=_Replayable(lambda: _file_chunks(path, on_bytes)),
            headers={"Content-Type": ctype, "Idempotency-Key": idempotency_key or uuid.uuid4().hex},
        )  # fmt: skip

    # ---- batches -----------------------------------------------------------

    def batch(
        self,
        name: str,
        size: int = 32,
        *,
        seed: int | None = None,
        index: int = 0,
        epoch: int | None = None,
        **options: Any,
    ) -> Batch:
        """One masked batch: B sequences drawn by ``(seed, index)``, masked for ``epoch``.

        Batch k holds positions kB .. kB+B-1 of the stream that concatenates
        the seed's per-epoch permutations (a job's order), so consecutive
        batches cover every sequence once per epoch. ``mask_seed=`` seeds the
        masks apart from the order.

        ``options`` are the service's masking and output parameters, e.g.
        ``mlm_probability=0.15, unit="whole_word", count="exact", mode="static",
        copies=10, labels="sparse", special_tokens_mask=True, pad_to_multiple_of=8``.
        """
        params: dict[str, Any] = {"size": size, "index": index}
        params.update({k: _param(v) for k, v in options.items() if v is not None})
        if seed is not None:
            params["seed"] = seed
        if epoch is not None:
            params["epoch"] = epoch
        out = self._send("GET", f"/v1/datasets/{name}/batch", idempotent=True, read_into=True, params=params,
                         headers={"Accept": CONTENT_TYPE})  # fmt: skip
        resp, buf = out  # type: ignore[misc]
        try:
            arrays, metadata = decode(buf)
        except WireFormatError as exc:
            raise ProtocolError(f"batch from {self.base_url}: {exc}") from None
        metadata.setdefault("seed", resp.headers.get("maskserve-seed", "0"))
        return Batch(arrays, metadata, step=index)

    def sequences(
        self, name: str, ids: Sequence[int], *, seed: int = 0, epoch: int = 0, **options: Any
    ) -> Batch:
        """The sequences ``ids`` (rows in that order), masked for ``(seed, epoch)``.

        With ``mode="static"`` the cached copy ``epoch mod copies`` of the
        (seed, copies, masking) cache is served. The same call always gives the
        same masks: a fixed evaluation set needs no job. ``options`` are the
        masking and output parameters of :meth:`batch`.
        """
        body: dict[str, Any] = {"ids": [int(i) for i in ids], "seed": seed, "epoch": epoch}
        body.update({k: v for k, v in options.items() if v is not None})
        out = self._send("POST", f"/v1/datasets/{name}/sequences", idempotent=True, read_into=True, json=body,
                         headers={"Accept": CONTENT_TYPE})  # fmt: skip
        _, buf = out  # type: ignore[misc]
        try:
            arrays, metadata = decode(buf)
        except WireFormatError as exc:
            raise ProtocolError(f"sequences from {self.base_url}: {exc}") from None
        return Batch(arrays, metadata)

    # ---- jobs --------------------------------------------------------------------

    def create_job(
        self, name: str, dataset: str, *, batch_size: int = 32, seed: int = 0, shuffle: bool = True,
        epochs: int | None = 1, drop_last: bool = False, lease_timeout_s: float = 60.0,
        epoch_boundary: str = "handout", masking: Mapping[str, Any] | None = None, mask_seed: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Create a job, or attach to the existing one with the same config (a different one is a ConflictError).

        ``mask_seed`` seeds the masks (and names a static job's cache) apart from the data order's ``seed``.
        """
        body = {"name": name, "dataset": dataset, "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
                "epochs": epochs, "drop_last": drop_last, "lease_timeout_s": lease_timeout_s,
                "epoch_boundary": epoch_boundary, "masking": dict(masking or {})}  # fmt: skip
        if mask_seed is not None:
            body["mask_seed"] = mask_seed
        return self._json("POST", "/v1/jobs", idempotent=True, json=body)

    def jobs(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/jobs")["jobs"]

    def job_progress(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{name}")

    def cancel_job(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{name}/cancel")

    def delete_job(self, name: str) -> None:
        self._json("DELETE", f"/v1/jobs/{name}")

    def evict_worker(self, name: str, worker: str) -> int:
        """A worker known to be gone: its leased batches are handed out again now. Returns how many."""
        return self._json("POST", f"/v1/jobs/{name}/workers/{worker}/evict")["released"]

    def job(
        self, name: str, *, worker: str | None = None, prefetch: int = 2, auto_ack: bool = True,
        create: Mapping[str, Any] | None = None, max_outage: float = 300.0, ack_every: int = 1,
        ack_delay: float = 2.0, **output: Any,
    ) -> "JobStream":  # fmt: skip
        """Attach to job ``name`` (creating it from ``create`` if given) and iterate its batches.

        Batches come in (epoch, index) order. Each is acked when the next one
        is asked for (or explicitly with ``stream.ack(batch)`` when
        ``auto_ack=False``); ``close()`` acks the last one handed out and
        gives back the rest. Lease requests ride out an unreachable or
        overloaded service (failing over between replicas) for up to
        ``max_outage`` seconds. A cancelled job raises :class:`JobCancelled`.
        ``ack_every=N`` sends acks in groups of N (or after ``ack_delay`` seconds):
        fewer fsyncs on a service with durable acks, at the price of up to N-1
        batches trained again should this worker die.
        Batches carry ``metadata["epoch"|"index"|"lease"]``.
        """
        from ._jobs import JobStream

        if create is not None:
            self.create_job(name, **create)
        return JobStream(self, name, worker=worker, prefetch=prefetch, auto_ack=auto_ack, max_outage=max_outage,
                         ack_every=ack_every, ack_delay=ack_delay, **output)  # fmt: skip

    # ---- static masks and the masking report ---------------------------------

    def build_static_masks(
        self, name: str, *, seed: int = 0, copies: int = 10, max_chunks: int | None = None, **masking: Any
    ) -> dict[str, Any]:
        """Build (or finish) the static-mask cache for this config; idempotent.

        With ``max_chunks``, one call building at most that many chunks (loop until
        ``complete`` to show progress). Without, calls until the cache is complete
        (the service bounds the time of each call and goes on where the last stopped).
        """
        body = {"seed": seed, "copies": copies, **masking}
        if max_chunks is not None:
            body["max_chunks"] = max_chunks
        path = f"/v1/datasets/{name}/static-masks"
        status = self._json("POST", path, json=body)
        while max_chunks is None and not status["complete"]:
            status = self._json("POST", path, json=body)
        return status

    def static_masks(self, name: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/datasets/{name}/static-masks")["caches"]

    def drop_static_masks(self, name: str, cache: str) -> None:
        self._json("DELETE", f"/v1/datasets/{name}/static-masks/{cache}")

    def masking_report(
        self, name: str, *, seed: int = 0, sequences: int = 256, epochs: int | None = None, **masking: Any
    ) -> dict[str, Any]:
        """Mask ``sequences`` sequences for ``epochs`` epochs and measure what came out."""
        body = {"seed": seed, "sequences": sequences, **masking}
        if epochs is not None:
            body["epochs"] = epochs
        return self._json("POST", f"/v1/datasets/{name}/masking-report", json=body)

    def batches(
        self,
        name: str,
        batch_size: int = 32,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int | None = None,
        prefetch: int = 4,
        **masking: Any,
    ) -> "BatchStream":
        """Batches ``start, start+1, ...`` (``steps`` of them, or forever).

        Batch k is a pure function of ``(seed, k)``, so resuming at ``start=k``
        replays the same stream. ``prefetch`` requests stay in flight.
        """
        def fetch(k: int) -> Batch:
            return self.batch(name, batch_size, seed=seed, index=k, **masking)

        return BatchStream(fetch, start, steps, prefetch)


class BatchStream(Closing):
    """An iterator over ``fetch(k)`` with ``prefetch`` calls in flight on threads."""

    def __init__(self, fetch: Callable[[int], Batch], start: int, steps: int | None, prefetch: int) -> None:
        self._fetch = fetch
        self._next = start
        self._end = None if steps is None else start + steps
        self._pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="maskserve-prefetch")
        self._pending: deque[Future[Batch]] = deque()
        self._depth = max(1, prefetch)
        self._closed = False

    def _fill(self) -> None:
        while len(self._pending) < self._depth and (self._end is None or self._next < self._end):
            self._pending.append(self._pool.submit(self._fetch, self._next))
            self._next += 1

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        self._fill()
        if not self._pending:
            self.close()
            raise StopIteration
        try:
            return self._pending.popleft().result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closed = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)



def _param(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


def _read_into(resp: httpx.Response) -> bytearray:
    """Read a body into one writable buffer (arrays over it are writable, no copy)."""
    length = resp.headers.get("content-length")
    if length is None or resp.headers.get("content-encoding", "identity") != "identity":
        return bytearray(resp.read())  # compressed or chunked: size unknown until decoded
    buf = bytearray(int(length))
    view = memoryview(buf)
    pos = 0
    for piece in resp.iter_bytes():
        if pos + len(piece) > len(buf):
            raise ProtocolError(f"body longer than its Content-Length of {len(buf)} bytes")
        view[pos : pos + len(piece)] = piece
        pos += len(piece)
    if pos != len(buf):
        raise ProtocolError(f"body ended after {pos} of {len(buf)} bytes")
    return buf


def _as_record(doc: Document) -> Mapping[str, Any]:
    if isinstance(doc, str):
        return {"text": doc}
    if isinstance(doc, Mapping):
        return doc
    return {"ids": [int(i) for i in doc]}


def _ndjson(records: Iterable[Mapping[str, Any]], on_bytes: Callable[[int], None] | None = None, chunk: int = 1 << 16) -> Iterator[bytes]:
    buf: list[bytes] = []
    size = 0
    for rec in records:
        line = json.dumps(rec, ensure_ascii=False).encode() + b"\n"
        buf.append(line)
        size += len(line)
        if size >= chunk:
            yield b"".join(buf)
            if on_bytes:
                on_bytes(size)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)
        if on_bytes:
            on_bytes(size)


def _file_chunks(path: Path, on_bytes: Callable[[int], None] | None, chunk: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while piece := f.read(chunk):
            yield piece
            if on_bytes:
                on_bytes(len(piece))


class _Replayable:
    """A request body that starts over each time httpx iterates it (for retries)."""

    def __init__(self, factory: Callable[[], Iterator[bytes]]) -> None:
        self._factory = factory

    def __iter__(self) -> Iterator[bytes]:
        return self._factory()
