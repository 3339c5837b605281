"""A decoded batch: numpy arrays over the response buffer, torch on request; the stream of prefetched ones."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Closing:
    """Context-manager and finalizer plumbing of the client's background streams."""

    _closed: bool = False

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            self.close()


@dataclass
class Batch:
    """One masked batch. Arrays share memory with the received bytes.

    ``input_ids`` int32 (B, L), ``attention_mask`` uint8 (B, L), ``labels``
    int32 (B, L) with -100 where no prediction is wanted, ``sequence_ids``
    int64 (B,): which stored sequences these are. A mixture job's batch also
    has ``source_ids`` int32 (B,), indexes into ``metadata["sources"]``
    (comma-separated dataset names; :attr:`sources` gives each row's).
    """

    arrays: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)
    step: int = 0

    @property
    def seed(self) -> int:
        return int(self.metadata.get("seed", 0))

    @property
    def epoch(self) -> int:
        return int(self.metadata.get("epoch", 0))

    @property
    def index(self) -> int:
        return int(self.metadata.get("index", 0))

    @property
    def sources(self) -> list[str] | None:
        """A mixture job's batch: each row's source dataset (None for one dataset's batch)."""
        names = self.metadata.get("sources")
        if names is None or "source_ids" not in self.arrays:
            return None
        table = names.split(",")
        return [table[i] for i in self.arrays["source_ids"]]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def numpy(self, *, int64: bool = False) -> dict[str, np.ndarray]:
        """The arrays by name. ``int64=True`` widens every integer array to int64 (a copy of
        each narrower one): Hugging Face models index embeddings and compute the loss with
        int64 ids and labels only, and reject the int32 the wire carries."""
        if not int64:
            return dict(self.arrays)
        return {k: _widen(v) for k, v in self.arrays.items()}

    def torch(self, device: Any = None, non_blocking: bool = True) -> dict[str, Any]:
        """Tensors for a model: ids and labels int64, attention mask int64.

        The int32 -> int64 widening is the only copy of token data; it happens
        on ``device`` when one is given (after a pinned host-to-device move).
        """
        import torch

        out: dict[str, Any] = {}
        for name in ("input_ids", "attention_mask", "labels"):
            t = torch.from_numpy(self.arrays[name])
            if device is not None and torch.device(device).type == "cuda":
                t = t.pin_memory().to(device, non_blocking=non_blocking)
            elif device is not None:
                t = t.to(device)
            out[name] = t.long()
        return out


def _widen(a: np.ndarray) -> np.ndarray:
    """``a`` as int64 when it holds integers (no copy when it already is), else unchanged."""
    return a.astype(np.int64, copy=False) if a.dtype.kind in "iu" else a


class _Prefetch:
    """The indexes a prefetching stream asks for: ``start, start+1, ...`` (``steps`` of them, or forever),
    ``depth`` in flight."""

    def __init__(self, start: int, steps: int | None, prefetch: int) -> None:
        self._next = start
        self._end = None if steps is None else start + steps
        self._depth = max(1, prefetch)

    def _due(self, in_flight: int) -> list[int]:
        """The indexes to ask for now, with ``in_flight`` requests on the wire."""
        last = self._next + max(0, self._depth - in_flight)
        due = list(range(self._next, last if self._end is None else min(last, self._end)))
        self._next += len(due)
        return due


class BatchStream(_Prefetch, Closing):
    """An iterator over ``fetch(k)`` with ``prefetch`` calls in flight on threads."""

    def __init__(self, fetch: Callable[[int], Batch], start: int, steps: int | None, prefetch: int) -> None:
        super().__init__(start, steps, prefetch)
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix="maskserve-prefetch")
        self._pending: deque[Future[Batch]] = deque()
        self._closed = False

    def _fill(self) -> None:
        self._pending.extend(self._pool.submit(self._fetch, k) for k in self._due(len(self._pending)))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        self._fill()
        if not self._pending:
            self.close()
            raise StopIteration
        try:
            return self._pending.popleft().result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closed = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class AsyncBatchStream(_Prefetch):
    """An async iterator over ``await fetch(k)`` with ``prefetch`` calls in flight as tasks."""

    def __init__(self, fetch: Callable[[int], Awaitable[Batch]], start: int, steps: int | None, prefetch: int) -> None:
        super().__init__(start, steps, prefetch)
        self._fetch = fetch
        self._pending: deque[asyncio.Task[Batch]] = deque()
        self._closed = False

    def __aiter__(self) -> "AsyncBatchStream":
        return self

    async def __anext__(self) -> Batch:
        if self._closed:
            raise StopAsyncIteration
        self._pending.extend(asyncio.ensure_future(self._fetch(k)) for k in self._due(len(self._pending)))
        if not self._pending:
            await self.aclose()
            raise StopAsyncIteration
        try:
            return await self._pending.popleft()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Cancel the requests in flight."""
        self._closed = True
        pending, self._pending = list(self._pending), deque()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> "AsyncBatchStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
