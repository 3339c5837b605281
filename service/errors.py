"""Problem details (RFC 9457): one small error tree and its handlers.

Every error the service returns is ``application/problem+json`` with a stable
``type`` URI. Routes raise a :class:`ServiceError` subclass; the handlers
registered by :func:`install` turn it (and request-validation errors, and a
lost Redis connection) into the response. docs/errors.md lists every type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:maskserve:problem:"

log = logging.getLogger("maskserve")


class ServiceError(Exception):
    """Base of the tree: subclasses set ``type``, ``title`` and ``status``."""

    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out = {"type": TYPE_BASE + self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


class InvalidRequest(ServiceError):
    type, title, status = "invalid-request", "Invalid request", 400


class ValidationFailed(ServiceError):
    type, title, status = "validation-failed", "Request parameters failed validation", 422


class InvalidTokenizer(ServiceError):
    type, title, status = "invalid-tokenizer", "Invalid tokenizer", 400


class TokenizerFailed(ServiceError):
    """The dataset's tokenizer itself failed (a panic inside the library, e.g. a normalizer's regex)."""

    type, title, status = "tokenizer-failed", "The tokenizer failed on this input", 422


class MalformedDocument(ServiceError):
    type, title, status = "malformed-document", "Malformed document", 400


class TokenOutOfVocabulary(ServiceError):
    type, title, status = "token-out-of-vocabulary", "Token id outside the vocabulary", 400


class LimitExceeded(ServiceError):
    type, title, status = "limit-exceeded", "A configured limit was exceeded", 422


class PayloadTooLarge(ServiceError):
    type, title, status = "payload-too-large", "Request body too large", 413


class UnsupportedMediaType(ServiceError):
    type, title, status = "unsupported-media-type", "Unsupported media type", 415


class NotAcceptable(ServiceError):
    type, title, status = "not-acceptable", "No acceptable representation", 406


class Unauthorized(ServiceError):
    type, title, status = "unauthorized", "Missing or wrong bearer token", 401


class NotFound(ServiceError):
    type, title, status = "not-found", "Not found", 404


class DatasetNotFound(NotFound):
    type, title = "dataset-not-found", "Dataset not found"


class DatasetExists(ServiceError):
    type, title, status = "dataset-exists", "Dataset already exists", 409


class DatasetEmpty(ServiceError):
    type, title, status = "dataset-empty", "Dataset has no sequences", 409


class SequenceOutOfRange(ServiceError):
    type, title, status = "sequence-out-of-range", "Sequence id outside the dataset", 422


class JobNotFound(NotFound):
    type, title = "job-not-found", "Job not found"


class JobConflict(ServiceError):
    type, title, status = "job-conflict", "Job exists with another config", 409


class JobFinished(ServiceError):
    type, title, status = "job-finished", "Job finished", 410


class JobDatasetGone(ServiceError):
    """The generation of the dataset a job reads was deleted (the name may hold a new one): the job can never
    serve another batch."""

    type, title, status = "job-dataset-gone", "The job's dataset was deleted", 409


class StaticMasksMissing(ServiceError):
    type, title, status = "static-masks-missing", "Static masks not built", 409


class Conflict(ServiceError):
    type, title, status = "conflict", "Conflicting concurrent change", 409


class DatasetReplaced(Conflict):
    """A generation of a dataset (its uid) asked for is no longer the one of its name."""


class StoreUnavailable(ServiceError):
    type, title, status = "store-unavailable", "Redis is unreachable", 503


class Overloaded(ServiceError):
    """The process is at its limit of heavy requests (or Redis connections): retry after ``Retry-After``."""

    type, title, status = "overloaded", "The service is at capacity; retry later", 503

    def __init__(self, detail: str, retry_after_s: int = 1, retry_after_ms: int | None = None, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.headers = {"Retry-After": str(retry_after_s)}
        if retry_after_ms is not None:  # finer than Retry-After's whole seconds: clients come back sooner
            self.headers["Maskserve-Retry-After-Ms"] = str(retry_after_ms)


class RequestTimeout(ServiceError):
    type, title, status = "request-timeout", "The request body arrived too slowly", 408


class PoolExhausted(RedisConnectionError):
    """No pooled Redis connection came free in time: the process is busy, Redis itself may be fine."""


def problem_response(
    err: ServiceError, request: Request | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if err.status == 401 else {})}
    instance = request.url.path if request is not None else None
    return JSONResponse(err.body(instance), status_code=err.status, media_type=PROBLEM_JSON, headers=headers)


# In the order an Allow header lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route takes at the request's path (RFC 9110 15.5.6: a 405's Allow lists them
    all), found by asking each route whether it would take the path with that method. HEAD wherever
    GET is: the gatekeeper answers it with the GET route."""
    routes = list(routes)
    allowed = set()
    for method in _METHODS:
        probe = {"type": "http", "method": method, "path": scope["path"], "root_path": scope.get("root_path", ""),
                 "headers": [], "query_string": b""}  # fmt: skip
        if any(route.matches(probe)[0] == Match.FULL for route in routes):
            allowed.add(method)
    if "GET" in allowed:
        allowed.add("HEAD")
    return [m for m in _METHODS if m in allowed]


def install(app: FastAPI) -> None:
    """Register the handlers that make every error a problem+json response."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return problem_response(exc, request, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(ValidationFailed(detail, errors=errors), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ServiceError(str(exc.detail))
        err.status = exc.status_code  # type: ignore[misc]
        kinds = {400: InvalidRequest, 408: RequestTimeout, 413: PayloadTooLarge}
        known = kinds.get(exc.status_code)
        err.type = known.type if known else {404: "not-found", 405: "method-not-allowed"}.get(  # type: ignore[misc]
            exc.status_code, "http-error"
        )
        err.title = known.title if known and known is not InvalidRequest else str(exc.detail)  # type: ignore[misc]
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # the router names the first route of the path only: name them all
            headers["Allow"] = ", ".join(allowed_methods(request.app.router.routes, request.scope))
        return problem_response(err, request, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(ServiceError("the service failed unexpectedly; see its log"), request)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, PoolExhausted):
            busy = Overloaded(f"every Redis connection of this process is busy: {exc}")
            return problem_response(busy, request, busy.headers)
        log.warning("redis unreachable: %s", exc)
        return problem_response(StoreUnavailable(f"the service cannot reach Redis: {exc}"), request)

    @app.exception_handler(ClusterError)  # CLUSTERDOWN, MASTERDOWN: a failover in progress
    @app.exception_handler(TryAgainError)  # a slot being migrated
    @app.exception_handler(RedisClusterException)  # no reachable master owns the slot (yet)
    async def _cluster_changing(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis cluster unavailable: %s", exc)
        return problem_response(StoreUnavailable(f"the Redis cluster cannot serve this now: {exc}"), request)
