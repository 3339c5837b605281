"""Jobs: create/attach, progress, lease the next batch, ack, release, cancel, delete."""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from wire import CONTENT_TYPE

from ...batches.batching import Fetched, fetched, open_dataset, served
from ...batches.bodies import Pieces, hold_body
from ..deps import CatalogDep, SettingsDep, parse_query, query_docs
from ...core.errors import (Conflict, DatasetNotFound, InvalidRequest, JobConflict, JobDatasetGone, JobFinished, JobNotFound,
                      LimitExceeded, StaticMasksMissing)
from ...jobs.jobs import JobConfig, JobCreate, Jobs, Lease, NextResult
from ...masking.masking import MaskSpec
from ...masking.static import cache_id
from ...batches.permute import batch_ids
from ...masking.params import MaskingParams
from ...batches.params import OutputParams
from .batches import wants_json

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("maskserve")

WORKER = r"^[A-Za-z0-9._:@/-]{1,128}$"
REQUEST_ID = r"^[A-Za-z0-9_-]{1,64}$"


async def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]


class Leases(BaseModel):
    worker: str = Field(default="anonymous", pattern=WORKER, description="The worker the leases were issued to.")
    leases: list[str] = Field(max_length=4096, description="Lease ids, as `Maskserve-Lease` gave them.")


async def _dataset(jobs: Jobs, name: str, *, fresh: bool = False) -> str:
    ds = await jobs.dataset_of(name, fresh=fresh)
    if ds is None:
        raise JobNotFound(f"no job named {name!r}", job=name)
    return ds


@router.post("", status_code=201, summary="Create a job, or attach to an existing one with the same config")
async def create_job(
    body: JobCreate, jobs: JobsDep, catalog: CatalogDep, settings: SettingsDep, response: Response
) -> dict[str, Any]:
    cfg = JobConfig(**body.model_dump(exclude={"name"}))
    cfg.masking.spec()  # validate the masking config now, not at the first batch
    if cfg.batch_size > settings.max_batch_size:
        raise LimitExceeded(
            f"batch_size {cfg.batch_size} exceeds the limit of {settings.max_batch_size}", limit=settings.max_batch_size
        )
    ds = await open_dataset(catalog, cfg.dataset)
    n = ds.num_sequences
    if cfg.masking.mode == "static":
        await _check_static_cache(catalog, cfg, ds.num_chunks)
    bpe = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
    if bpe == 0:
        raise InvalidRequest(f"batch_size {cfg.batch_size} with drop_last leaves no batch of {n} sequences")
    state, conflicts = await jobs.create(body.name, cfg, ds.rt.uid, n, bpe, ds.num_chunks)
    if state == "no-dataset":
        raise JobConflict(f"dataset {cfg.dataset!r} changed while the job was created; retry", job=body.name,
                          conflicts=[])  # fmt: skip
    if state == "conflict":
        differ = ", ".join(f"{c['field']} {c['job']} (requested {c['requested']})" for c in conflicts)
        raise JobConflict(
            f"a job named {body.name!r} exists with a different config{': ' + differ if differ else ''}; "
            "attach with its config, use another name or delete it", job=body.name, conflicts=conflicts,
        )  # fmt: skip
    if state == "exists":
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{body.name}"
    return await _progress(jobs, body.name)


async def _check_static_cache(catalog: Any, cfg: JobConfig, num_chunks: int) -> None:
    """A static job serves from a cache built beforehand: refuse to create one whose cache is not complete."""
    m = cfg.masking
    cache = cache_id(m.spec(), cfg.masks_seed, m.copies)
    meta = await catalog.store.mask_cache(cfg.dataset, cache)
    if meta is None or int(meta["built"]) < num_chunks:
        built = 0 if meta is None else int(meta["built"])
        raise StaticMasksMissing(
            f"static masks (cache {cache}) of dataset {cfg.dataset!r} cover {built} of {num_chunks} chunks: "
            f"build them first (POST /v1/datasets/{cfg.dataset}/static-masks with the job's masking config, "
            f"seed {cfg.masks_seed} and copies {m.copies})", dataset=cfg.dataset, cache=cache,
        )  # fmt: skip


async def _progress(jobs: Jobs, name: str) -> dict[str, Any]:
    out = await jobs.progress(await _dataset(jobs, name), name)
    if out is None:
        out = await jobs.progress(await _dataset(jobs, name, fresh=True), name)
    if out is None:
        raise JobNotFound(f"no job named {name!r}", job=name)
    return out


@router.get("", summary="All jobs with their progress")
async def list_jobs(jobs: JobsDep) -> dict[str, list[dict[str, Any]]]:
    by_dataset = await jobs.store.job_names(await jobs.store.list_names())
    listed = sorted(((ds, job) for ds, names in by_dataset.items() for job in names), key=lambda pair: pair[1])
    return {"jobs": [p for p in await jobs.progress_many(listed) if p is not None]}


@router.get("/{name}", summary="A job's progress: epoch, batches handed out, acked, leased, per worker")
async def get_job(name: str, jobs: JobsDep) -> dict[str, Any]:
    return await _progress(jobs, name)


