"""The app factory: ``create_app(settings)`` and its lifespan.

Run it with ``maskserve serve`` or ``uvicorn service.app:create_app --factory``.
With no ``REDIS_URL`` the lifespan starts an embedded server over
``MASKSERVE_DATA_DIR`` and stops it (cleanly, AOF flushed) on shutdown.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.exceptions import ConnectionError as RedisConnectionError
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..core.config import Settings
from ..core.errors import PayloadTooLarge, PoolExhausted, ServiceError
from ..core.process import die_with_supervisor
from ..core.tuning import tune_allocator, tune_gil
from ..core.work import ADMISSION, Workload, is_heavy
from ..data.catalog import Catalog
from ..jobs.jobs import Jobs
from ..jobs.leasing import Leasing
from ..store.durability import Durability
from ..store.embedded import EmbeddedRedis
from ..store.keys import slot_tags
from ..store.store import Store
from .deps import check_token
from .metrics import Metrics, process_exited
from .openapi import openapi_schema
from .problems import install, problem_response
from .routes import batches, datasets, docs, health, ingests, jobs, masks, sequences, tokenizers, ui

log = logging.getLogger("maskserve")

# Bodies parsed whole (JSON) get this limit; streamed ingest bodies check their own.
_STREAMED_SUFFIXES = ("/documents", "/tokenizers/train")
# Open without the bearer token: the health probes, the API document with its pages and their files,
# and the dashboard's page and files (they hold no data; the dashboard's calls carry the token); every
# other path needs it.
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", ui.PAGE})
_PUBLIC_PREFIX = (docs.ASSETS, ui.FILES)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="maskserve",
        version=__version__,
        summary="Masked-language-model batches over HTTP, from tokenized text kept in Redis.",
        lifespan=_lifespan(settings),
        docs_url=None,  # served by routes/docs.py, from local files
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.work = Workload(
        cpu_threads=settings.cpu_threads, max_inflight=settings.max_inflight, inline_tokens=settings.inline_tokens,
        max_inflight_bytes=settings.max_inflight_bytes, retry_after_s=settings.overload_retry_after_s,
        retry_ms=settings.overload_retry_ms,
    )  # fmt: skip
    app.state.work.observe = app.state.metrics.observe_stage
    install(app)

    # the batch routes first: requests are matched against routes in order
    hot = {batches.get_batch, jobs.next_batch}
    app.router.routes += [DirectRoute(route) for module in (batches, jobs) for route in module.router.routes
                          if isinstance(route, APIRoute) and route.endpoint in hot]  # fmt: skip
    for module in (batches, jobs, health, datasets, ingests, masks, tokenizers, sequences, docs, ui):
        app.include_router(module.router)

    app.add_middleware(Gatekeeper, settings=settings, metrics=app.state.metrics, work=app.state.work)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


class DirectRoute(Route):
    """A hot route's endpoint served by Starlette, in front of its FastAPI route (which documents it).

    FastAPI solves an endpoint's dependencies and parameters on every request
    (about a tenth of a millisecond of the event loop here); the batch routes
    take only their path parameters, as strings, and the request, and parse the
    query themselves (``deps.parse_query``), so they are called directly. Errors
    go through the same handlers, and the request is labelled with the FastAPI
    route in metrics. The endpoint's signature is checked when the app is built.
    """

    def __init__(self, api_route: APIRoute) -> None:
        fn = api_route.endpoint
        params = inspect.signature(fn, eval_str=True).parameters
        names = set(api_route.param_convertors)
        if set(params) != names | {"request"} or any(params[n].annotation is not str for n in names):
            raise TypeError(f"{fn.__name__} takes more than its path parameters (strings) and the request")
        if api_route.dependencies or api_route.dependant.dependencies:
            raise TypeError(f"{fn.__name__} has dependencies, which only FastAPI's route would run")

        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            response: Response = await fn(request=request, **request.path_params)
            return response

        super().__init__(api_route.path, endpoint, methods=list(api_route.methods), name=api_route.name,
                         include_in_schema=False)  # fmt: skip
        self.api_route = api_route

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self.api_route
        return match, child


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's life: Redis (embedded when no URL is set) and the stores on ``app.state`` while it runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tune_allocator()
        tune_gil()
        die_with_supervisor()
        embedded: EmbeddedRedis | None = None
        url = settings.redis_url
        if url is None:
            # Started on the event loop's own thread, on purpose: the server is tied to
            # the thread that spawns it (PR_SET_PDEATHSIG), and worker threads come and go.
            embedded = EmbeddedRedis(settings.data_dir).start()
            url = embedded.url
            log.info("embedded Redis at %s, data in %s", url, embedded.data_dir)
        r = connect(url, settings)
        await anyio.to_thread.run_sync(slot_tags)  # the chunk groups' tags, built once, off the event loop
        app.state.redis_url = url
        reader = connect(url, settings, replicas=True) if settings.redis_cluster and settings.read_from_replicas else None
        await _open_stores(app, settings, r, reader)
        try:
            yield
        finally:
            await r.aclose()
            if reader is not None:
                await reader.aclose()
            if embedded is not None:
                embedded.stop()
            process_exited()

    return lifespan


async def _open_stores(app: FastAPI, settings: Settings, r: aioredis.Redis, reader: aioredis.Redis | None) -> None:
    """The store, catalog, durability, jobs and leasing the routes use, on ``app.state``."""
    app.state.store = Store(r, settings.key_prefix, cluster=settings.redis_cluster,
                            chunk_groups=settings.chunk_groups, reader=reader,
                            idempotency_ttl_s=settings.ingest_idempotency_ttl_s,
                            chunk_cache_bytes=settings.chunk_cache_bytes)
    app.state.store.row_cache.observe = app.state.metrics.observe_row_cache
    app.state.catalog = Catalog(app.state.store, max_entries=settings.catalog_max_datasets)
    app.state.catalog.observe = app.state.metrics.observe_stage
    durability = Durability(r, settings.durable_acks, settings.durable_replicas, settings.durable_timeout_ms,
                            cluster=settings.redis_cluster)  # fmt: skip
    try:
        await durability.probe()
    except RedisConnectionError:
        log.warning("Redis is not reachable yet; durability is probed at the first ack")
    app.state.durability = durability
    app.state.jobs = Jobs(r, settings.key_prefix, durability, worker_idle_s=settings.job_worker_idle_s,
                          max_workers=settings.job_max_workers, store=app.state.store,
                          input_bound_share=settings.job_input_bound_share,
                          straggler_ratio=settings.job_straggler_ratio)  # fmt: skip
    app.state.leasing = Leasing(app.state.jobs, app.state.catalog, app.state.work)


class _Pool(aioredis.BlockingConnectionPool):
    """A pool that waits for a free connection (the default one fails at once when all are taken), and says so
    apart from a dead server when the wait runs out: that is an overloaded process, not a lost store."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as exc:
            if str(exc) == "No connection available.":
                raise PoolExhausted(f"no Redis connection came free within {self.timeout} s") from None
            raise


