"""CPU work off the event loop, and admission control.

Masking, rendering, tokenizing and parsing are CPU-bound; run on the event
loop they stall every other request of the process: health probes time out and
Redis replies sit unread until the client's socket timeout fires, which looks
like a dead store. So the work goes to a bounded pool of threads (numpy and
the tokenizers library release the GIL for most of it), and a process admits
only a bounded number of heavy requests at once: beyond that it answers 503
``overloaded`` with ``Retry-After`` at once instead of queueing without bound.

Admission also counts bytes: a heavy request that is to answer with a large
body (a batch) says so before it reads anything (:meth:`Admission.hold`), and
the process refuses it with ``overloaded`` when the bodies it already holds
reach ``MASKSERVE_MAX_INFLIGHT_BYTES``. A body is held until its last piece has
gone to the client, so slow readers count for as long as they read.

Small batches are masked inline: a thread hop costs more than masking a few
thousand tokens, and such work never holds the loop for long.
"""

from __future__ import annotations

import random
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .errors import Overloaded

T = TypeVar("T")

# Routes whose requests do CPU work or hold large buffers: (method, path suffix or exact path).
_HEAVY_SUFFIXES = {
    "GET": ("/batch",),
    "POST": ("/next", "/masking-report", "/static-masks", "/documents", "/sequences"),
}
_HEAVY_PATHS = {("POST", "/v1/datasets"), ("POST", "/v1/tokenizers/train")}


def ignore_stage(stage: str, seconds: float) -> None:
    """The batch-stage observer of a process without metrics."""


def is_heavy(method: str, path: str) -> bool:
    """Whether a request counts against the admission limit (health, progress and acks never do)."""
    return (method, path) in _HEAVY_PATHS or path.endswith(_HEAVY_SUFFIXES.get(method, ()))


class Workload:
    """One process's CPU pool and admission counters (lives on ``app.state.work``)."""

    def __init__(self, *, cpu_threads: int, max_inflight: int, inline_tokens: int, max_inflight_bytes: int = 1 << 62,
                 retry_after_s: int = 1, retry_ms: int = 200) -> None:  # fmt: skip
        self.limiter = anyio.CapacityLimiter(cpu_threads)
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.inline_tokens = inline_tokens
        self.retry_after_s, self.retry_ms = retry_after_s, retry_ms
        self.inflight = 0
        self.inflight_bytes = 0
        self.observe: Callable[[str, float], None] = ignore_stage  # (stage, seconds) of each batch; the app's metrics

    def admit(self) -> "Admission | None":
        """Take a slot for a heavy request; None when all are taken (answer ``overloaded``)."""
        if self.inflight >= self.max_inflight:
            return None
        self.inflight += 1
        return Admission(self)

    def overloaded(self, detail: str) -> Overloaded:
        """The refusal of a request this process has no room for, with its retry hints (the finer one jittered
        within +-50%, so refused clients do not come back in one wave)."""
        return Overloaded(detail, retry_after_s=self.retry_after_s,
                          retry_after_ms=max(1, round(self.retry_ms * random.uniform(0.5, 1.5))))  # fmt: skip

    async def run(self, fn: Callable[..., T], *args: object, tokens: int | None = None) -> T:
        """``fn(*args)`` on the CPU pool; inline when it touches at most ``inline_tokens`` tokens."""
        if tokens is not None and tokens <= self.inline_tokens:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)


class Admission:
    """An admitted heavy request: its slot, and the response bytes it holds, until :meth:`close`."""

    __slots__ = ("work", "nbytes", "closed", "refused")

    def __init__(self, work: Workload) -> None:
        self.work, self.nbytes, self.closed = work, 0, False
        self.refused = False  # it asked for more bytes than the process had room for

    def hold(self, nbytes: int, *, check: bool = True) -> None:
        """Count ``nbytes`` as this request's response bytes (in place of what it held). With ``check``, raise
        ``Overloaded`` when that would take the process past ``max_inflight_bytes``, unless no other request
        holds any (a body larger than the limit is still served, alone)."""
        w = self.work
        others = w.inflight_bytes - self.nbytes
        if check and nbytes > self.nbytes and others > 0 and others + nbytes > w.max_inflight_bytes:
            self.refused = True
            raise w.overloaded(f"this process is sending {others} bytes of responses; its limit is "
                               f"{w.max_inflight_bytes}, and this one needs about {nbytes}")  # fmt: skip
        w.inflight_bytes = others + nbytes
        self.nbytes = nbytes

    def close(self) -> None:
        """Give back the slot and the bytes (once)."""
        if not self.closed:
            self.closed = True
            self.work.inflight -= 1
            self.work.inflight_bytes -= self.nbytes
            self.nbytes = 0


ADMISSION = "maskserve.admission"  # the ASGI scope key of a heavy request's Admission


def admission(scope: MutableMapping[str, Any]) -> Admission | None:
    """The admission of the request ``scope`` belongs to (None for light requests)."""
    return scope.get(ADMISSION)