class NextQuery(OutputParams):
    worker: str = Field(default="anonymous", pattern=WORKER, description="Who asks (for per-worker progress).")
    ack: list[str] = Field(
        default_factory=list, max_length=1024,
        description="Leases finished since the last call, the older form: a long list outgrows the request line "
        "a proxy or server accepts (nginx: about 8 KiB, some 100 ids), so send them in the body.",
    )  # fmt: skip
    request: str | None = Field(
        default=None, pattern=REQUEST_ID,
        description="A client-chosen id of this lease request: a retry with the same id (after a lost answer) "
        "gets the lease the first attempt was granted, not a second one.",
    )  # fmt: skip
    seq: int = Field(
        default=0, ge=0, le=1 << 52,
        description="This request's number in the worker's stream, increasing (e.g. microseconds since the epoch). "
        "The answer's `Maskserve-In-Order: 1` then says no later-numbered request of the worker was granted "
        "a batch first, so the client can keep its batches in order without waiting on later requests.",
    )  # fmt: skip
    format: str | None = Field(default=None, pattern="^(safetensors|json)$")


class NextAcks(BaseModel):
    """The optional body of a lease request."""

    acks: list[str] = Field(
        default_factory=list, max_length=4096,
        description="Leases finished since the last call (with any `ack` of the query, at most MASKSERVE_MAX_ACKS).",
    )  # fmt: skip


_NEXT_BODY = {"required": False, "content": {"application/json": {"schema": NextAcks.model_json_schema()}}}


@router.post(
    "/{name}/next",
    summary="Lease the job's next batch (acking finished ones in the same call)",
    responses={200: {"content": {CONTENT_TYPE: {}, "application/json": {}}}, 204: {"description": "Nothing to hand out now; retry"}},
    openapi_extra={**query_docs(NextQuery), "requestBody": _NEXT_BODY},
)
async def next_batch(name: str, request: Request) -> Response:
    q = parse_query(NextQuery, request)
    jobs: Jobs = request.app.state.jobs  # no dependencies on the hot path (see deps.parse_query)
    acks = _check_count(q.ack + await _body_acks(request), request.app.state.settings.max_acks)
    as_json = wants_json(request, q.format)
    dataset = await _dataset(jobs, name)
    res = await jobs.next(dataset, name, q.worker, acks, q.request or "", q.seq)
    if res.state == "missing":  # deleted, or re-created on another dataset
        dataset = await _dataset(jobs, name, fresh=True)
        res = await jobs.next(dataset, name, q.worker, acks, q.request or "", q.seq)
        if res.state == "missing":
            raise JobNotFound(f"no job named {name!r}", job=name)
    ack_header = {"Maskserve-Acks": ",".join(res.acks or [])}
    try:
        if res.state in ("done", "cancelled"):
            await res.confirm()
            raise JobFinished(f"job {name!r} is {res.state}", job=name, job_status=res.state, acks=res.acks or [])
        if res.state == "wait":
            await res.confirm()
            return Response(status_code=204, headers={
                **ack_header, "Retry-After": str(max(1, math.ceil(res.retry_ms / 1000))),
                "Maskserve-Retry-After-Ms": str(res.retry_ms)})  # fmt: skip
        response = await _serve(request, q, name, dataset, res, as_json, ack_header)
        await res.confirm()  # the acks this request carried are durable (the wait ran while the batch was built)
        return response
    except BaseException:  # the batch never reached the worker: take the lease back, hand it out next
        if res.lease is not None:
            await _take_back(jobs, dataset, name, q.worker, res.lease)
        raise


async def _body_acks(request: Request) -> list[str]:
    """The acks in a lease request's JSON body (none without a body). The gatekeeper bounds its bytes as they
    arrive; the route, its acks and the query's together."""
    raw = await request.body()
    acks: list[str] = []
    if raw.strip():
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"the body of a lease request is JSON ({{\"acks\": [...]}}): {exc}") from None
        try:
            acks = NextAcks.model_validate(data).acks
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None
    return acks


def _check_count(leases: list[str], limit: int) -> list[str]:
    """``leases``, unless there are more than MASKSERVE_MAX_ACKS of them (one request, one script call)."""
    if len(leases) > limit:
        raise LimitExceeded(f"{len(leases)} leases in one request exceed the limit of {limit}: send them over several",
                            limit=limit)  # fmt: skip
    return leases


async def _take_back(jobs: Jobs, dataset: str, name: str, worker: str, lease: Lease) -> None:
    try:
        await jobs.ungrant(dataset, name, worker, lease)
    except Exception:  # noqa: BLE001 - Redis gone too: the lease expires by itself
        log.warning("could not take back lease %s of job %r; it is handed out again when it expires", lease.lease, name)


