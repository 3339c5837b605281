"""Calls written once, run by either client: plans of operations, and the two drivers that carry them out.

A *plan* is a generator that yields the operations it needs done (:class:`Send` a request, :class:`Sleep`)
and gets back each one's result, or has its exception raised where it yielded. Everything else a call does
(which replica, whether to retry, what an answer means, the ack bookkeeping of a job stream) is plain code
in the plan, with no I/O of its own. :func:`run` carries a plan out with blocking calls (the
:class:`~client.Client`), :func:`arun` with awaited ones (the :class:`~client.AsyncClient`): the two clients
share every plan, so they retry, fail over and bookkeep identically.

``guard``, when given, is held while the plan's own code runs and released while an operation is carried
out: a job stream's plans run on several threads and keep their state consistent under its lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """One HTTP request, answered with its response (body read), or with a :class:`~client._transport.Received`
    (body read into one writable buffer) when ``buffered``. An answer of 400 or more is raised as the
    :class:`~client.APIError` it describes; a failure to get one as ``httpx.TransportError``."""

    method: str
    url: str
    kw: dict[str, Any] = field(default_factory=dict)
    buffered: bool = False


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds``; an ``interruptible`` wait ends early when the stream that asked for it is closed."""

    seconds: float
    interruptible: bool = False


Op = Send | Sleep
Plan = Generator[Op, Any, T]


def run(plan: Plan[T], execute: Callable[[Op], Any], guard: AbstractContextManager[Any] | None = None) -> T:
    """Carry ``plan`` out with ``execute(op)`` blocking for each operation; its result."""
    guard = guard or nullcontext()
    value: Any = None
    error: BaseException | None = None
    while True:
        with guard:
            try:
                op = plan.throw(error) if error is not None else plan.send(value)
            except StopIteration as done:
                return done.value
        try:
            value, error = execute(op), None
        except BaseException as exc:  # noqa: BLE001 - raised inside the plan, where it yielded
            value, error = None, exc


async def arun(plan: Plan[T], execute: Callable[[Op], Awaitable[Any]]) -> T:
    """Carry ``plan`` out with ``await execute(op)`` for each operation; its result."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = plan.throw(error) if error is not None else plan.send(value)
        except StopIteration as done:
            return done.value
        try:
            value, error = await execute(op), None
        except BaseException as exc:  # noqa: BLE001 - raised inside the plan, where it yielded
            value, error = None, exc
