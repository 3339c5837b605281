"""A running ingest, as the whole fleet sees it: a small record in Redis, refreshed while the ingest runs.

Any process's ``GET /v1/ingests`` lists the ingests running on every process (the dashboard shows them):
what was received of the body so far (and of its announced length), the documents, sequences and tokens
tokenized, the chunk bytes staged. The record is written when the ingest starts, refreshed every interval
by a task beside it, and removed when it ends, however it ends; a process that dies leaves a record that
stops being refreshed, and readers drop it after 10 intervals (at least 10 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio

from .ingest import IngestStats

log = logging.getLogger("maskserve.ingest")


class Reporter(Protocol):
    async def report_ingest(self, ingest: str, record: dict[str, Any]) -> None: ...

    async def end_ingest(self, ingest: str) -> None: ...


def stale_after(interval: float) -> float:
    """Seconds after which a record not refreshed is a dead process's."""
    return max(10.0, 10 * interval)


class IngestProgress:
    """The progress record of one ingest. ``async with`` publishes it for the ingest's lifetime;
    :meth:`received` wraps the request body to count its bytes."""

    def __init__(
        self, store: Reporter, dataset: str, stats: IngestStats, *, interval: float, key: str | None,
        media_type: str, length: int | None, encoding: str, on_bytes: Callable[[int], None] | None = None,
        running: Any = None,
    ) -> None:  # fmt: skip
        """``on_bytes(n)`` is told of each piece of the body as it arrives; ``running`` (a gauge) counts the
        ingest while it runs."""
        self.store = store
        self.on_bytes = on_bytes
        self.running = running
        self.id = uuid.uuid4().hex[:16]
        self.stats = stats  # filled by the pipeline on worker threads; plain integers, read here as they are
        self.interval = interval
        self.started = time.time()
        self.fixed = {"id": self.id, "dataset": dataset, "key": key, "media_type": media_type,
                      "content_length": length, "content_encoding": encoding, "started": round(self.started, 3)}  # fmt: skip
        self.bytes_received = 0
        self._task: asyncio.Task[None] | None = None

    def record(self) -> dict[str, Any]:
        s = self.stats
        return {**self.fixed, "updated": round(time.time(), 3), "bytes_received": self.bytes_received,
                "documents": s.documents, "sequences": s.sequences, "tokens": s.tokens, "bytes_staged": s.bytes,
                "chunks": len(s.chunk_counts)}  # fmt: skip

    async def received(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``body`` as it is, its bytes counted as they arrive."""
        async for piece in body:
            self.bytes_received += len(piece)
            if self.on_bytes is not None:
                self.on_bytes(len(piece))
            yield piece

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._publish()

    async def _publish(self) -> None:
        try:
            await self.store.report_ingest(self.id, self.record())
        except Exception as exc:  # noqa: BLE001 - progress is for people to look at; the ingest goes on
            log.warning("could not publish the progress of ingest %s: %s", self.id, exc)

    async def __aenter__(self) -> IngestProgress:
        if self.running is not None:
            self.running.inc()
        await self._publish()
        self._task = asyncio.create_task(self._refresh())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.running is not None:
            self.running.dec()
        # removed even when the request was cancelled (its client went away): shielded from that cancellation
        with anyio.CancelScope(shield=True):
            try:
                await self.store.end_ingest(self.id)
            except Exception as exc:  # noqa: BLE001 - readers drop the record once it is no longer refreshed
                log.warning("could not remove the progress record of ingest %s: %s", self.id, exc)
