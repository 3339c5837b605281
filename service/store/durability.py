"""Durable confirmations: a write is confirmed only once it is on disk where the server can say so.

Acks and job transitions run as Lua scripts; with ``appendfsync everysec`` a
host crash can lose the last second of them after they were confirmed. On
Redis/Valkey >= 7.2 with the append-only file on, ``WAITAOF`` blocks until
the connection's writes are fsynced locally (and, if asked, on N replicas), so
the script and the wait go over one connection and the answer goes out only
after both. Older servers (no ``WAITAOF``) or servers with the AOF off confirm
as soon as the script ran: the window that remains is the server's own (up to
a second of writes with ``everysec``; see docs/jobs.md, "Durable acks").

Modes (``MASKSERVE_DURABLE_ACKS``): ``auto`` waits where the server supports
it, ``require`` refuses to start where it does not, ``off`` never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MaxConnectionsError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import TryAgainError

from ..core.config import DurableAcks
from ..core.errors import PoolExhausted, StoreUnavailable

log = logging.getLogger("maskserve")

Mode = DurableAcks
_REDIRECTS = 2  # a script answered MOVED or ASK (its slot moved) is sent again this many times
Confirm = Callable[[], Awaitable[None]]


class DurabilityError(StoreUnavailable):
    """Durable acks are required and the server cannot give them: the service refuses to start, or, when
    the server changed under it, answers 503 until it can again."""


class NotDurable(StoreUnavailable):
    """The script ran, but its writes were not confirmed on disk in time (retrying the request is safe)."""


class Durability:
    def __init__(
        self, r: Redis, mode: Mode = "auto", replicas: int = 0, timeout_ms: int = 1000, *, cluster: bool = False
    ) -> None:
        self.r = r
        self.cluster = cluster
        self.mode = mode
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.enabled = False
        self.probed = False
        self.reason = "not probed yet"

    async def probe(self) -> "Durability":
        """Find out whether the server can confirm fsynced writes (called at start-up, and again before the
        first durable write until the server has answered: a probe that could not reach it decided nothing)."""
        if self.mode == "off":
            self.enabled, self.reason, self.probed = False, "disabled by configuration", True
            return self
        try:
            replicas = min(reply[1] for reply in await self._probe_masters())
            self.enabled, self.reason = True, "WAITAOF: confirmed once in the append-only file on disk"
            if self.cluster:
                self.reason += " on the job's master"
            if int(replicas) < self.replicas:
                log.warning("only %s of the %d replicas asked for have the AOF; acks wait for them (503 after %d ms)",
                            replicas, self.replicas, self.timeout_ms)  # fmt: skip
        except ResponseError as exc:
            text = str(exc).lower()
            self.enabled = False
            if "appendonly" in text:
                self.reason = "the server's append-only file is off"
            elif "unknown command" in text:
                self.reason = "the server has no WAITAOF (Redis < 7.2)"
            else:
                self.reason = f"WAITAOF failed: {exc}"
        self.probed = True
        if not self.enabled and self.mode == "require":
            raise DurabilityError(f"MASKSERVE_DURABLE_ACKS=require, but {self.reason}")
        if not self.enabled:
            log.warning("acks are confirmed before they are fsynced: %s", self.reason)
        return self

    async def _probe_masters(self) -> list[Any]:
        """``WAITAOF 1 replicas 1`` on the server, or on every master of a cluster (each job lives on one)."""
        if not self.cluster:
            return [await self.r.execute_command("WAITAOF", 1, self.replicas, 1)]
        replies = await self.r.execute_command("WAITAOF", 1, self.replicas, 1, target_nodes=RedisCluster.PRIMARIES)
        return list(replies.values()) if isinstance(replies, dict) else [replies]

    async def ensure(self) -> None:
        """Probe when nothing is known yet, and, while durability is required but missing, every time (it
        raises :class:`DurabilityError` then): a required fsync is never skipped."""
        if not self.probed or (self.mode == "require" and not self.enabled):
            await self.probe()

    def describe(self) -> dict[str, Any]:
        return {"durable_acks": self.enabled, "durability": self.reason}

    async def run(self, script: AsyncScript, keys: list[Any], args: list[Any], *, durable: bool = True) -> Any:
        """Run ``script``; when ``durable`` and the server can, return only once its writes are fsynced."""
        out, confirm = await self.start(script, keys, args, durable=durable)
        await confirm()
        return out

    async def start(
        self, script: AsyncScript, keys: list[Any], args: list[Any], *, durable: bool = True
    ) -> tuple[Any, Confirm]:
        """Run ``script`` and start waiting for its writes to be fsynced. Returns its result and ``confirm``,
        to await before answering: it returns once the writes are durable (or raises :class:`NotDurable`).
        The wait runs meanwhile, so work done before ``confirm`` (building a batch) hides the fsync."""
        if durable:
            await self.ensure()
        if not (durable and self.enabled):
            return await script(keys=keys, args=args), confirmed
        # Two round trips on one connection (WAITAOF covers the writes of its own connection): one of the
        # pool, or on a cluster one to the master of the script's slot. Not one pipeline: a WAITAOF read
        # together with the write blocks before that write reaches the AOF, and the server then wakes it
        # only at its next cron tick (100 ms at hz 10) rather than at the fsync.
        for attempt in range(_REDIRECTS + 1):
            conn, release = await self._checkout(keys[0])
            try:
                out = await _evalsha(conn, script, keys, args)
                break
            except BaseException as exc:
                await conn.disconnect()  # an answer may be left unread on it
                await release(conn)
                # On a cluster the slot may have moved (a failover, a resharding): MOVED, ASK, TRYAGAIN and
                # CLUSTERDOWN answers mean the script did not run, so it is sent again once the cluster client
                # has learnt the slot's owner; a lost node is relearnt too, but the request fails (the script
                # may have run; the caller's retry is safe).
                redirected = self.cluster and isinstance(exc, (AskError, TryAgainError, ClusterDownError))
                if redirected or (self.cluster and isinstance(exc, (RedisConnectionError, RedisTimeoutError))):
                    await self._relearn(keys[0])
                if not redirected or attempt == _REDIRECTS:
                    raise
        waiting = asyncio.ensure_future(self._wait(conn, release))

        async def confirm() -> None:
            self._check(await waiting)

        return out, confirm

    async def _checkout(self, key: Any) -> tuple[Connection, Callable[[Connection], Awaitable[None]]]:
        """A connection to the node that holds ``key``, and how to give it back."""
        if not self.cluster:
            pool = self.r.connection_pool
            return await pool.get_connection(), pool.release  # checked by the pool (a restart closes them)
        cluster: RedisCluster = self.r  # type: ignore[assignment]
        await cluster.initialize()  # the slot table (a no-op once known)
        node = cluster.get_node_from_key(key)
        try:
            conn = node.acquire_connection()
        except MaxConnectionsError:
            raise PoolExhausted(f"all {node.max_connections} connections to {node.name} are in use") from None
        await node.disconnect_if_needed(conn)

        async def release(c: Connection) -> None:
            node.release(c)

        return conn, release

    async def _relearn(self, key: Any) -> None:
        """Let the cluster client find the current owner of ``key``'s slot (it follows MOVED, and on a
        lost node it reloads the slot table)."""
        try:
            await self.r.exists(key)
        except RedisError as exc:
            log.warning("could not learn the new owner of a job's slot: %s", exc)

    async def _wait(self, conn: Connection, release: Callable[[Connection], Awaitable[None]]) -> Any:
        try:
            await conn.send_command("WAITAOF", 1, self.replicas, self.timeout_ms)
            return await conn.read_response()
        except BaseException as exc:  # judged in _check, by whoever awaits the confirmation
            await conn.disconnect()
            return exc
        finally:
            await release(conn)

    def _check(self, waited: Any) -> None:
        if isinstance(waited, ResponseError) and "appendonly" in str(waited).lower():
            self.enabled, self.reason = False, "the server's append-only file was turned off"
            log.warning("acks are confirmed before they are fsynced: %s", self.reason)
            return
        if isinstance(waited, Exception):
            raise waited
        local, replicas = int(waited[0]), int(waited[1])
        if local < 1 or replicas < self.replicas:
            raise NotDurable(
                f"the write was applied but not confirmed on disk within {self.timeout_ms} ms "
                f"(local fsync {local}, replicas {replicas} of {self.replicas}); retrying the same request is safe"
            )


async def confirmed() -> None:
    return None


async def _evalsha(conn: Connection, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
    """``script`` on this very connection (loading it first if the server does not know it)."""
    try:
        await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await conn.read_response()
    except NoScriptError:
        await conn.send_command("SCRIPT", "LOAD", script.script)
        await conn.read_response()
        await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await conn.read_response()
