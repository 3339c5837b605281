"""Jobs: many workers, one epoch. Config, leases and progress.

A job is a dataset + masking config + batch size + seed + shuffle + epochs.
Epoch e is the (seed, e) permutation of the dataset's first ``n`` sequences
(``n`` is fixed when the job is created), cut into batches; batch i of epoch
e holds ``permute.batch_ids(seed, e, n, B, i, shuffle)`` masked for epoch e
(the determinism rule of docs/masking.md), so a re-delivered batch is
byte-identical. Leases, acks and cursors live in Redis (jobstore.py); this
module holds no state of its own. docs/jobs.md has the contract users rely on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from redis.asyncio import Redis

from ..store.durability import Confirm, Durability, confirmed
from ..store.jobkeys import JobKeys
from ..store.jobstore import ACK, CANCEL_JOB, CREATE_JOB, EVICT, NEXT, RELEASE, UNGRANT
from ..store.lua import NOW_MS
from ..store.store import Store, pairs
from .config import JOB_NAME, EpochBoundary, JobConfig, JobCreate  # noqa: F401 - re-exported
from .mixjobs import decode, mixture_of, source_progress

@dataclass
class Lease:
    epoch: int
    index: int
    lease: str
    expires_ms: int
    redelivered: bool
    instance: str
    in_order: bool = False  # no later request of the worker's stream got a batch first (see jobstore.NEXT)


@dataclass
class NextResult:
    state: str  # lease, wait, done, cancelled, missing
    lease: Lease | None = None
    retry_ms: int = 0
    instance: str = ""  # new for every created job: what cached configs are keyed on
    acks: list[str] | None = None
    confirm: Confirm = confirmed  # await before answering: the acks are durable (see durability.py)


def _state(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """A job hash as typed fields (its secrets left out); None for no job."""
    if not raw:
        return None
    st: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items() if k not in _SECRET_FIELDS}
    for f in ("epoch", "next", "n", "bpe", "epochs", "batch_size", "lease_ms", "attempts", "handed", "acked",
              "acked_sequences", "redelivered", "late_acks", "num_chunks"):  # fmt: skip
        st[f] = int(st[f])
    for f in _RETIRED:
        st[f] = int(st.get(f, 0))
    st["config"] = json.loads(st["config"])
    return st


def _mixture_progress(st: dict[str, Any]) -> dict[str, Any]:
    """A mixture job's ``sources``: each one's epoch and share of the positions handed out so far."""
    cfg = JobConfig(**st["config"])
    states = decode(st["mixture"])
    served = st["n"] if st["epoch"] >= 1 else min(st["next"] * st["batch_size"], st["n"])
    return {"sources": source_progress(cfg, mixture_of(cfg, tuple(s.n for s in states)), states, served)}


def _conflicts(requested: JobConfig, dataset: str, stored: str) -> list[dict[str, Any]]:
    try:
        existing = JobConfig.model_validate_json(stored)
    except ValueError:  # not readable as a config of this release: at least the dataset can be compared
        return [{"field": "dataset", "job": dataset, "requested": requested.dataset}] \
            if dataset != requested.dataset else []  # fmt: skip
    return existing.differences(requested)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_SECRET_FIELDS = (b"mac_in", b"mac_out")
# KEYS[1]: the job hash (so the call goes to the job's node); returns TIME
_JOB_CLOCK = NOW_MS + "return now"
_PROGRESS_PER_PIPELINE = 512  # jobs whose progress one pipeline reads (GET /v1/jobs reads them all)
#: a worker's counters in progress before any is read
_WORKER_COUNTERS = {"handed": 0, "acked": 0, "acked_sequences": 0, "redelivered": 0}
_RETIRED = ("retired_workers", "retired_handed", "retired_acked", "retired_acked_sequences", "retired_redelivered")


def lease_keys(secret: bytes) -> dict[str, bytes]:
    """HMAC-SHA1's padded inner and outer keys for ``secret``: the job's lease-signing key, as the scripts use it."""
    key = secret if len(secret) <= 64 else hashlib.sha1(secret).digest()
    key = key.ljust(64, b"\0")
    return {"mac_in": bytes(b ^ 0x36 for b in key), "mac_out": bytes(b ^ 0x5C for b in key)}


def lease_tag(secret: bytes, base: str, worker: str) -> str:
    """The tag the scripts put at the end of lease id ``base:tag`` issued to ``worker`` (for tests and tools)."""
    def mac(msg: str) -> str:
        return hmac.new(secret, msg.encode(), hashlib.sha1).hexdigest()[:16]

    return mac(base) + mac(f"{base}:{worker}")


def parse_next(out: list[Any]) -> NextResult:
    state = _s(out[0])
    if state == "lease":
        lease = Lease(int(out[1]), int(out[2]), _s(out[3]), int(out[4]), bool(int(out[5])), _s(out[6]),
                      bool(int(out[7])))  # fmt: skip
        return NextResult(state, lease=lease, instance=lease.instance, acks=[_s(a) for a in out[8:]])
    if state == "missing":
        return NextResult(state)
    return NextResult(state, retry_ms=int(out[1]), instance=_s(out[2]), acks=[_s(a) for a in out[3:]])


class Jobs:
    """Async access to job state; every transition is one Lua script."""

    def __init__(
        self, r: Redis, prefix: str, durability: Durability | None = None, *, worker_idle_s: float = 3600,
        max_workers: int = 1024, store: Store | None = None, input_bound_share: float = 0.1,
        straggler_ratio: float = 0.5,
    ) -> None:  # fmt: skip
        self.r = r
        self.keys = JobKeys(prefix)
        self.store = store or Store(r, prefix)  # the job lists in the datasets' slots
        self.durability = durability or Durability(r, "off")
        self.worker_idle_ms = int(worker_idle_s * 1000)
        self.max_workers = max_workers
        self.input_bound_share = input_bound_share
        self.straggler_ratio = straggler_ratio
        self._next = r.register_script(NEXT)
        self._ack = r.register_script(ACK)
        self._release = r.register_script(RELEASE)
        self._ungrant = r.register_script(UNGRANT)
        self._evict = r.register_script(EVICT)
        self._create = r.register_script(CREATE_JOB)
        self._cancel = r.register_script(CANCEL_JOB)
        self._datasets: dict[str, str] = {}  # job -> dataset, immutable while the job exists

    async def dataset_of(self, job: str, *, fresh: bool = False) -> str | None:
        if fresh or job not in self._datasets:
            ds = await self.r.hget(self.keys.job(job), "dataset")
            if ds is None:
                self._datasets.pop(job, None)
                return None
            self._datasets[job] = ds.decode()
        return self._datasets[job]

    async def create(
        self, name: str, cfg: JobConfig, dataset_uid: str, n: int, bpe: int, num_chunks: int,
        sources: list[tuple[str, str]] | None = None, mixture: str | None = None,
    ) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
        """Create job ``name``: returns ('created' | 'exists' | 'no-dataset', []) or ('conflict', the fields
        where the existing job's config differs from ``cfg``, each with both values). A mixture job passes its
        ``sources`` (dataset, uid) and their state (``mixture``), and is one epoch of ``n`` positions."""
        k = self.keys
        fields = {
            "name": name, "config": cfg.model_dump_json(), "config_hash": cfg.digest(), "dataset": cfg.dataset,
            "dataset_uid": dataset_uid, "status": "active", "epoch": 0, "next": 0, "n": n, "bpe": bpe,
            "epochs": -1 if cfg.epochs is None else cfg.epochs, "batch_size": cfg.batch_size,
            "lease_ms": int(cfg.lease_timeout_s * 1000), "boundary": cfg.epoch_boundary, "attempts": 0,
            "handed": 0, "acked": 0, "acked_sequences": 0, "redelivered": 0, "late_acks": 0,
            "num_chunks": num_chunks, "created_at": time.time(), "instance": secrets.token_hex(8),
            **lease_keys(secrets.token_bytes(32)),
        }  # fmt: skip
        if mixture is not None:
            fields.update(epochs=1, mixture=mixture)
        # the job in its slot, then listed with its dataset (which checks that the dataset still exists):
        # a dataset deleted meanwhile either lists the job in its trash, or refuses it and it is deleted again
        out = await self.durability.run(
            self._create, keys=[k.job(name)], args=[cfg.dataset, cfg.digest(), *pairs(fields)]
        )
        state = _s(out[0])
        if state == "conflict":
            return state, _conflicts(cfg, _s(out[1]), _s(out[2]))
        for dataset, uid in sources or [(cfg.dataset, dataset_uid)]:  # listed with each (a delete of any ends it)
            if not await self.store.add_job(dataset, uid, name):
                if state == "created":
                    await self.store.delete_job(name, dataset_uid)
                return "no-dataset", []
        return state, []

    async def state(self, dataset: str, job: str) -> dict[str, Any] | None:
        return _state(await self.r.hgetall(self.keys.job(job)))

    async def progress(self, dataset: str, job: str) -> dict[str, Any] | None:
        return (await self.progress_many([(dataset, job)]))[0]

    async def progress_all(self) -> list[dict[str, Any]]:
        """Every job's progress, by name (the jobs listed with each dataset)."""
        by_dataset = await self.store.job_names(await self.store.list_names())
        listed = sorted(((ds, job) for ds, names in by_dataset.items() for job in names), key=lambda pair: pair[1])
        return [p for p in await self.progress_many(listed) if p is not None]

    async def progress_many(self, jobs: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
        """The progress of each (dataset, job) (None: no such job of that dataset), read in one pipeline per
        ``_PROGRESS_PER_PIPELINE`` jobs: one round trip per node, not one per job."""
        out: list[dict[str, Any] | None] = []
        for start in range(0, len(jobs), _PROGRESS_PER_PIPELINE):
            part = jobs[start : start + _PROGRESS_PER_PIPELINE]
            async with self.r.pipeline(transaction=False) as p:
                for _, job in part:
                    base = self.keys.lease_keys(job)
                    p.hgetall(self.keys.job(job))
                    p.zcard(base[1])
                    p.hgetall(base[4])
                    p.hgetall(base[3])
                    p.eval(_JOB_CLOCK, 1, base[0])  # the job's node's clock (a cluster pipeline has no keyless TIME)
                    p.hgetall(self.keys.stats(job))
                replies = await p.execute()
            for i, (dataset, job) in enumerate(part):
                raw, leased, ackcount, workers, now_ms, wstats = replies[6 * i : 6 * i + 6]
                st = _state(raw)
                mine = st is not None and st["dataset"] == dataset  # not a job of the same name of another dataset
                progress = self._progress(dataset, job, st, leased, ackcount, workers, now_ms) if mine else None
                if progress is not None:
                    self._flag(progress, wstats)
                if progress is not None and "mixture" in st:  # (a mixture may take a while to build once)
                    progress.update(await anyio.to_thread.run_sync(_mixture_progress, st))
                out.append(progress)
        return out

    def _progress(
        self, dataset: str, job: str, st: dict[str, Any], leased: int, ackcount: dict, workers: dict, now_ms: int
    ) -> dict[str, Any]:  # fmt: skip
        per_worker: dict[str, dict[str, float]] = {}
        for key, value in workers.items():
            worker, _, counter = _s(key).rpartition(":")
            counters = per_worker.setdefault(worker, dict(_WORKER_COUNTERS))
            counters[counter] = int(value)
        for w in per_worker.values():
            span = max(1, w.get("last", now_ms) - w.get("first", now_ms)) / 1000
            w["sequences_per_s"] = w.get("acked_sequences", 0) / span if w.get("acked", 0) > 1 else 0.0
        created = float(st["created_at"])
        return {
            "name": job, "dataset": dataset, "status": st["status"], "config": st["config"],
            "epoch": st["epoch"], "epochs": None if st["epochs"] < 0 else st["epochs"],
            "batches_per_epoch": st["bpe"], "sequences_per_epoch": st["n"] if not st["config"]["drop_last"]
            else st["bpe"] * st["batch_size"], "next_batch": st["next"],
            "handed_out": st["handed"], "acked": st["acked"], "leased": int(leased),
            "redelivered": st["redelivered"], "late_acks": st["late_acks"],
            "acked_per_epoch": {_s(e): int(c) for e, c in sorted(ackcount.items(), key=lambda kv: int(kv[0]))},
            "sequences_per_s": st["acked_sequences"] / max(1e-3, time.time() - created),
            "workers": per_worker, "created_at": created,
            "retired_workers": {f.removeprefix("retired_"): st[f] for f in _RETIRED},
            **self.durability.describe(),
        }  # fmt: skip

    async def report(self, job: str, worker: str, batches: int, wait_s: float, step_s: float, leases: int = 0,
                     lease_s: float = 0.0) -> None:  # fmt: skip
        """Keep ``worker``'s latest summary of its consumer: over its last ``batches`` batches, ``wait_s`` seconds
        waiting for data and ``step_s`` seconds between batches (its training steps); and ``leases`` lease
        requests answered with a batch, ``lease_s`` seconds in all. The key expires once every worker of the job
        has been idle for MASKSERVE_JOB_WORKER_IDLE_S."""
        key = self.keys.stats(job)
        async with self.r.pipeline(transaction=False) as p:
            p.hset(key, worker, f"{int(time.time() * 1000)}|{batches}|{wait_s:.6f}|{step_s:.6f}|{leases}|{lease_s:.6f}")
            p.pexpire(key, self.worker_idle_ms)
            await p.execute()

    def _flag(self, progress: dict[str, Any], wstats: dict) -> None:
        """Add each reporting worker's data-wait share and flags to ``progress``: input-bound (waits more than
        ``input_bound_share`` of its time) and straggler (its batches/s under ``straggler_ratio`` of the median of
        two or more reporting workers). Summaries older than the idle limit are left out."""
        fresh = time.time() * 1000 - self.worker_idle_ms
        rates: dict[str, float] = {}
        for raw_worker, raw in wstats.items():
            worker = _s(raw_worker)
            try:
                at, batches, wait, step, *lease = _s(raw).split("|")  # (leases, their seconds): may be absent
                at_ms, n, w, t = int(at), int(batches), float(wait), float(step)
                leases, lease_s = (int(lease[0]), float(lease[1])) if len(lease) == 2 else (0, 0.0)
            except ValueError:
                continue
            if at_ms < fresh or n <= 0:
                continue
            entry = progress["workers"].setdefault(worker, {**_WORKER_COUNTERS, "sequences_per_s": 0.0})
            total = w + t
            share = w / total if total > 0 else 0.0
            entry.update(reported_batches=n, data_wait_s=w / n, step_s=t / n, data_wait_share=share,
                         input_bound=share > self.input_bound_share, straggler=False)  # fmt: skip
            if leases > 0:
                entry["lease_rtt_s"] = lease_s / leases
            if total > 0:
                rates[worker] = entry["reported_batches_per_s"] = n / total
        if len(rates) >= 2:
            median = statistics.median(rates.values())
            for worker, rate in rates.items():
                progress["workers"][worker]["straggler"] = rate < self.straggler_ratio * median
        flagged = [(w, e) for w, e in sorted(progress["workers"].items()) if "data_wait_share" in e]
        progress["input_bound_workers"] = [w for w, e in flagged if e["input_bound"]]
        progress["stragglers"] = [w for w, e in flagged if e["straggler"]]

    async def next(
        self, dataset: str, job: str, worker: str, acks: list[str], request: str = "", seq: int = 0
    ) -> NextResult:
        """Ack ``acks``, then lease the next batch; ``request`` (a client-chosen id) makes a retry return
        the lease the first attempt got; ``seq`` numbers the worker's requests (see ``Lease.in_order``).
        ``confirm()`` on the result returns once the acks are durable."""
        out, confirm = await self.durability.start(
            self._next, keys=self.keys.with_acks(job, acks),
            args=[worker, request, self.worker_idle_ms, self.max_workers, seq, *acks], durable=bool(acks),
        )  # fmt: skip
        res = parse_next(out)
        res.confirm = confirm
        return res

    async def ungrant(self, dataset: str, job: str, worker: str, lease: Lease) -> bool:
        """Take back a lease whose batch never reached the worker (its request failed)."""
        out = await self._ungrant(keys=self.keys.lease_keys(job),
                                  args=[worker, lease.lease, int(lease.redelivered)])  # fmt: skip
        return bool(out)

    async def ack(self, dataset: str, job: str, worker: str, leases: list[str]) -> list[str] | None:
        """Ack results per lease; None when there is no such job (on that dataset)."""
        out = await self.durability.run(self._ack, keys=self.keys.with_acks(job, leases), args=[worker, *leases])
        if out and _s(out[0]) == "missing":
            return None
        return [_s(a) for a in out]

    async def release(self, dataset: str, job: str, worker: str, leases: list[str]) -> int | None:
        n = int(await self._release(keys=self.keys.lease_keys(job), args=[worker, *leases]))
        return None if n < 0 else n

    async def evict(self, dataset: str, job: str, worker: str) -> int | None:
        n = int(await self._evict(keys=self.keys.lease_keys(job), args=[worker]))
        return None if n < 0 else n

    async def cancel(self, dataset: str, job: str) -> bool | None:
        n = int(await self.durability.run(self._cancel, keys=[self.keys.job(job)], args=[]))
        return None if n < 0 else bool(n)

    def forget(self, job: str | None = None, dataset: str | None = None) -> None:
        """Drop cached lookups of a job, or of every job of a dataset."""
        for name in [j for j, d in self._datasets.items() if j == job or d == dataset]:
            self._datasets.pop(name, None)

    def knows(self, job: str) -> bool:
        """Whether this process holds a lookup of ``job`` (dropped by ``forget``)."""
        return job in self._datasets

    async def delete(self, dataset: str, job: str) -> int:
        removed = await self.store.delete_job(job)
        await self.store.unlist_job(dataset, job)  # after: a listed name without a job is skipped
        self.forget(job)
        return removed
