"""The app factory: ``create_app(settings)`` and its lifespan.

Run it with ``maskserve serve`` or ``uvicorn service.app:create_app --factory``.
With no ``REDIS_URL`` the lifespan starts an embedded server over
``MASKSERVE_DATA_DIR`` and stops it (cleanly, AOF flushed) on shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .catalog import Catalog
from .config import Settings
from .deps import check_token
from .durability import Durability
from .embedded import EmbeddedRedis
from .errors import PayloadTooLarge, ServiceError, install, problem_response
from .jobs import Jobs
from .metrics import Metrics
from .routes import batches, datasets, health, jobs, masks, sequences, tokenizers
from .store import Store
from .tuning import tune_allocator

log = logging.getLogger("maskserve")

# Bodies parsed whole (JSON) get this limit; streamed ingest bodies check their own.
_STREAMED_SUFFIXES = ("/documents", "/tokenizers/train")
# Open without the bearer token: the health probes (everything else, docs included, needs it).
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tune_allocator()
        embedded: EmbeddedRedis | None = None
        url = settings.redis_url
        if url is None:
            # Started on the event loop's own thread, on purpose: the server is tied to
            # the thread that spawns it (PR_SET_PDEATHSIG), and worker threads come and go.
            embedded = EmbeddedRedis(settings.data_dir).start()
            url = embedded.url
            log.info("embedded Redis at %s, data in %s", url, embedded.data_dir)
        r = aioredis.from_url(url, max_connections=256, health_check_interval=30)
        app.state.redis_url = url
        app.state.store = Store(r, settings.key_prefix)
        app.state.catalog = Catalog(app.state.store)
        durability = Durability(r, settings.durable_acks, settings.durable_replicas, settings.durable_timeout_ms)
        try:
            await durability.probe()
        except RedisConnectionError:
            log.warning("Redis is not reachable yet; durability is probed at the first ack")
        app.state.durability = durability
        app.state.jobs = Jobs(r, settings.key_prefix, durability, worker_idle_s=settings.job_worker_idle_s,
                              max_workers=settings.job_max_workers)  # fmt: skip
        try:
            yield
        finally:
            await r.aclose()
            if embedded is not None:
                embedded.stop()

    app = FastAPI(
        title="maskserve",
        version=__version__,
        summary="Masked-language-model batches over HTTP, from tokenized text kept in Redis.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install(app)

    # the batch routes first: requests are matched against routes in order
    for module in (batches, jobs, health, datasets, masks, tokenizers, sequences):
        app.include_router(module.router)

    app.add_middleware(Gatekeeper, settings=settings, metrics=app.state.metrics)
    return app


class Gatekeeper:
    """Pure ASGI middleware: check the bearer token (all but the public paths),
    refuse oversized JSON bodies early, count and time requests.

    As middleware rather than per-route dependencies (FastAPI solves each
    dependency on every request) and not Starlette's ``BaseHTTPMiddleware``
    (a task and a stream per request).
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # every GET route answers HEAD: the same status and headers, no body
            scope = {**scope, "method": "GET"}
            send = _headless(send)
        path: str = scope["path"]
        refusal: ServiceError | None = None
        if self.settings.auth_token is not None and path not in _PUBLIC_PATHS:
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
        if refusal is not None:
            await problem_response(refusal, Request(scope))(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
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


def _headless(send: Send) -> Send:
    """``send`` for a HEAD request answered by its GET route: the body is dropped, its headers kept."""

    async def headless(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headless
