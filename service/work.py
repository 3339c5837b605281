"""CPU work off the event loop, and admission control.

Masking, rendering, tokenizing and parsing are CPU-bound; run on the event
loop they stall every other request of the process: health probes time out and
Redis replies sit unread until the client's socket timeout fires, which looks
like a dead store. So the work goes to a bounded pool of threads (numpy and
the tokenizers library release the GIL for most of it), and a process admits
only a bounded number of heavy requests at once: beyond that it answers 503
``overloaded`` with ``Retry-After`` at once instead of queueing without bound.

Small batches are masked inline: a thread hop costs more than masking a few
thousand tokens, and such work never holds the loop for long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

# Routes whose requests do CPU work or hold large buffers: (method, path suffix or exact path).
_HEAVY_SUFFIXES = {
    "GET": ("/batch",),
    "POST": ("/next", "/masking-report", "/static-masks", "/documents", "/sequences"),
}
_HEAVY_PATHS = {("POST", "/v1/datasets"), ("POST", "/v1/tokenizers/train")}


def is_heavy(method: str, path: str) -> bool:
    """Whether a request counts against the admission limit (health, progress and acks never do)."""
    return (method, path) in _HEAVY_PATHS or path.endswith(_HEAVY_SUFFIXES.get(method, ()))


class Workload:
    """One process's CPU pool and admission counter (lives on ``app.state.work``)."""

    def __init__(self, *, cpu_threads: int, max_inflight: int, inline_tokens: int) -> None:
        self.limiter = anyio.CapacityLimiter(cpu_threads)
        self.max_inflight = max_inflight
        self.inline_tokens = inline_tokens
        self.inflight = 0

    def admit(self) -> bool:
        """Take a slot for a heavy request; False when all are taken (answer ``overloaded``)."""
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight -= 1

    async def run(self, fn: Callable[..., T], *args: object, tokens: int | None = None) -> T:
        """``fn(*args)`` on the CPU pool; inline when it touches at most ``inline_tokens`` tokens."""
        if tokens is not None and tokens <= self.inline_tokens:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
