"""The handlers that turn every error into an ``application/problem+json`` response (RFC 9457)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from ..core.errors import (
    PROBLEM_JSON, InvalidRequest, Overloaded, PayloadTooLarge, PoolExhausted, RequestTimeout, ServiceError,
    StoreUnavailable, ValidationFailed,
)  # fmt: skip

log = logging.getLogger("maskserve")


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
            request.app.state.metrics.overloaded.labels("redis-connections").inc()
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