def connect(url: str, settings: Settings, *, replicas: bool = False) -> aioredis.Redis:
    """The process's Redis client: a bounded pool, explicit timeouts (see the ``redis_*`` settings); with
    ``redis_cluster``, a cluster client (a bounded pool per node, the same timeouts) that reads from masters,
    or with ``replicas`` one that spreads reads over the replicas (for immutable chunks only)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(
            url, max_connections=settings.redis_max_connections,
            load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN_REPLICAS if replicas else None,
            socket_connect_timeout=settings.redis_connect_timeout_s, socket_timeout=settings.redis_socket_timeout_s,
        )  # type: ignore[return-value]  # fmt: skip
    pool = _Pool.from_url(
        url, max_connections=settings.redis_max_connections, timeout=settings.redis_pool_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s, socket_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
    )  # fmt: skip
    return aioredis.Redis.from_pool(pool)


class Gatekeeper:
    """Pure ASGI middleware: check the bearer token (all but the public paths),
    refuse oversized JSON bodies early, admit heavy requests (their ``Admission``
    rides in the scope until the last piece of the response is sent; see
    ``work``), count and time requests.

    As middleware rather than per-route dependencies (FastAPI solves each
    dependency on every request) and not Starlette's ``BaseHTTPMiddleware``
    (a task and a stream per request).
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, work: Workload) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # every GET route answers HEAD: the same status and headers, no body
            scope = {**scope, "method": "GET"}
            send = _headless(send)
        path: str = scope["path"]
        refusal: ServiceError | None = None
        if self.settings.auth_token is not None and path not in _PUBLIC_PATHS and not path.startswith(_PUBLIC_PREFIX):
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            refusal = check_token(self.settings, authorization)
        if refusal is None and not path.endswith(_STREAMED_SUFFIXES):
            # JSON bodies are read whole: bounded as they arrive, however they are framed (a chunked body
            # has no Content-Length); tokenizer.json uploads get their own, larger limit
            limit = self.settings.max_tokenizer_bytes if path == "/v1/datasets" else self.settings.max_json_bytes
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > limit:
                    refusal = PayloadTooLarge(f"body of {int(value)} bytes exceeds the {limit}-byte limit")
            receive = _bounded(receive, limit)
        heavy = refusal is None and is_heavy(scope["method"], path)
        admitted = self.work.admit() if heavy else None
        if admitted is not None:
            self.metrics.inflight.inc()
            scope[ADMISSION] = admitted  # the route holds its body's bytes on it (see bodies.hold_body)
        elif heavy:
            self.metrics.overloaded.labels("requests").inc()
            refusal = self.work.overloaded(f"this process is working on its limit of {self.work.max_inflight} heavy "
                                           "requests")  # fmt: skip
        if refusal is not None:
            await problem_response(refusal, Request(scope), getattr(refusal, "headers", None))(scope, receive, send)
            return
        receive = _paced(receive, self.settings.body_timeout_s)
        send = _patient(send, self.settings.send_timeout_s)
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except SendTimeout:
            # the client stopped reading its response: give up on it (the server closes the connection)
            log.info("dropped a client that did not read its response for %s s", self.settings.send_timeout_s)
        finally:
            if admitted is not None:
                if admitted.refused:  # refused for its body's bytes (see bodies.hold_body)
                    self.metrics.overloaded.labels("bytes").inc()
                admitted.close()
                self.metrics.inflight.dec()
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read, past its limit (an HTTP exception, so the body parser passes it on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit")


def _bounded(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once more than ``limit`` body bytes have come in."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return bounded


class BodyTimeout(StarletteHTTPException):
    """Raised while a body is read, when its next piece is too long in coming."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"no part of the request body arrived for {timeout} s")


class SendTimeout(Exception):
    """A client took no part of its response for too long."""


def _paced(receive: Receive, timeout: float) -> Receive:
    """``receive`` that raises :class:`BodyTimeout` when the next body piece takes over ``timeout`` seconds.

    Only while the body is still coming: once it is complete, ``receive`` waits for the client to
    disconnect, which may rightly take as long as the response does."""
    done = False

    async def paced() -> Message:
        nonlocal done
        if done:
            return await receive()
        with anyio.move_on_after(timeout) as scope:
            message = await receive()
        if scope.cancelled_caught:
            raise BodyTimeout(timeout)
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return paced


def _patient(send: Send, timeout: float) -> Send:
    """``send`` that gives up with :class:`SendTimeout` when a client takes no data for ``timeout`` seconds."""

    async def patient(message: Message) -> None:
        with anyio.move_on_after(timeout) as scope:
            await send(message)
        if scope.cancelled_caught:
            raise SendTimeout

    return patient


def _headless(send: Send) -> Send:
    """``send`` for a HEAD request answered by its GET route: the body is dropped, its headers kept."""

    async def headless(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headless
