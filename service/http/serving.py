"""Running the app: one process, or N worker processes on one port.

``maskserve serve --workers N`` hands the app to uvicorn's process manager:
N processes accept on one shared socket, each with its own event loop, CPU
pool and Redis connections. Without ``REDIS_URL`` the manager starts the
embedded server itself, before the workers, so they share one store; it stops
it (AOF flushed) after they have exited. Workers die with the manager
(``PR_SET_PDEATHSIG``), so a killed manager leaves no process holding the port.

Every connection gets a header deadline (``MASKSERVE_HEADER_TIMEOUT_S``): a
client that opens a connection and trickles, or never sends, its request
headers is cut off, so idle sockets cannot pile up. Body and response pacing
are bounded in the app (see ``app.Gatekeeper``). The workers' Prometheus
metrics go to a shared directory, so ``/metrics`` sums them (see ``metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.config import Settings
from ..core.process import SUPERVISOR_ENV
from ..store.embedded import EmbeddedRedis
from .metrics import MULTIPROC_ENV

log = logging.getLogger("maskserve")


@lru_cache(maxsize=1)
def _header_timeout() -> float:
    return Settings().header_timeout_s


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers.

    Armed when a connection opens and again when the first bytes of a next
    request arrive on a kept-alive connection; disarmed once the headers are
    complete (the body has its own pacing limit, in the app).
    """

    header_timeout: float | None = None  # None: from the settings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        timeout = self.header_timeout if self.header_timeout is not None else _header_timeout()
        self._header_timer = self.loop.call_later(timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers did not arrive in time")
            self.transport.close()


def serve(settings: Settings, *, host: str, port: int, workers: int, log_level: str, access_log: bool) -> None:
    """Serve until interrupted: in this process (``workers == 1``) or under uvicorn's process manager."""
    import uvicorn

    common = dict(host=host, port=port, log_level=log_level, access_log=access_log, http=GuardedHttp)
    if workers == 1:
        from .app import create_app  # only here: a process manager imports none of the app (its workers do)

        GuardedHttp.header_timeout = settings.header_timeout_s
        uvicorn.run(create_app(settings), **common)
        return
    # Workers build their own app from the environment: hand the settings over through it.
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(settings.data_dir).start()
        log.info("embedded Redis at %s, data in %s", embedded.url, embedded.data_dir)
        os.environ["REDIS_URL"] = embedded.url
    else:
        os.environ["REDIS_URL"] = settings.redis_url
    os.environ["MASKSERVE_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    metrics_dir = tempfile.mkdtemp(prefix="maskserve-metrics-")  # the workers' metrics, summed by /metrics
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run("service.http.app:create_app", factory=True, workers=workers,
                    **{**common, "http": "service.http.serving:GuardedHttp"})  # fmt: skip
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.stop()
