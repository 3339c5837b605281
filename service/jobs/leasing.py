"""Leasing a job's batches: one call per lease request grants a lease, builds its batch, hands it over and,
when the hand-over fails, takes the lease back.

The route calls :meth:`Leasing.lease` once; what is HTTP (the body's admission, the rendering, the
headers) it passes in as two callbacks. Everything else is here: finding the job (again, when it was
deleted or re-created on another dataset), the job's parsed config (once per process and job instance),
the batch's step (``epoch * batches_per_epoch + index``), the job's own generation of its dataset, and the
rule that a lease whose batch never reached the worker is taken back at once, not at its expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..batches.batching import DatasetSnapshot, prepare_batch, prepare_parts
from ..batches.permute import batch_ids
from ..core.errors import Conflict, DatasetNotFound, JobDatasetGone, JobFinished, JobNotFound
from ..core.work import Workload
from ..data.catalog import Catalog, DatasetRuntime
from ..masking.masking import Masked, MaskSpec
from .config import JobConfig
from .jobs import Jobs, Lease, NextResult
from .mixjobs import SourceState, decode, draws, mixture_of
from .mixture import Mixture

log = logging.getLogger("maskserve")

T = TypeVar("T")


@dataclass(frozen=True)
class Granted:
    """A granted lease and its batch, built up to its masking (``compute``: the CPU work that masks it)."""

    job: str
    dataset: str
    lease: Lease
    config: JobConfig
    rt: DatasetRuntime
    seq_ids: np.ndarray
    compute: Callable[[], Masked]
    acks: list[str]
    sources: np.ndarray | None = None  # a mixture's batch: each row's source (an index into ``source_names``)
    source_names: list[str] | None = None


@dataclass(frozen=True)
class Waiting:
    """Nothing to hand out now: ask again after ``retry_ms``."""

    retry_ms: int
    acks: list[str]


class Leasing:
    """Grant, serve, take back, ack: the lease requests of every job, for one process."""

    def __init__(self, jobs: Jobs, catalog: Catalog, work: Workload) -> None:
        self.jobs = jobs
        self.catalog = catalog
        self.work = work
        # job -> (instance id, (config, its masking spec at the start, the job's state)): parsed once per
        # process and job instance (a re-created job gets a new instance id)
        self._configs: dict[str, tuple[str, tuple[JobConfig, MaskSpec, dict[str, Any]]]] = {}
        # a mixture job's instance id -> its sources as the job fixed them, their sizes, its mixture
        self._mixtures: dict[str, tuple[list[SourceState], tuple[int, ...], Mixture]] = {}

    async def lease(
        self, name: str, worker: str, acks: list[str], request_id: str, seq: int, *,
        hold: Callable[[JobConfig, DatasetRuntime], None], hand_over: Callable[[Granted], Awaitable[T]],
    ) -> T | Waiting:  # fmt: skip
        """Ack ``acks`` and lease the job's next batch for ``worker``. ``hold(config, rt)`` runs before the
        batch is read (to count its body against the process's limits); ``hand_over(granted)`` turns the
        built batch into the answer. The acks are durable before this returns. A finished or cancelled job
        raises ``JobFinished``; a lease whose batch was not handed over (any error, a cancellation) is
        taken back before the error goes on."""
        dataset, res = await self._next(name, worker, acks, request_id, seq)
        try:
            if res.state in ("done", "cancelled"):
                await res.confirm()
                raise JobFinished(f"job {name!r} is {res.state}", job=name, job_status=res.state, acks=res.acks or [])
            if res.state == "wait":
                await res.confirm()
                return Waiting(res.retry_ms, res.acks or [])
            out = await hand_over(await self._build(name, dataset, res, hold))
            await res.confirm()  # the acks this request carried are durable (the wait ran while the batch was built)
            return out
        except BaseException:  # the batch never reached the worker: take the lease back, hand it out next
            if res.lease is not None:
                await self._take_back(dataset, name, worker, res.lease)
            raise

    async def ack(self, name: str, worker: str, leases: list[str]) -> list[str]:
        """Ack ``leases`` (idempotent); returns the result of each, in order (see ``Jobs.ack``)."""
        return await self.on_job(name, lambda ds: self.jobs.ack(ds, name, worker, leases))

    async def release(self, name: str, worker: str, leases: list[str]) -> int:
        """Give back unacked leases for immediate redelivery; returns how many went back."""
        return await self.on_job(name, lambda ds: self.jobs.release(ds, name, worker, leases))

    async def evict(self, name: str, worker: str) -> int:
        """A worker known to be gone: hand its live leases out again at once; returns how many."""
        return await self.on_job(name, lambda ds: self.jobs.evict(ds, name, worker))

    async def on_job(self, name: str, op: Callable[[str], Awaitable[T | None]]) -> T:
        """``op(dataset)``; when the job is not where this process thought (``op`` answers None: deleted, or
        re-created on another dataset), look it up again once."""
        for fresh in (False, True):
            dataset = await self.jobs.dataset_of(name, fresh=fresh)
            if dataset is None:
                break
            out = await op(dataset)
            if out is not None:
                return out
        raise JobNotFound(f"no job named {name!r}", job=name)

    async def _next(self, name: str, worker: str, acks: list[str], request_id: str, seq: int) -> tuple[str, NextResult]:
        """The job's dataset and its answer to the lease request (see ``on_job``)."""
        async def next_on(dataset: str) -> tuple[str, NextResult] | None:
            res = await self.jobs.next(dataset, name, worker, acks, request_id, seq)
            return None if res.state == "missing" else (dataset, res)

        return await self.on_job(name, next_on)

    async def _build(
        self, name: str, dataset: str, res: NextResult, hold: Callable[[JobConfig, DatasetRuntime], None]
    ) -> Granted:
        lease = res.lease
        assert lease is not None
        cfg, spec, st = await self._config(dataset, name, res.instance)
        if cfg.mixture:
            return await self._build_mixture(name, dataset, res, hold, cfg, spec, st)
        try:  # the job's own generation of the dataset, never another of the same name
            rt = await self.catalog.runtime(dataset, st["dataset_uid"])
            rt = await self.catalog.with_chunks(rt, st["num_chunks"])
            ds = DatasetSnapshot(rt, st["n"], st["num_chunks"])
            hold(cfg, rt)
            seq_ids = await self.work.run(batch_ids, cfg.seed, lease.epoch, st["n"], cfg.batch_size, lease.index,
                                          cfg.shuffle, tokens=cfg.batch_size)  # fmt: skip  # O(B) work
            step = lease.epoch * st["bpe"] + lease.index  # bpe: the job's batches per epoch
            compute = await prepare_batch(self.catalog, ds, seq_ids, seed=cfg.masks_seed, epoch=lease.epoch,
                                          params=cfg.masking, spec=spec, step=step)  # fmt: skip
        except (Conflict, DatasetNotFound):
            if not await self.catalog.holds(dataset, st["dataset_uid"]):
                raise JobDatasetGone(
                    f"job {name!r} reads a generation of dataset {dataset!r} that was deleted (the name may hold a "
                    "new one): delete the job, and create it again to read the dataset as it is now", job=name,
                    dataset=dataset,
                ) from None  # fmt: skip
            raise
        return Granted(name, dataset, lease, cfg, rt, seq_ids, compute, res.acks or [])

    async def _build_mixture(
        self, name: str, dataset: str, res: NextResult, hold: Callable[[JobConfig, DatasetRuntime], None],
        cfg: JobConfig, spec: MaskSpec, st: dict[str, Any],
    ) -> Granted:  # fmt: skip
        """A mixture job's batch: its positions resolved to (source, source epoch, sequence), each source epoch's
        rows read and masked as a one-dataset job of that source would, joined in position order."""
        lease = res.lease
        assert lease is not None
        start = lease.index * cfg.batch_size
        stop = min(start + cfg.batch_size, st["n"])
        known = self._mixtures.get(res.instance)
        if known is None:  # once per process and job (a long curriculum takes a while to lay out: off the loop)
            states = decode(st["mixture"])
            sizes = tuple(s.n for s in states)
            known = (states, sizes, await self.work.run(lambda: mixture_of(cfg, sizes), tokens=cfg.batch_size * 8))
            live = {instance for instance, _ in self._configs.values()}
            for gone in [i for i in self._mixtures if i not in live]:
                del self._mixtures[gone]
            self._mixtures[res.instance] = known
        states, sizes, mixture = known
        d = draws(cfg, mixture, sizes, start, stop)  # a few numpy calls over B rows: less than a hop to a thread
        groups = d.groups
        try:
            snaps = {}
            for source in dict.fromkeys(g[0] for g in groups):  # each source's runtime at the job's generation
                src = states[source]
                rt = await self.catalog.runtime(src.dataset, src.uid)
                snaps[source] = DatasetSnapshot(await self.catalog.with_chunks(rt, src.num_chunks), src.n,
                                                src.num_chunks)  # fmt: skip
            first_rt = snaps[groups[0][0]].rt
            hold(cfg, first_rt)
            compute = await prepare_parts(
                self.catalog, [(snaps[source], rows, d.seq_ids[rows], epoch) for source, epoch, rows in groups],
                len(d.seq_ids), seed=cfg.masks_seed, params=cfg.masking, spec=spec, step=lease.index)  # fmt: skip
        except (Conflict, DatasetNotFound):
            for src in states:
                if not await self.catalog.holds(src.dataset, src.uid):
                    raise JobDatasetGone(
                        f"job {name!r} reads a generation of dataset {src.dataset!r} that was deleted (the name may "
                        "hold a new one): delete the job, and create it again to read the dataset as it is now",
                        job=name, dataset=src.dataset,
                    ) from None  # fmt: skip
            raise
        names = [s.dataset for s in states]
        return Granted(name, dataset, lease, cfg, first_rt, d.seq_ids, compute, res.acks or [], d.source, names)

    async def _config(self, dataset: str, name: str, instance: str) -> tuple[JobConfig, MaskSpec, dict[str, Any]]:
        """The job's config, parsed once per process, keyed by the job's instance id (new for every created job)."""
        cached = self._configs.get(name)
        if cached is None or cached[0] != instance:
            st = await self.jobs.state(dataset, name)
            if st is None:
                raise JobNotFound(f"no job named {name!r}", job=name)
            cfg = JobConfig(**st["config"])
            cached = (st["instance"], (cfg, cfg.masking.spec(), st))
            for gone in [n for n in self._configs if not self.jobs.knows(n)]:  # deleted jobs, and those of
                del self._configs[gone]  # deleted datasets (see Jobs.forget)
            self._configs[name] = cached
        return cached[1]

    async def _take_back(self, dataset: str, name: str, worker: str, lease: Lease) -> None:
        try:
            await self.jobs.ungrant(dataset, name, worker, lease)
        except Exception:  # noqa: BLE001 - Redis gone too: the lease expires by itself
            log.warning("could not take back lease %s of job %r; it is handed out again when it expires",
                        lease.lease, name)  # fmt: skip
