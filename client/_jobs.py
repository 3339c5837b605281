"""Job streams: lease batches of a shared job, ack them after use.

Many workers attach to one job by name; the service hands each batch of an
epoch to one of them under a lease. A :class:`JobStream` keeps ``prefetch``
lease requests in flight and acks a batch when the consumer asks for the next
one (``auto_ack``), piggybacking the ack on a later lease request, or when
:meth:`JobStream.ack` is called. Closing the stream acks what was finished and
gives back what was leased but never used, so it is redelivered at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from ._batch import Batch, Closing
from ._errors import APIError, ProtocolError
from ._wire import CONTENT_TYPE, WireFormatError, decode

if TYPE_CHECKING:
    from ._client import Client


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobStream(Closing):
    """Iterator of leased :class:`Batch` objects of one job."""

    def __init__(
        self, client: "Client", job: str, *, worker: str | None = None, prefetch: int = 2, auto_ack: bool = True,
        **output: Any,
    ) -> None:  # fmt: skip
        self.client = client
        self.job = job
        self.worker = worker or default_worker()
        self.auto_ack = auto_ack
        self._output = {k: v for k, v in output.items() if v is not None}
        self._depth = max(1, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix=f"maskserve-job-{job}")
        self._pending: list[Future[Batch | None]] = []  # in the order sent
        self._acks: list[str] = []  # finished, not yet sent
        self._lock = threading.Lock()
        self._current: Batch | None = None  # yielded, not yet acked
        self._finished = False  # the service said the job is done
        self._closed = False
        self.acked = 0

    # ---- leasing -------------------------------------------------------------

    def _lease(self) -> Batch | None:
        """One lease request (retrying while the service says 'wait'); None when the job ended."""
        while not self._closed:
            with self._lock:
                acks, self._acks = self._acks, []
            params: dict[str, Any] = {"worker": self.worker, "ack": acks, **self._output}
            try:
                resp = self.client._send("POST", f"/v1/jobs/{self.job}/next", idempotent=False, read_into=True,
                                         params=params, headers={"Accept": CONTENT_TYPE})  # fmt: skip
            except APIError as exc:
                if exc.status == 410:  # done or cancelled: the acks in this call were applied
                    self.acked += len(acks)
                    self._finished = True
                    return None
                with self._lock:  # the acks were not applied: send them again with the next call
                    self._acks = acks + self._acks
                raise
            r, buf = resp  # type: ignore[misc]
            self.acked += len(acks)
            if r.status_code == 204:
                time.sleep(int(r.headers.get("maskserve-retry-after-ms", "100")) / 1000)
                continue
            try:
                arrays, metadata = decode(buf)
            except WireFormatError as exc:
                raise ProtocolError(f"job batch from {self.client.base_url}: {exc}") from None
            return Batch(arrays, metadata, step=int(metadata.get("index", 0)))
        return None

    def _fill(self) -> None:
        while len(self._pending) < self._depth and not self._finished and not self._closed:
            self._pending.append(self._pool.submit(self._lease))

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> Batch:
        if self.auto_ack and self._current is not None:
            self.ack(self._current, send=False)
        while True:
            if self._closed:
                raise StopIteration
            self._fill()
            if not self._pending:
                self.close()
                raise StopIteration
            # whichever request is answered first: an earlier one may be waiting for a batch
            # that a later one of this very stream holds (its ack rides on the waiting one)
            done, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            future = next(f for f in self._pending if f in done)
            self._pending.remove(future)
            try:
                batch = future.result()
            except BaseException:
                self.close()
                raise
            if batch is not None:
                self._current = batch
                return batch
            # that request found the job finished; drain what is still in flight

    # ---- acks and shutdown -----------------------------------------------------

    def ack(self, batch: Batch, *, send: bool = True) -> None:
        """Mark ``batch`` done; ``send`` posts it now rather than with the next lease request."""
        lease = batch.metadata.get("lease")
        if lease is None:
            return
        if batch is self._current:
            self._current = None
        with self._lock:
            self._acks.append(lease)
        if send:
            self.flush()

    def flush(self) -> None:
        """Send the acks not yet sent."""
        with self._lock:
            acks, self._acks = self._acks, []
        if acks:
            self.client._json("POST", f"/v1/jobs/{self.job}/ack", idempotent=True,
                              json={"worker": self.worker, "leases": acks})  # fmt: skip
            self.acked += len(acks)

    def close(self) -> None:
        """Ack what was finished; give back leased batches that were never used."""
        if self._closed:
            return
        self._closed = True
        unused: list[str] = []
        for f in self._pending:
            f.cancel()
        for f in self._pending:
            if not f.cancelled():
                try:
                    b = f.result(timeout=30)
                except Exception:  # noqa: BLE001 - a failed prefetch holds no lease
                    b = None
                if b is not None:
                    unused.append(b.metadata["lease"])
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._current is not None:  # handed to the consumer but not acked: redeliver
            unused.append(self._current.metadata["lease"])
            self._current = None
        try:
            self.flush()
            if unused:
                self.client._json("POST", f"/v1/jobs/{self.job}/release", idempotent=True,
                                  json={"worker": self.worker, "leases": unused})  # fmt: skip
        except Exception:  # noqa: BLE001 - leases expire by themselves if the service is gone
            pass

