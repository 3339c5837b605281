"""The transport under the clients: one request to the service, retried and failed over between replicas.

A :class:`Transport` holds the service's replica URLs. Each call sends a request to the replica in use; an
answer of 400 or more becomes the :class:`~client.APIError` its problem+json body (or a proxy's own error
page) describes. Idempotent calls are retried on transport errors and 502/503/504, and any call whose body
can be sent again is retried when the service answered ``overloaded`` (it did nothing with it); each
failure moves on to the next replica. Between attempts it waits the service's ``Retry-After``, else an
exponential backoff.

An :class:`Outage` makes a call ride out an outage for a time rather than a number of attempts (a job
stream's lease and ack requests). :meth:`Transport.request` returns the response, :meth:`Transport.receive`
a body read into one writable buffer (arrays decoded over it need no copy), :meth:`Transport.json` the
decoded JSON. Each is a plan (:mod:`client._plans`): :class:`SyncTransport` carries plans out over an
``httpx.Client``, :class:`AsyncTransport` over an ``httpx.AsyncClient``, so both clients retry alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from ._errors import APIError, OverloadedError, ProtocolError, TransportError, error_from_response
from ._plans import Op, Plan, Send, Sleep, arun, run

#: statuses retried on idempotent calls, whoever sent them (the service, or a proxy in front of it)
RETRY_STATUS = (502, 503, 504)

T = TypeVar("T")


@dataclass(frozen=True)
class Outage:
    """How a call rides out an unreachable or overloaded service: retried until ``seconds`` have passed
    since its first failure (instead of the transport's number of retries), or until ``should_stop()``;
    ``on_retry(error, attempt)`` is told of each failure that will be retried."""

    seconds: float
    should_stop: Callable[[], bool] | None = None
    on_retry: Callable[[Exception, int], None] | None = None


@dataclass(frozen=True)
class Received:
    """A successful answer whose body was read into one writable buffer."""

    status_code: int
    headers: httpx.Headers
    body: bytearray


class Connected(Protocol):
    """What talks to the service through a :class:`Transport` (either client)."""

    @property
    def transport(self) -> Transport: ...


class Transport:
    """Requests to one service over ``base_urls`` (its replicas), with retries and failover, as plans (see
    :mod:`client._plans`): :class:`SyncTransport` and :class:`AsyncTransport` carry them out."""

    def __init__(self, base_urls: Sequence[str], *, retries: int, backoff: float, max_backoff: float) -> None:
        self.base_urls = list(base_urls)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._url = 0  # index of the replica in use

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self.base_urls[self._url % len(self.base_urls)]

    def _fail_over(self, failed: str) -> None:
        if self.base_url == failed:  # another request may have moved on already
            self._url = (self._url + 1) % len(self.base_urls)

    # ---- the calls, as plans ------------------------------------------------------

    def request(
        self, method: str, path: str, *, idempotent: bool, outage: Outage | None = None, **kw: Any
    ) -> Plan[httpx.Response]:
        """The response to one request (its body read), retried as the module says."""
        return self._retried(method, path, idempotent, outage, kw, buffered=False)

    def receive(
        self, method: str, path: str, *, idempotent: bool, outage: Outage | None = None, **kw: Any
    ) -> Plan[Received]:
        """The answer to one request with its body read into one writable buffer, retried as the module says."""
        return self._retried(method, path, idempotent, outage, kw, buffered=True)

    def json(
        self, method: str, path: str, *, idempotent: bool = True, outage: Outage | None = None, **kw: Any
    ) -> Plan[Any]:
        """The JSON body of the answer to one request (None when it has no body)."""
        resp = yield from self.request(method, path, idempotent=idempotent, outage=outage, **kw)
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise ProtocolError(f"{method} {path}: response is not JSON") from None

    # ---- retries ----------------------------------------------------------------------

    def _retried(
        self, method: str, path: str, idempotent: bool, outage: Outage | None, kw: dict[str, Any], buffered: bool
    ) -> Plan[Any]:
        """The request sent to the replica in use until it succeeds, or a failure is not to be retried."""
        replayable = isinstance(kw.get("content"), (bytes, str, type(None)))  # not a consumed generator
        attempt = 0
        first_failure: float | None = None
        while True:
            url = self.base_url
            try:
                return (yield Send(method, url + path, kw, buffered))
            except httpx.TransportError as exc:
                err: Exception = TransportError(f"{method} {url}{path}: {exc.__class__.__name__}: {exc}")
                err.__cause__ = exc
                delay = None
            except APIError as exc:
                if exc.status not in RETRY_STATUS:
                    raise
                err, delay = exc, exc.retry_after
            self._fail_over(url)
            attempt += 1
            now = time.monotonic()
            first_failure = first_failure or now
            retryable = idempotent or (isinstance(err, OverloadedError) and replayable)
            if not retryable or self._given_up(outage, attempt, now - first_failure):
                raise err
            if outage is not None and outage.on_retry is not None:
                outage.on_retry(err, attempt)
            yield Sleep(self._delay(delay, attempt, None if outage is None else first_failure + outage.seconds - now))

    def _given_up(self, outage: Outage | None, attempt: int, failing_for: float) -> bool:
        if outage is None:
            return attempt > self.retries
        return failing_for >= outage.seconds or (outage.should_stop is not None and outage.should_stop())

    def _delay(self, advised: float | None, attempt: int, time_left: float | None) -> float:
        """The wait before the next attempt: what the service advised, else an exponential backoff; within
        an outage's ``time_left``."""
        delay = advised if advised is not None else min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return delay if time_left is None else min(delay, max(0.0, time_left))


class SyncTransport(Transport):
    """Plans carried out with an ``httpx.Client``, blocking."""

    def __init__(self, base_urls: Sequence[str], http: httpx.Client, **settings: Any) -> None:
        super().__init__(base_urls, **settings)
        self.http = http

    def run(self, plan: Plan[T]) -> T:
        return run(plan, self.execute)

    def execute(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
            return None
        if not op.buffered:
            resp = self.http.request(op.method, op.url, **op.kw)
            if resp.status_code >= 400:
                raise error_from_response(resp.status_code, resp.content, resp.headers)
            return resp
        with self.http.stream(op.method, op.url, **op.kw) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise error_from_response(resp.status_code, resp.content, resp.headers)
            return Received(resp.status_code, resp.headers, read_into(resp))

    def close(self) -> None:
        self.http.close()


class AsyncTransport(Transport):
    """Plans carried out with an ``httpx.AsyncClient``, awaited. A request body given as an iterator of bytes
    (an upload) is produced on a worker thread, piece by piece, so reading and encoding a corpus never holds
    up the event loop."""

    def __init__(self, base_urls: Sequence[str], http: httpx.AsyncClient, **settings: Any) -> None:
        super().__init__(base_urls, **settings)
        self.http = http

    async def run(self, plan: Plan[T]) -> T:
        return await arun(plan, self.execute)

    async def execute(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        kw = op.kw
        content = kw.get("content")
        if content is not None and not isinstance(content, (bytes, str)) and not hasattr(content, "__aiter__"):
            kw = {**kw, "content": _off_loop(content)}
        if not op.buffered:
            resp = await self.http.request(op.method, op.url, **kw)
            if resp.status_code >= 400:
                raise error_from_response(resp.status_code, resp.content, resp.headers)
            return resp
        async with self.http.stream(op.method, op.url, **kw) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise error_from_response(resp.status_code, resp.content, resp.headers)
            body = BodyBuffer.for_response(resp)
            if body is None:
                return Received(resp.status_code, resp.headers, bytearray(await resp.aread()))
            async for piece in resp.aiter_bytes():
                body.add(piece)
            return Received(resp.status_code, resp.headers, body.done())

    async def close(self) -> None:
        await self.http.aclose()


async def _off_loop(body: Iterable[bytes]) -> AsyncIterator[bytes]:
    """``body``'s pieces, each produced on a worker thread (a fresh iteration each time it is sent)."""
    pieces = iter(body)
    end = object()
    while (piece := await asyncio.to_thread(next, pieces, end)) is not end:
        yield piece  # type: ignore[misc]


class BodyBuffer:
    """A body of known length read into one writable buffer, piece by piece (arrays over it are writable,
    no copy)."""

    def __init__(self, length: int) -> None:
        self.buf = bytearray(length)
        self._view = memoryview(self.buf)
        self._pos = 0

    @classmethod
    def for_response(cls, resp: httpx.Response) -> BodyBuffer | None:
        """A buffer for ``resp``'s body; None when its size is unknown until decoded (compressed, chunked)."""
        length = resp.headers.get("content-length")
        if length is None or resp.headers.get("content-encoding", "identity") != "identity":
            return None
        return cls(int(length))

    def add(self, piece: bytes) -> None:
        if self._pos + len(piece) > len(self.buf):
            raise ProtocolError(f"body longer than its Content-Length of {len(self.buf)} bytes")
        self._view[self._pos : self._pos + len(piece)] = piece
        self._pos += len(piece)

    def done(self) -> bytearray:
        if self._pos != len(self.buf):
            raise ProtocolError(f"body ended after {self._pos} of {len(self.buf)} bytes")
        return self.buf


def read_into(resp: httpx.Response) -> bytearray:
    """Read a body into one writable buffer (arrays over it are writable, no copy)."""
    body = BodyBuffer.for_response(resp)
    if body is None:
        return bytearray(resp.read())
    for piece in resp.iter_bytes():
        body.add(piece)
    return body.done()
