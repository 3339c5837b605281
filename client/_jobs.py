"""Job streams: lease batches of a shared job, ack them after use.

Many workers attach to one job by name; the service hands each batch of an
epoch to one of them under a lease. A :class:`JobStream` keeps up to
``prefetch`` batches leased or being leased ahead of the consumer and yields
them in (epoch, index) order. A batch is acked when the consumer asks for the
next one (``auto_ack``) or when :meth:`JobStream.ack` is called; acks ride in
the body of the next lease request (with ``ack_every=N``, on the first lease request once
N are pending or the oldest has waited ``ack_delay`` seconds: fewer
confirmed writes, which a service with durable acks must each fsync, for at
most N-1 batches a crashed worker's successor trains again).

Nothing the consumer finished is ever lost: acks that a failed request carried
are sent again with the next one, lease requests are retried (with the same
request id, so a retry after a lost answer gets the same lease, never a second
one) across transport errors, 502/503/504 and the service's ``Retry-After``,
failing over between the client's replicas, for up to ``max_outage`` seconds.
Closing the stream acks the batch the consumer was given last (it was
trained; closing after an exception gives it back instead) and gives back the
batches it never handed out, so they are redelivered at once. A cancelled job
raises :class:`JobCancelled`; a finished one just ends the stream.

All of this bookkeeping is written once, in :class:`JobBook`, as plans (:mod:`client._plans`) and plain
methods: :class:`JobStream` runs it on threads for the blocking :class:`~client.Client`, under one lock;
:class:`AsyncJobStream` runs it as asyncio tasks for the :class:`~client.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from wire import CONTENT_TYPE, WireFormatError, decode

from ._batch import Batch, Closing
from ._errors import APIError, GoneError, JobCancelled, MaskserveError, ProtocolError
from ._plans import Op, Plan, Sleep, arun, run
from ._transport import Connected, Outage, Received

log = logging.getLogger("maskserve.client")

#: ack verdicts that mean the batch is counted (``duplicate``: an earlier send of the same ack counted)
CONFIRMED = frozenset({"acked", "late", "duplicate"})
_IDLE = float("inf")  # a request slot that is not on the wire
#: most acks one request carries (in its JSON body, about 80 bytes each: some 20 KB); more go with the next.
#: A service configured for fewer (MASKSERVE_MAX_ACKS, or MASKSERVE_MAX_JSON_BYTES) refuses the request before
#: doing anything, and the stream sends fewer from then on
MAX_PIGGYBACK = 256


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Slot:
    """One lease request in progress: ``seq`` numbers its current send (increasing through the stream),
    ``sent_after`` counts the batches that had arrived when it began; both _IDLE while it is not on the wire."""

    seq: float = _IDLE
    sent_after: float = _IDLE
    future: Any = field(default=None, repr=False)  # the thread's Future, or the asyncio Task, asking
    told_wait: bool = False  # its last answer was 'nothing to hand out now' and it has not asked again yet


@dataclass(order=True)
class _Ready:
    epoch: int
    index: int
    arrival: int
    seq: float = field(compare=False)
    in_order: bool = field(compare=False)
    batch: Batch = field(compare=False, repr=False)


#: what the consumer does next (:meth:`JobBook._pick`)
Pick = tuple[Literal["batch", "none", "end", "closed", "wait"], Any]


class JobBook:
    """A job stream's state and every decision about it, with no I/O and no threads of its own: the lease and
    ack requests are plans, the consumer's next move is :meth:`_pick`. A subclass says how a lease request is
    started (:meth:`_spawn`) and how waiters learn that something changed (:meth:`_changed`), and holds its
    own lock (if any) around every call."""

    def __init__(
        self, client: Connected, job: str, *, worker: str | None = None, prefetch: int = 2, auto_ack: bool = True,
        max_outage: float = 300.0, ack_every: int = 1, ack_delay: float = 2.0, stats_every: float | None = 5.0,
        **output: Any,
    ) -> None:  # fmt: skip
        self.client = client
        self._transport = client.transport
        self.ack_every = min(MAX_PIGGYBACK, max(1, ack_every))
        self._ack_cap = MAX_PIGGYBACK  # most acks per request; lowered when the service refuses as many
        self.ack_delay = ack_delay
        self.job = job
        self.worker = worker or default_worker()
        self.auto_ack = auto_ack
        self.max_outage = max_outage
        self._output = {k: v for k, v in output.items() if v is not None}
        self._depth = max(1, prefetch)
        self._slots: list[_Slot] = []  # requests in progress
        self._ready: list[_Ready] = []  # a heap: smallest (epoch, index) first
        self._arrivals = 0  # leases received so far
        self._seq = 0  # the last request number sent (microseconds since the epoch, made increasing)
        self._acks: list[str] = []  # finished, not yet confirmed by the service
        self._acks_since: float | None = None  # when the oldest of them was finished
        self._flush_next = False  # the service is waiting: the next request carries every ack
        self._current: Batch | None = None  # yielded, not yet acked
        self._ended: str | None = None  # 'done' or 'cancelled', as the service said
        self._error: BaseException | None = None
        self._closed = False
        self._outage_since: float | None = None
        self.acked = 0  # acks the service confirmed
        # the consumer's data wait and step time since the last summary sent (every ``stats_every`` seconds, with
        # a lease request; None: never)
        self.stats_every = stats_every
        self._wait = self._step = 0.0
        self._batches = 0
        self._leases, self._lease_s = 0, 0.0  # lease requests answered with a batch, and their round trips
        self._lease_window = (0, 0.0)  # those figures as last sent: since the last summary that had any
        self._yielded_at: float | None = None
        self._stats_at = time.monotonic()
        self.rejected: list[tuple[str, str]] = []  # (lease id, verdict) of acks the service refused

    def _spawn(self, slot: _Slot) -> None:
        """Start carrying out ``self._lease(slot)``, setting ``slot.future``."""
        raise NotImplementedError

    def _changed(self) -> None:
        """Wake whoever waits for the stream's state to change."""
        raise NotImplementedError

    # ---- leasing -----------------------------------------------------------------

    def _lease(self, slot: _Slot) -> Plan[None]:
        """Lease one batch, asking again while the service says 'wait'; files the outcome."""
        try:
            while not (yield from self._ask(slot)):
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            if self._error is None and not self._closed:
                self._error = exc
        finally:
            self._slots.remove(slot)
            self._changed()

    def _ask(self, slot: _Slot) -> Plan[bool]:
        """One lease request of ``slot`` (with its retries): True once the slot is done (a batch filed, the
        job over, the stream closed), False to ask again."""
        # one id for every retry of this request (a lost answer is not a lost lease), a new one once
        # an answer came: the request number and arrivals counted below belong to it
        rid = uuid.uuid4().hex
        if self._closed:
            return True
        acks = self._take_acks()
        stats = self._take_stats()
        slot.told_wait = False
        slot.sent_after = self._arrivals
        self._seq = slot.seq = max(self._seq + 1, time.time_ns() // 1000)
        sent = time.monotonic()
        try:
            resp = yield from self._transport.receive(
                "POST", f"/v1/jobs/{self.job}/next", idempotent=True,
                outage=Outage(self.max_outage, should_stop=lambda: self._closed, on_retry=self._outage),
                params={"worker": self.worker, "request": rid, "seq": int(slot.seq), **self._output},
                headers={"Accept": CONTENT_TYPE},
                **({"json": {**({"acks": acks} if acks else {}), **({"stats": stats} if stats else {})}}
                   if acks or stats else {}),
            )  # fmt: skip
        except GoneError as exc:  # finished or cancelled; the acks in this call were applied
            self._confirm(acks, exc.extra.get("acks") or [])
            self._ended = "cancelled" if isinstance(exc, JobCancelled) else "done"
            return True
        except BaseException as exc:
            # not applied, or not known to be: they go again with the next request
            self._put_back(acks)
            if isinstance(exc, APIError) and self._fewer_acks(exc, len(acks)):
                return False  # refused for carrying too many, before anything was applied
            raise
        self._back()
        verdicts = resp.headers.get("maskserve-acks", "")
        self._confirm(acks, verdicts.split(",") if verdicts else [])
        if resp.status_code == 204:  # nothing to hand out now: off the wire until it advised to ask again
            self._flush_next = True  # e.g. the end of the job waits on acks still held here
            slot.seq = slot.sent_after = _IDLE
            slot.told_wait = True
            self._changed()
            yield Sleep(int(resp.headers.get("maskserve-retry-after-ms", "100")) / 1000, interruptible=True)
            return False
        self._file(slot, resp, time.monotonic() - sent)
        return True

    def _file(self, slot: _Slot, resp: Received, round_trip: float) -> None:
        """Decode the leased batch and put it among the ready ones (``round_trip``: seconds its request took)."""
        try:
            arrays, metadata = decode(resp.body)
        except WireFormatError as exc:
            raise ProtocolError(f"job batch from {self._transport.base_url}: {exc}") from None
        batch = Batch(arrays, metadata, step=int(metadata.get("index", 0)))
        in_order = resp.headers.get("maskserve-in-order") == "1"
        self._arrivals += 1
        self._leases += 1
        self._lease_s += round_trip
        heapq.heappush(self._ready, _Ready(batch.epoch, batch.index, self._arrivals, slot.seq, in_order, batch))

    def _take_stats(self) -> dict[str, Any] | None:
        """The consumer's summary since the last one sent, when one is due. Its lease figures cover the lease
        requests answered since the last summary that had any (a batch yielded was leased first, so the first
        summary has some)."""
        if self.stats_every is None or not self._batches or time.monotonic() - self._stats_at < self.stats_every:
            return None
        if self._leases:  # else the last figures again: the service keeps only the latest summary
            self._lease_window = (self._leases, round(self._lease_s, 6))
            self._leases, self._lease_s = 0, 0.0
        out = {"batches": self._batches, "wait_s": round(self._wait, 6), "step_s": round(self._step, 6),
               "leases": self._lease_window[0], "lease_s": self._lease_window[1]}  # fmt: skip
        self._wait = self._step = 0.0
        self._batches = 0
        self._stats_at = time.monotonic()
        return out

    def _take_acks(self) -> list[str]:
        """The acks the next lease request carries: all of them once ``ack_every`` are pending, the oldest
        has waited ``ack_delay`` seconds, or the service said it waits; else none."""
        due = self._flush_next or len(self._acks) >= self.ack_every or (
            self._acks_since is not None and time.monotonic() - self._acks_since >= self.ack_delay
        )
        if not due or not self._acks:
            return []
        acks, self._acks = self._acks[: self._ack_cap], self._acks[self._ack_cap :]
        self._flush_next = bool(self._acks)  # more than one request holds: the next takes the rest
        self._acks_since = time.monotonic() if self._acks else None
        return acks

    def _put_back(self, acks: list[str]) -> None:
        if acks:
            self._acks[:0] = acks
            self._acks_since = self._acks_since or time.monotonic()

    def _fewer_acks(self, exc: APIError, sent: int) -> bool:
        """Whether ``exc`` refused a request for carrying ``sent`` acks (too many, or too many bytes: nothing
        was applied); if so, later requests carry fewer."""
        if sent <= 1 or not (exc.status == 413 or (exc.status == 422 and exc.type.endswith(":limit-exceeded"))):
            return False
        limit = exc.extra.get("limit")
        fits = limit if exc.status == 422 and isinstance(limit, int) and 0 < limit < sent else sent // 2
        self._ack_cap = min(self._ack_cap, fits)
        self._flush_next = True  # the next request takes the next share
        log.warning("job %r: the service refused %d acks in one request (%s); sending at most %d",
                    self.job, sent, exc, self._ack_cap)  # fmt: skip
        return True

    def _confirm(self, sent: list[str], verdicts: list[str]) -> None:
        for lease, verdict in zip(sent, verdicts, strict=False):
            if verdict in CONFIRMED:
                self.acked += 1
            else:
                self.rejected.append((lease, verdict))
                log.warning("job %r: the service refused the ack of lease %s (%s)", self.job, lease, verdict)

    def _outage(self, err: Exception, attempt: int) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("job %r: %s; retrying for up to %.0fs", self.job, err, self.max_outage)
            self._changed()  # a poll() waiting for this request comes back after its patience

    def _back(self) -> None:
        if self._outage_since is not None:
            log.warning("job %r: the service answers again (after %.1fs), at %s",
                        self.job, time.monotonic() - self._outage_since, self._transport.base_url)  # fmt: skip
            self._outage_since = None

    def _top_up(self) -> None:
        while not self._ended and not self._closed and len(self._ready) + len(self._slots) < self._depth:
            slot = _Slot()
            self._slots.append(slot)
            self._spawn(slot)

    # ---- the consumer ------------------------------------------------------------

    def _yieldable(self) -> bool:
        """The smallest ready batch may go out once no request that might still return a smaller one is on
        the wire. The service grants fresh batches in order, so a request sent after the batch arrived gets
        a later one; and when the service says the batch was granted in order (no later-numbered request of
        this stream got one first), so does every later-numbered request. Redelivered batches come as they
        are handed out."""
        if not self._ready:
            return False
        head = self._ready[0]
        if head.in_order:
            return all(s.seq > head.seq for s in self._slots)
        return all(s.sent_after >= head.arrival for s in self._slots)

    def _starved(self) -> bool:
        """Nothing to yield, and either every request on the wire was told the service has nothing to hand out
        now (the job's remaining batches are leased to other workers, or its end waits on their acks), or the
        service does not answer (the requests are retrying through an outage)."""
        if self._ready or not self._slots:
            return False
        return self._outage_since is not None or all(s.told_wait for s in self._slots)

    def _asked(self, asked: float) -> None:
        """The consumer asked for a batch at ``asked``: its step ran from the batch it got to now."""
        if self._yielded_at is not None:
            self._step += asked - self._yielded_at
            self._yielded_at = None

    def _pick(self, asked: float, deadline: float | None) -> Pick:
        """What the consumer asking since ``asked`` gets now: ``("batch", b)``; ``("none", None)`` when
        ``deadline`` passed while starved; ``("end", None)`` at an error or the job's end; ``("closed", None)``;
        or ``("wait", seconds)`` until something changes (None: however long that takes)."""
        if self._closed:
            return "closed", None
        if self._error is not None or self._ended == "cancelled":
            return "end", None
        self._top_up()
        if self._yieldable():
            self._current = heapq.heappop(self._ready).batch
            self._yielded_at = time.monotonic()
            self._wait += self._yielded_at - asked
            self._batches += 1
            self._top_up()
            return "batch", self._current
        if self._ended and not self._slots and not self._ready:
            return "end", None
        if deadline is not None and self._starved():
            left = deadline - time.monotonic()
            return ("none", None) if left <= 0 else ("wait", left)
        return "wait", None

    def _end_error(self) -> BaseException | None:
        """What ending the stream raises: the error that ended it, :class:`JobCancelled`, or None (the job is
        done)."""
        if self._error is not None:
            return self._error
        if self._ended == "cancelled":
            return JobCancelled(410, "urn:maskserve:problem:job-finished", "Job cancelled",
                                f"job {self.job!r} was cancelled", {"job_status": "cancelled"})  # fmt: skip
        return None

    def _closing_failed(self, exc: MaskserveError) -> None:
        """Closing after an error could not deliver the acks: the first failure is the one to report (the acks
        stay queued)."""
        if self._error is None:
            raise exc
        log.warning("job %r: closing after an error: %s", self.job, exc)

    # ---- acks and shutdown -----------------------------------------------------

    def _queue_ack(self, batch: Batch) -> None:
        lease = batch.metadata.get("lease")
        if lease is None:
            return
        if batch is self._current:
            self._current = None
        self._acks.append(lease)
        self._acks_since = self._acks_since or time.monotonic()

    def _flush(self) -> Plan[None]:
        """Send the acks not yet sent, at most a request's share at a time, retrying each for up to
        ``max_outage``; on failure the unsent ones stay queued."""
        while True:
            acks, self._acks = self._acks[: self._ack_cap], self._acks[self._ack_cap :]
            self._acks_since = time.monotonic() if self._acks else None
            if not acks:
                return
            try:
                out = yield from self._transport.json("POST", f"/v1/jobs/{self.job}/ack", idempotent=True,
                                                      outage=Outage(self.max_outage, on_retry=self._outage),
                                                      json={"worker": self.worker, "leases": acks})  # fmt: skip
            except BaseException as exc:
                self._put_back(acks)
                if isinstance(exc, APIError) and self._fewer_acks(exc, len(acks)):
                    continue
                raise
            self._back()
            self._confirm(acks, out["results"])

    def _close(self) -> list[Any]:
        """Mark the stream closed; the lease requests still to finish (their futures or tasks)."""
        self._closed = True
        self._changed()
        return [s.future for s in self._slots if s.future is not None]

    def _unused(self, ack_current: bool) -> list[str]:
        """At close: the leases never handed out, and the last one handed out unless it is acked."""
        unused = [entry.batch.metadata["lease"] for entry in self._ready]
        self._ready.clear()
        if self._current is not None:
            if ack_current:
                self._queue_ack(self._current)
            else:
                unused.append(self._current.metadata["lease"])
            self._current = None
        return unused

    def _release(self, leases: list[str]) -> Plan[None]:
        """Give ``leases`` back, to be handed out again at once."""
        if not leases:
            return
        try:
            yield from self._transport.json("POST", f"/v1/jobs/{self.job}/release", idempotent=True,
                                            json={"worker": self.worker, "leases": leases})  # fmt: skip
        except MaskserveError as exc:  # they are handed out again when their leases expire
            log.warning("job %r: could not give back %d leases (%s)", self.job, len(leases), exc)


class JobStream(JobBook, Closing):
    """Iterator of leased :class:`Batch` objects of one job, in (epoch, index) order; its lease requests run on
    a pool of ``prefetch`` threads."""

    def __init__(self, client: Connected, job: str, *, prefetch: int = 2, **kw: Any) -> None:
        super().__init__(client, job, prefetch=prefetch, **kw)
        self._cv = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix=f"maskserve-job-{job}")

    def _spawn(self, slot: _Slot) -> None:
        slot.future = self._pool.submit(self._run, self._lease(slot))

    def _changed(self) -> None:
        self._cv.notify_all()

    def _run(self, plan: Plan[Any]) -> Any:
        """Carry out one of the stream's plans, its own code under the stream's lock."""
        return run(plan, self._execute, self._cv)

    def _execute(self, op: Op) -> Any:
        if isinstance(op, Sleep) and op.interruptible:
            with self._cv:
                self._cv.wait_for(lambda: self._closed, op.seconds)
            return None
        return self._transport.execute(op)

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> Batch:
        batch = self._take(None)  # without a patience it waits for a batch or the end
        assert batch is not None
        return batch

    def poll(self, patience: float = 0.0) -> Batch | None:
        """The next batch like ``next()``, except that while the service has nothing to hand out to this
        worker now (other workers hold the job's remaining leases) or does not answer (an outage the stream
        rides out for up to ``max_outage``), it returns None after ``patience`` seconds instead of waiting: a
        consumer in lockstep with others (data-parallel ranks) can go on with them and ask again. Raises
        StopIteration at the end of the job, as ``next()`` does."""
        return self._take(max(0.0, patience))

    def _take(self, patience: float | None) -> Batch | None:
        if self.auto_ack and self._current is not None:
            self.ack(self._current, send=False)
        asked = time.monotonic()
        deadline = None if patience is None else asked + patience
        with self._cv:
            self._asked(asked)
            while (picked := self._pick(asked, deadline))[0] == "wait":
                self._cv.wait(picked[1])
        kind, batch = picked
        if kind == "batch":
            return batch
        if kind == "none":
            return None
        if kind == "end":
            try:
                self.close()
            except MaskserveError as exc:
                self._closing_failed(exc)
            if (error := self._end_error()) is not None:
                raise error
        raise StopIteration

    def ack(self, batch: Batch, *, send: bool = True) -> None:
        """Mark ``batch`` trained; ``send`` posts it now rather than with the next lease request."""
        with self._cv:
            self._queue_ack(batch)
        if send:
            self.flush()

    def flush(self) -> None:
        """Send the acks not yet sent, at most a request's share at a time, retrying each for up to
        ``max_outage``; on failure the unsent ones stay queued."""
        self._run(self._flush())

    def close(self, ack_current: bool = True) -> None:
        """Ack what the consumer was given (``ack_current=False``: give its last batch back instead) and
        give back what it never got. Raises if the acks could not be delivered within ``max_outage``."""
        with self._cv:
            if self._closed:
                return
            futures = self._close()
        for f in futures:  # requests on the wire finish (their leases are given back below)
            f.exception()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._cv:
            unused = self._unused(ack_current)
        self._run(self._release(unused))
        self.flush()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # leaving the block on an error: the last batch was not trained (GeneratorExit: the consumer stopped)
        self.close(ack_current=exc_type is None or issubclass(exc_type, GeneratorExit))

    def __del__(self) -> None:
        if not self._closed:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to at garbage collection
                pass


