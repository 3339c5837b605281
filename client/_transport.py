"""The transport under the client: one request to the service, retried and failed over between replicas.

A :class:`Transport` holds the service's replica URLs and one httpx client. Each call sends a request to
the replica in use; an answer of 400 or more becomes the :class:`~client.APIError` its problem+json body
(or a proxy's own error page) describes. Idempotent calls are retried on transport errors and
502/503/504, and any call whose body can be sent again is retried when the service answered
``overloaded`` (it did nothing with it); each failure moves on to the next replica. Between attempts it
waits the service's ``Retry-After``, else an exponential backoff.

An :class:`Outage` makes a call ride out an outage for a time rather than a number of attempts (a job
stream's lease and ack requests). :meth:`Transport.request` returns the response, :meth:`Transport.receive`
a body read into one writable buffer (arrays decoded over it need no copy), :meth:`Transport.json` the
decoded JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from ._errors import APIError, OverloadedError, ProtocolError, TransportError, error_from_response

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
    """What talks to the service through a :class:`Transport` (the :class:`~client.Client`)."""

    @property
    def transport(self) -> Transport: ...


class Transport:
    """Requests to one service over ``base_urls`` (its replicas), with retries and failover."""

    def __init__(
        self, base_urls: Sequence[str], http: httpx.Client, *, retries: int, backoff: float, max_backoff: float
    ) -> None:
        self.base_urls = list(base_urls)
        self.http = http
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._url = 0  # index of the replica in use

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self.base_urls[self._url % len(self.base_urls)]

    def _fail_over(self, failed: str) -> None:
        if self.base_url == failed:  # another thread may have moved on already
            self._url = (self._url + 1) % len(self.base_urls)

    def close(self) -> None:
        self.http.close()

    # ---- the calls ------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, idempotent: bool, outage: Outage | None = None, **kw: Any
    ) -> httpx.Response:
        """The response to one request (its body read), retried as the module says."""

        def once(url: str) -> httpx.Response:
            resp = self.http.request(method, url + path, **kw)
            if resp.status_code >= 400:
                raise error_from_response(resp.status_code, resp.content, resp.headers)
            return resp

        return self._retried(once, method, path, idempotent, outage, kw.get("content"))

    def receive(
        self, method: str, path: str, *, idempotent: bool, outage: Outage | None = None, **kw: Any
    ) -> Received:
        """The answer to one request with its body read into one writable buffer, retried as the module says."""

        def once(url: str) -> Received:
            with self.http.stream(method, url + path, **kw) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_response(resp.status_code, resp.content, resp.headers)
                return Received(resp.status_code, resp.headers, read_into(resp))

        return self._retried(once, method, path, idempotent, outage, kw.get("content"))

    def json(self, method: str, path: str, *, idempotent: bool = True, outage: Outage | None = None, **kw: Any) -> Any:
        """The JSON body of the answer to one request (None when it has no body)."""
        resp = self.request(method, path, idempotent=idempotent, outage=outage, **kw)
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise ProtocolError(f"{method} {path}: response is not JSON") from None

    # ---- retries ----------------------------------------------------------------------

    def _retried(
        self, once: Callable[[str], T], method: str, path: str, idempotent: bool, outage: Outage | None,
        content: Any,
    ) -> T:  # fmt: skip
        """``once(url)`` at the replica in use until it succeeds, or a failure is not to be retried."""
        replayable = isinstance(content, (bytes, str, type(None)))  # not a consumed generator
        attempt = 0
        first_failure: float | None = None
        while True:
            url = self.base_url
            try:
                return once(url)
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
            time.sleep(self._delay(delay, attempt, None if outage is None else first_failure + outage.seconds - now))

    def _given_up(self, outage: Outage | None, attempt: int, failing_for: float) -> bool:
        if outage is None:
            return attempt > self.retries
        return failing_for >= outage.seconds or (outage.should_stop is not None and outage.should_stop())

    def _delay(self, advised: float | None, attempt: int, time_left: float | None) -> float:
        """The wait before the next attempt: what the service advised, else an exponential backoff; within
        an outage's ``time_left``."""
        delay = advised if advised is not None else min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return delay if time_left is None else min(delay, max(0.0, time_left))


def read_into(resp: httpx.Response) -> bytearray:
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