async def _serve(
    request: Request, q: "NextQuery", name: str, dataset: str, res: NextResult, as_json: bool,
    ack_header: dict[str, str],
) -> Response:  # fmt: skip
    state = request.app.state
    jobs, catalog, metrics = state.jobs, state.catalog, state.metrics
    lease = res.lease
    assert lease is not None
    cfg, spec, st = await _config(jobs, dataset, name, res.instance)
    params: MaskingParams = cfg.masking
    try:  # the job's own generation of the dataset, never another of the same name
        rt = await catalog.with_chunks(await catalog.runtime(dataset, st["dataset_uid"]), st["num_chunks"])
        ds = Fetched(rt, st["n"], st["num_chunks"])
        hold_body(request, cfg.batch_size, rt, q, as_json)
        seq_ids = await state.work.run(batch_ids, cfg.seed, lease.epoch, st["n"], cfg.batch_size, lease.index,
                                       cfg.shuffle, tokens=cfg.batch_size * rt.seq_len)  # fmt: skip
        compute = await fetched(catalog, ds, seq_ids, seed=cfg.masks_seed, epoch=lease.epoch, params=params,
                                spec=spec, step=lease.epoch * st["bpe"] + lease.index)  # fmt: skip
    except (Conflict, DatasetNotFound):
        if not await catalog.holds(dataset, st["dataset_uid"]):
            raise JobDatasetGone(
                f"job {name!r} reads a generation of dataset {dataset!r} that was deleted (the name may hold a new "
                "one): delete the job, and create it again to read the dataset as it is now", job=name, dataset=dataset,
            ) from None  # fmt: skip
        raise
    meta = {"job": name, "dataset": dataset, "epoch": lease.epoch, "index": lease.index, "lease": lease.lease,
            "seed": cfg.seed, "pad_id": rt.vocab.pad_id}  # fmt: skip
    body = await served(state.work, compute, seq_ids, q, rt, meta, as_json, state.settings.response_piece_bytes)
    metrics.sequences_served.labels(dataset).inc(len(seq_ids))
    headers = {
        **ack_header,
        "Maskserve-Job": name,
        "Maskserve-Dataset": dataset,
        "Maskserve-Epoch": str(lease.epoch),
        "Maskserve-Batch-Index": str(lease.index),
        "Maskserve-Lease": lease.lease,
        "Maskserve-Lease-Expires-Ms": str(lease.expires_ms),
        "Maskserve-Redelivered": "1" if lease.redelivered else "0",
        "Maskserve-In-Order": "1" if lease.in_order else "0",
    }
    return Pieces(body, media_type="application/json" if as_json else CONTENT_TYPE, headers=headers)


async def _config(jobs: Jobs, dataset: str, name: str, instance: str) -> tuple[JobConfig, MaskSpec, dict[str, Any]]:
    """The job's config, parsed once per process, keyed by the job's instance id (new for every created job)."""
    cached = jobs.configs.get(name)
    if cached is None or cached[0] != instance:
        st = await jobs.state(dataset, name)
        if st is None:
            raise JobNotFound(f"no job named {name!r}", job=name)
        cfg = JobConfig(**st["config"])
        cached = (st["instance"], (cfg, cfg.masking.spec(), st))
        jobs.configs[name] = cached
    return cached[1]


async def _on_job(jobs: Jobs, name: str, op):  # noqa: ANN001, ANN202
    """Run ``op(dataset)``; when the job is not where this process thought (None), look it up again once."""
    out = await op(await _dataset(jobs, name))
    if out is None:
        out = await op(await _dataset(jobs, name, fresh=True))
        if out is None:
            raise JobNotFound(f"no job named {name!r}", job=name)
    return out


@router.post("/{name}/ack", summary="Ack finished batches by lease id (idempotent)")
async def ack(name: str, body: Leases, jobs: JobsDep, settings: SettingsDep) -> dict[str, list[str]]:
    leases = _check_count(body.leases, settings.max_acks)
    return {"results": await _on_job(jobs, name, lambda ds: jobs.ack(ds, name, body.worker, leases))}


@router.post("/{name}/release", summary="Give back unacked leases for immediate redelivery")
async def release(name: str, body: Leases, jobs: JobsDep, settings: SettingsDep) -> dict[str, int]:
    leases = _check_count(body.leases, settings.max_acks)
    return {"released": await _on_job(jobs, name, lambda ds: jobs.release(ds, name, body.worker, leases))}


@router.post(
    "/{name}/workers/{worker}/evict",
    summary="A worker known to be gone: its live leases are handed out again at once",
)
async def evict(name: str, worker: Annotated[str, PathParam(pattern=WORKER)], jobs: JobsDep) -> dict[str, int]:
    return {"released": await _on_job(jobs, name, lambda ds: jobs.evict(ds, name, worker))}


@router.post("/{name}/cancel", summary="Stop handing out batches")
async def cancel(name: str, jobs: JobsDep) -> dict[str, Any]:
    await _on_job(jobs, name, lambda ds: jobs.cancel(ds, name))
    return await _progress(jobs, name)


@router.delete("/{name}", status_code=204, summary="Delete a job and all its state")
async def delete(name: str, jobs: JobsDep) -> Response:
    async def drop(ds: str) -> int | None:
        return await jobs.delete(ds, name) or None

    await _on_job(jobs, name, drop)
    return Response(status_code=204)