class AsyncJobStream(JobBook):
    """Async iterator of leased :class:`Batch` objects of one job, in (epoch, index) order, for the
    :class:`~client.AsyncClient`; its lease requests run as ``prefetch`` asyncio tasks. The job is created from
    ``create`` (when given) before the first lease is asked for."""

    def __init__(self, client: Connected, job: str, *, create: Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(client, job, **kw)
        self._create = dict(create) if create is not None else None
        self._change = asyncio.Event()  # set when the state changed; the consumer clears it before waiting
        self._closing = asyncio.Event()

    def _spawn(self, slot: _Slot) -> None:
        slot.future = asyncio.ensure_future(self._run(self._lease(slot)))

    def _changed(self) -> None:
        self._change.set()

    async def _run(self, plan: Plan[Any]) -> Any:
        return await arun(plan, self._execute)

    async def _execute(self, op: Op) -> Any:
        if isinstance(op, Sleep) and op.interruptible:
            try:
                await asyncio.wait_for(self._closing.wait(), op.seconds)
            except TimeoutError:
                pass
            return None
        return await self._transport.execute(op)  # type: ignore[misc]

    def __aiter__(self) -> "AsyncJobStream":
        return self

    async def __anext__(self) -> Batch:
        batch = await self._take(None)
        assert batch is not None
        return batch

    async def poll(self, patience: float = 0.0) -> Batch | None:
        """The next batch, or None after ``patience`` seconds while the service has nothing to hand out to
        this worker now, as :meth:`JobStream.poll`; raises StopAsyncIteration at the end of the job."""
        return await self._take(max(0.0, patience))

    async def _take(self, patience: float | None) -> Batch | None:
        if self._create is not None:
            await self.client.create_job(self.job, **self._create)  # type: ignore[attr-defined]
            self._create = None
        if self.auto_ack and self._current is not None:
            self._queue_ack(self._current)
        asked = time.monotonic()
        deadline = None if patience is None else asked + patience
        self._asked(asked)
        while (picked := self._pick(asked, deadline))[0] == "wait":
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), picked[1])
            except TimeoutError:
                pass
        kind, batch = picked
        if kind == "batch":
            return batch
        if kind == "none":
            return None
        if kind == "end":
            try:
                await self.aclose()
            except MaskserveError as exc:
                self._closing_failed(exc)
            if (error := self._end_error()) is not None:
                raise error
        raise StopAsyncIteration

    async def ack(self, batch: Batch, *, send: bool = True) -> None:
        """Mark ``batch`` trained; ``send`` posts it now rather than with the next lease request."""
        self._queue_ack(batch)
        if send:
            await self.flush()

    async def flush(self) -> None:
        """Send the acks not yet sent (see :meth:`JobStream.flush`)."""
        await self._run(self._flush())

    async def aclose(self, ack_current: bool = True) -> None:
        """Ack what the consumer was given (``ack_current=False``: give its last batch back instead) and
        give back what it never got. Raises if the acks could not be delivered within ``max_outage``."""
        if self._closed:
            return
        tasks = self._close()
        self._closing.set()
        await asyncio.gather(*tasks, return_exceptions=True)  # their leases are given back below
        await self._run(self._release(self._unused(ack_current)))
        await self.flush()

    async def __aenter__(self) -> "AsyncJobStream":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        await self.aclose(ack_current=exc_type is None or issubclass(exc_type, GeneratorExit))
