"""Durable confirmations: a write is confirmed only once it is on disk where the server can say so.

Acks and job transitions run as Lua scripts; with ``appendfsync everysec`` a
host crash can lose the last second of them after they were confirmed. On
Redis/Valkey >= 7.2 with the append-only file on, ``WAITAOF`` blocks until
the connection's writes are fsynced locally (and, if asked, on N replicas), so
the script and the wait travel in one pipeline on one connection and the
answer goes out only after both. Older servers (no ``WAITAOF``) or servers
with the AOF off confirm as soon as the script ran: the window that remains is
the server's own (up to a second of writes with ``everysec``; see the README).

Modes (``MASKSERVE_DURABLE_ACKS``): ``auto`` waits where the server supports
it, ``require`` refuses to start where it does not, ``off`` never waits.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from .errors import StoreUnavailable

log = logging.getLogger("maskserve")

Mode = Literal["auto", "require", "off"]


class DurabilityError(RuntimeError):
    pass


class NotDurable(StoreUnavailable):
    """The script ran, but its writes were not confirmed on disk in time; ``result`` is what it returned."""

    result: Any = None


class Durability:
    def __init__(self, r: Redis, mode: Mode = "auto", replicas: int = 0, timeout_ms: int = 1000) -> None:
        self.r = r
        self.mode = mode
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.enabled = False
        self.probed = False
        self.reason = "not probed yet"

    async def probe(self) -> "Durability":
        """Find out whether the server can confirm fsynced writes (called at start-up)."""
        self.probed = True
        if self.mode == "off":
            self.enabled, self.reason = False, "disabled by configuration"
            return self
        try:
            await self.r.execute_command("WAITAOF", 1, 0, 1)
            self.enabled, self.reason = True, "WAITAOF: confirmed once in the append-only file on disk"
        except ResponseError as exc:
            text = str(exc).lower()
            self.enabled = False
            if "appendonly" in text:
                self.reason = "the server's append-only file is off"
            elif "unknown command" in text:
                self.reason = "the server has no WAITAOF (Redis < 7.2)"
            else:
                self.reason = f"WAITAOF failed: {exc}"
        if not self.enabled and self.mode == "require":
            raise DurabilityError(f"MASKSERVE_DURABLE_ACKS=require, but {self.reason}")
        if not self.enabled:
            log.warning("acks are confirmed before they are fsynced: %s", self.reason)
        return self

    def describe(self) -> dict[str, Any]:
        return {"durable_acks": self.enabled, "durability": self.reason}

    async def run(self, script: AsyncScript, keys: list[Any], args: list[Any], *, durable: bool = True) -> Any:
        """Run ``script``; when ``durable`` and the server can, return only once its writes are fsynced."""
        if durable and not self.probed:
            await self.probe()
        if not (durable and self.enabled):
            return await script(keys=keys, args=args)
        async with self.r.pipeline(transaction=False) as p:
            await script(keys=keys, args=args, client=p)
            p.execute_command("WAITAOF", 1, self.replicas, self.timeout_ms)
            out, waited = await p.execute(raise_on_error=False)
        if isinstance(out, Exception):
            raise out
        if isinstance(waited, ResponseError) and "appendonly" in str(waited).lower():
            self.enabled, self.reason = False, "the server's append-only file was turned off"
            log.warning("acks are confirmed before they are fsynced: %s", self.reason)
            return out
        if isinstance(waited, Exception):
            raise waited
        local, replicas = int(waited[0]), int(waited[1])
        if local < 1 or replicas < self.replicas:
            err = NotDurable(
                f"the write was applied but not confirmed on disk within {self.timeout_ms} ms "
                f"(local fsync {local}, replicas {replicas} of {self.replicas}); retrying the same request is safe"
            )
            err.result = out
            raise err
        return out
