"""A request body read by code that pulls: decompressors and the Arrow reader.

Those readers want a blocking file and do CPU work between reads, so they run
in a worker thread. :class:`BlockingBody` is that file: each time its buffer
runs dry it runs one step of the async body on the event loop and waits for
the piece. Only the bytes of one body piece are held; whatever the reader
keeps on top of that is bounded by what it is asked to return per call.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from ..core.errors import PayloadTooLarge

T = TypeVar("T")


class BlockingBody(io.RawIOBase):
    """An async byte stream as a blocking, read-only raw file, for worker threads started by
    :func:`anyio.to_thread.run_sync` (it calls back into the event loop with :func:`anyio.from_thread.run`)."""

    def __init__(self, body: AsyncIterator[bytes], max_read: int = 1 << 62) -> None:
        super().__init__()
        self.max_read = max_read  # the most one read() may ask for
        self._body = body.__aiter__()
        self._piece = memoryview(b"")
        self._eof = False
        self.consumed = 0  # bytes of the body read so far

    async def _next(self) -> bytes | None:
        try:
            return await self._body.__anext__()
        except StopAsyncIteration:
            return None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes, fewer only at the end of the body (readers such as Arrow's take a short read
        for the end), or all the rest when ``size`` is negative. Memory grows with the bytes that came, not
        with the size asked for (a reader may ask for whatever length a malformed header claims)."""
        if size is None or size < 0:
            return self.readall()
        if size > self.max_read:
            raise PayloadTooLarge(f"the body asks for a read of {size} bytes at once, over the {self.max_read}-byte "
                                  "limit", limit=self.max_read)  # fmt: skip
        parts: list[bytes] = []
        got = 0
        while got < size:
            if not self._piece and not self._refill():
                break
            n = min(size - got, len(self._piece))
            parts.append(bytes(self._piece[:n]))
            self._piece = self._piece[n:]
            got += n
        self.consumed += got
        return b"".join(parts)

    def _refill(self) -> bool:
        """Wait for the next piece of the body; False at its end."""
        while not self._piece and not self._eof:
            piece = anyio.from_thread.run(self._next)
            if piece is None:
                self._eof = True
            else:
                self._piece = memoryview(piece)
        return bool(self._piece)

    def readinto(self, buf) -> int:  # noqa: ANN001 - any writable buffer
        self._refill()
        n = min(len(buf), len(self._piece))
        buf[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        self.consumed += n
        return n


@contextlib.asynccontextmanager
async def spooled(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The body written to a temporary file (in the system's temporary directory, removed afterwards), for
    readers that need to seek (Parquet's footer is at its end); yields the file's path. Bounded by the body's
    own limit; each write runs in a worker thread."""
    with tempfile.NamedTemporaryFile(prefix="maskserve-ingest-", suffix=".parquet") as f:
        async for piece in body:
            await anyio.to_thread.run_sync(f.write, piece)
        await anyio.to_thread.run_sync(f.flush)
        yield f.name


async def pulled(step: Callable[[], T | None], limiter: anyio.CapacityLimiter | None = None) -> AsyncIterator[T]:
    """Call ``step`` in a worker thread until it returns None (or an empty value), yielding each result.

    ``step`` reads a :class:`BlockingBody`, so while it waits for the network the thread holds a token of
    ``limiter`` (default: anyio's shared thread pool, not the CPU pool, so a slow upload never holds a CPU
    thread)."""
    while True:
        out = await anyio.to_thread.run_sync(step, limiter=limiter)
        if out is None or (hasattr(out, "__len__") and len(out) == 0):  # type: ignore[arg-type]
            return
        yield out
