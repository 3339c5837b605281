"""The client's exceptions, built from the service's problem+json bodies.

::

    MaskserveError
     ├── CorpusError                 a local corpus the client cannot read as asked (a ValueError; nothing sent)
     │    └── TokenizerDirectoryError   a transformers tokenizer directory it cannot use
     ├── TransportError              the service could not be reached, or timed out
     ├── ProtocolError               a response the client cannot understand
     └── APIError                    the service answered with a problem (RFC 9457)
          ├── BadRequestError        400 / 422: the request itself is wrong
          ├── AuthenticationError    401 / 403
          ├── NotFoundError          404: unknown dataset or route
          ├── ConflictError          409: e.g. a dataset of that name exists
          │    └── JobConflict       a job of that name exists with another config: ``conflicts`` says where
          ├── GoneError              410: e.g. a finished job
          │    └── JobCancelled      the job was cancelled (a finished one just ends its stream)
          ├── PayloadTooLargeError   413: request body over a configured limit
          ├── RequestTooLargeError   414 / 431: request line or headers over a server's or proxy's limit
          ├── UnsupportedMediaTypeError   415 / 406
          ├── GatewayError           502 / 504: a proxy got no answer from the service (transient)
          └── ServiceUnavailableError     503: Redis unreachable, not ready
               └── OverloadedError       the service is at capacity and did nothing: retry after ``retry_after``

Every :class:`APIError` keeps the HTTP ``status``, the problem's stable
``type`` URI, ``title``, ``detail``, any extension members in ``extra``, and
when the service advised to ask again (seconds; ``Maskserve-Retry-After-Ms``
or ``Retry-After``) in ``retry_after``. An answer that is not a problem (a
proxy's own HTML error page) gets the class of its status, ``type``
``about:blank``, and the page's text as ``detail``. The client retries
idempotent calls on 502, 503 and 504, whoever sent them.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any


class MaskserveError(Exception):
    """Base class of every error the client raises."""


class CorpusError(MaskserveError, ValueError):
    """A local corpus the client cannot read as asked (no such column, a column of the wrong type, an
    unreadable file): raised before anything is sent."""


class TransportError(MaskserveError):
    """The request did not get an HTTP response (connection refused, timeout)."""


class ProtocolError(MaskserveError):
    """The service answered with something the client cannot parse."""


class TokenizerDirectoryError(CorpusError):
    """A tokenizer directory (``save_pretrained``'s) holds no usable tokenizer files; nothing was sent."""


class APIError(MaskserveError):
    """The service answered with an error status and a problem+json body."""

    def __init__(
        self,
        status: int,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        extra: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.extra = extra or {}
        self.retry_after = retry_after
        head = f"{status} {title}"
        super().__init__(f"{head}: {detail}" if detail and detail != head else head)


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class JobConflict(ConflictError):
    """A job of that name exists with another config. ``conflicts`` lists each differing field as
    ``{"field": ..., "job": the job's value, "requested": the requested one}`` (masking options as
    ``masking.unit`` and so on)."""

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        found = self.extra.get("conflicts")
        return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []

    def __str__(self) -> str:
        fields = "; ".join(f"{c.get('field')}: job {c.get('job')!r}, requested {c.get('requested')!r}"
                           for c in self.conflicts)  # fmt: skip
        return f"{super().__str__()} [{fields}]" if fields else super().__str__()


class GoneError(APIError):
    pass


class JobCancelled(GoneError):
    """The job was cancelled: its stream stops here, unlike a finished job's, which just ends."""


class PayloadTooLargeError(APIError):
    pass


class RequestTooLargeError(APIError):
    """The request line (URL) or the headers were longer than a server or proxy on the way accepts."""


class UnsupportedMediaTypeError(APIError):
    pass


class GatewayError(APIError):
    """A proxy in front of the service could not reach it, or got no answer in time (502, 504)."""


class ServiceUnavailableError(APIError):
    pass


class OverloadedError(ServiceUnavailableError):
    """The service refused the request before doing anything (at its limit): any request may be sent again."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    406: UnsupportedMediaTypeError,
    409: ConflictError,
    410: GoneError,
    413: PayloadTooLargeError,
    414: RequestTooLargeError,
    415: UnsupportedMediaTypeError,
    422: BadRequestError,
    431: RequestTooLargeError,
    502: GatewayError,
    503: ServiceUnavailableError,
    504: GatewayError,
}


def error_from_response(status: int, body: bytes, headers: Any = None) -> APIError:
    """Build the typed error for an error response (problem+json or not)."""
    try:
        problem = json.loads(body) if body else {}
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    known = {"type", "title", "detail", "status"}
    cls = _BY_STATUS.get(status, APIError)
    if status == 410 and problem.get("job_status") == "cancelled":
        cls = JobCancelled
    if status == 409 and str(problem.get("type", "")).endswith(":job-conflict"):
        cls = JobConflict
    if status == 503 and str(problem.get("type", "")).endswith(":overloaded"):
        cls = OverloadedError
    return cls(
        status,
        type=str(problem.get("type", "about:blank")),
        title=str(problem.get("title", "")) or _reason(status),
        detail=str(problem.get("detail", "")) or (_page_text(body) if not problem else ""),
        extra={k: v for k, v in problem.items() if k not in known},
        retry_after=_retry_after(headers),
    )


def _page_text(body: bytes, limit: int = 200) -> str:
    """What an error page that is not a problem says: an HTML page's title (else its text), or the text."""
    text = body[:4096].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, flags=re.I | re.S)
    if title is not None and title.group(1).strip():
        text = title.group(1)
    elif "<" in text:
        text = re.sub(r"<[^>]*>", " ", text)
    return " ".join(html.unescape(text).split())[:limit]


def _retry_after(headers: Any) -> float | None:
    """When to ask again, in seconds: the service's finer ``Maskserve-Retry-After-Ms`` hint where it gives
    one, else ``Retry-After`` (delta-seconds form; an HTTP date is ignored)."""
    fine = headers.get("maskserve-retry-after-ms") if headers is not None else None
    if fine is not None and fine.isdigit():
        return int(fine) / 1000
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
