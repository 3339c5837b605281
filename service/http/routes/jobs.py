"""Jobs: create/attach, progress, lease the next batch, ack, release, cancel, delete."""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

from wire import CONTENT_TYPE

from ...batches.batching import DatasetSnapshot, open_dataset, render_batch
from ...batches.bodies import Pieces, hold_body
from ...batches.params import OutputParams
from ...core.config import Settings
from ...core.errors import InvalidRequest, JobConflict, LimitExceeded, StaticMasksMissing
from ...data.catalog import DatasetRuntime
from ...jobs.config import JobConfig, JobCreate
from ...jobs.leasing import Granted, Leasing, Waiting
from ...jobs.mixjobs import SourceState, check_compatible, encode, mixture_of, stream_length
from ...masking.static import cache_id
from ..deps import CatalogDep, JobsDep, LeasingDep, SettingsDep, parse_query, query_docs
from .batches import wants_json

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("maskserve")

WORKER = r"^[A-Za-z0-9._:@/-]{1,128}$"
REQUEST_ID = r"^[A-Za-z0-9_-]{1,64}$"


class Leases(BaseModel):
    worker: str = Field(default="anonymous", pattern=WORKER, description="The worker the leases were issued to.")
    leases: list[str] = Field(max_length=4096, description="Lease ids, as `Maskserve-Lease` gave them.")


@router.post("", status_code=201, summary="Create a job, or attach to an existing one with the same config")
async def create_job(
    body: JobCreate, jobs: JobsDep, leasing: LeasingDep, catalog: CatalogDep, settings: SettingsDep, response: Response
) -> dict[str, Any]:
    cfg = JobConfig(**body.model_dump(exclude={"name"}))
    cfg.masking.spec()  # validate the masking config now, not at the first batch
    if cfg.batch_size > settings.max_batch_size:
        raise LimitExceeded(
            f"batch_size {cfg.batch_size} exceeds the limit of {settings.max_batch_size}", limit=settings.max_batch_size
        )
    if cfg.mixture:
        ds, n, sources, mixture = await _open_mixture(catalog, cfg, settings)
    else:
        ds = await open_dataset(catalog, cfg.dataset)
        n, sources, mixture = ds.num_sequences, None, None
        if cfg.masking.mode == "static":
            await _check_static_cache(catalog, cfg, cfg.dataset, ds.num_chunks)
    bpe = cfg.batches_per_epoch(n)
    if bpe == 0:
        raise InvalidRequest(f"batch_size {cfg.batch_size} with drop_last leaves no batch of {n} sequences")
    state, conflicts = await jobs.create(body.name, cfg, ds.rt.uid, n, bpe, ds.num_chunks, sources, mixture)
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
    return await _progress(leasing, body.name)


async def _open_mixture(
    catalog: Any, cfg: JobConfig, settings: Settings
) -> tuple[DatasetSnapshot, int, list[tuple[str, str]], str]:
    """A mixture job's sources as they are now (checked to agree), and its stream's length: (the first source,
    positions, each source's (dataset, uid), the sources' state to store)."""
    assert cfg.sources is not None
    snaps = [await open_dataset(catalog, s.dataset) for s in cfg.sources]
    check_compatible(snaps)
    if cfg.masking.mode == "static":
        for ds in snaps:
            await _check_static_cache(catalog, cfg, ds.rt.name, ds.num_chunks)
    states = [SourceState.of(ds) for ds in snaps]
    sizes = tuple(st.n for st in states)
    try:
        n = await anyio.to_thread.run_sync(
            lambda: stream_length(cfg, mixture_of(cfg, sizes, settings.mixture_max_curriculum_blocks))
        )
    except ValueError as exc:
        raise InvalidRequest(f"the mixture cannot run: {exc}") from None
    if n > settings.mixture_max_positions:
        raise LimitExceeded(f"the mixture's stream of {n} positions exceeds the limit of "
                            f"{settings.mixture_max_positions} (MASKSERVE_MIXTURE_MAX_POSITIONS)",
                            limit=settings.mixture_max_positions)  # fmt: skip
    return snaps[0], n, [(st.dataset, st.uid) for st in states], encode(states)


async def _check_static_cache(catalog: Any, cfg: JobConfig, dataset: str, num_chunks: int) -> None:
    """A static job serves from a cache built beforehand: refuse to create one whose cache is not complete."""
    m = cfg.masking
    cache = cache_id(m.spec(), cfg.masks_seed, m.copies)
    meta = await catalog.store.mask_cache(dataset, cache)
    if meta is None or int(meta["built"]) < num_chunks:
        built = 0 if meta is None else int(meta["built"])
        raise StaticMasksMissing(
            f"static masks (cache {cache}) of dataset {dataset!r} cover {built} of {num_chunks} chunks: "
            f"build them first (POST /v1/datasets/{dataset}/static-masks with the job's masking config, "
            f"seed {cfg.masks_seed} and copies {m.copies})", dataset=dataset, cache=cache,
        )  # fmt: skip


async def _progress(leasing: Leasing, name: str) -> dict[str, Any]:
    return await leasing.on_job(name, lambda ds: leasing.jobs.progress(ds, name))


@router.get("", summary="All jobs with their progress")
async def list_jobs(jobs: JobsDep) -> dict[str, list[dict[str, Any]]]:
    return {"jobs": await jobs.progress_all()}


@router.get("/{name}", summary="A job's progress: epoch, batches handed out, acked, leased, per worker")
async def get_job(name: str, leasing: LeasingDep) -> dict[str, Any]:
    return await _progress(leasing, name)


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


class WorkerStats(BaseModel):
    """A worker's summary of its consumer over its last batches (what makes it input-bound or a straggler)."""

    model_config = {"extra": "forbid"}
    batches: int = Field(ge=1, le=1 << 30, description="Batches the summary covers.")
    wait_s: float = Field(ge=0, le=1e9, description="Seconds the consumer waited for those batches.")
    step_s: float = Field(ge=0, le=1e9, description="Seconds the consumer spent between them (its training steps).")
    leases: int = Field(default=0, ge=0, le=1 << 30, description="Lease requests answered with a batch since the "
                        "last summary.")  # fmt: skip
    lease_s: float = Field(default=0, ge=0, le=1e9, description="Seconds those requests took, each from sending it "
                           "to its answer (the lease round trip, retries included).")  # fmt: skip


class NextAcks(BaseModel):
    """The optional body of a lease request."""

    acks: list[str] = Field(
        default_factory=list, max_length=4096,
        description="Leases finished since the last call (with any `ack` of the query, at most MASKSERVE_MAX_ACKS).",
    )  # fmt: skip
    stats: WorkerStats | None = Field(
        default=None, description="The worker's latest summary of data wait and step time; job progress reports "
        "each worker's data-wait share and flags input-bound workers and stragglers from them.",
    )  # fmt: skip


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place (a request body's schema in the API
    document cannot point into a ``$defs`` of its own)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


_NEXT_BODY = {"required": False, "content": {"application/json": {"schema": _inlined(NextAcks)}}}


@router.post(
    "/{name}/next",
    summary="Lease the job's next batch (acking finished ones in the same call)",
    responses={200: {"content": {CONTENT_TYPE: {}, "application/json": {}}}, 204: {"description": "Nothing to hand out now; retry"}},
    openapi_extra={**query_docs(NextQuery), "requestBody": _NEXT_BODY},
)
async def next_batch(name: str, request: Request) -> Response:
    q = parse_query(NextQuery, request)
    state = request.app.state
    leasing: Leasing = state.leasing  # no dependencies on the hot path (see deps.parse_query)
    body = await _body(request)
    acks = _check_count(q.ack + body.acks, state.settings.max_acks)
    as_json = wants_json(request, q.format)

    def hold(cfg: JobConfig, rt: DatasetRuntime) -> None:
        hold_body(request, cfg.batch_size, rt, q, as_json)

    async def hand_over(granted: Granted) -> Response:
        return await _respond(request, q, granted, as_json)

    out = await leasing.lease(name, q.worker, acks, q.request or "", q.seq, hold=hold, hand_over=hand_over)
    if body.stats is not None:  # the job exists (it answered): keep the worker's summary
        st = body.stats
        try:
            await leasing.jobs.report(name, q.worker, st.batches, st.wait_s, st.step_s, st.leases, st.lease_s)
        except RedisError as exc:  # a summary is not worth the batch: the next one comes with a later request
            log.warning("job %r: worker %r's summary was not kept: %s", name, q.worker, exc)
    if isinstance(out, Waiting):
        return Response(status_code=204, headers={
            "Maskserve-Acks": ",".join(out.acks), "Retry-After": str(max(1, math.ceil(out.retry_ms / 1000))),
            "Maskserve-Retry-After-Ms": str(out.retry_ms)})  # fmt: skip
    return out


async def _body(request: Request) -> NextAcks:
    """A lease request's JSON body: its acks and the worker's summary (none without a body). The gatekeeper
    bounds its bytes as they arrive; the route, its acks and the query's together."""
    raw = await request.body()
    if not raw.strip():
        return NextAcks()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"the body of a lease request is JSON ({{\"acks\": [...]}}): {exc}") from None
    try:
        return NextAcks.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _check_count(leases: list[str], limit: int) -> list[str]:
    """``leases``, unless there are more than MASKSERVE_MAX_ACKS of them (one request, one script call)."""
    if len(leases) > limit:
        raise LimitExceeded(f"{len(leases)} leases in one request exceed the limit of {limit}: send them over several",
                            limit=limit)  # fmt: skip
    return leases


async def _respond(request: Request, q: "NextQuery", granted: Granted, as_json: bool) -> Response:
    """A granted lease's answer: its batch, masked and rendered, and the lease's headers."""
    state = request.app.state
    lease, rt, cfg = granted.lease, granted.rt, granted.config
    meta = {"job": granted.job, "dataset": granted.dataset, "epoch": lease.epoch, "index": lease.index,
            "lease": lease.lease, "seed": cfg.seed, "pad_id": rt.vocab.pad_id}  # fmt: skip
    extra = None
    names: list[str] = []
    if granted.sources is not None and granted.source_names is not None:  # a mixture: each row's source
        names = granted.source_names
        meta["sources"] = ",".join(names)  # dataset names hold no comma
        extra = {"source_ids": granted.sources.astype(np.int32)}
    body = await render_batch(state.work, granted.compute, granted.seq_ids, q, rt, meta, as_json,
                              state.settings.response_piece_bytes, extra)  # fmt: skip
    if extra is None:
        state.metrics.sequences_served.labels(granted.dataset).inc(len(granted.seq_ids))
    else:
        for i, n in enumerate(np.bincount(extra["source_ids"], minlength=len(names))):
            if n:
                state.metrics.sequences_served.labels(names[i]).inc(int(n))
    headers = {
        "Maskserve-Acks": ",".join(granted.acks),
        "Maskserve-Job": granted.job,
        "Maskserve-Dataset": granted.dataset,
        "Maskserve-Epoch": str(lease.epoch),
        "Maskserve-Batch-Index": str(lease.index),
        "Maskserve-Lease": lease.lease,
        "Maskserve-Lease-Expires-Ms": str(lease.expires_ms),
        "Maskserve-Redelivered": "1" if lease.redelivered else "0",
        "Maskserve-In-Order": "1" if lease.in_order else "0",
    }
    return Pieces(body, media_type="application/json" if as_json else CONTENT_TYPE, headers=headers)


@router.post("/{name}/ack", summary="Ack finished batches by lease id (idempotent)")
async def ack(name: str, body: Leases, leasing: LeasingDep, settings: SettingsDep) -> dict[str, list[str]]:
    return {"results": await leasing.ack(name, body.worker, _check_count(body.leases, settings.max_acks))}


@router.post("/{name}/release", summary="Give back unacked leases for immediate redelivery")
async def release(name: str, body: Leases, leasing: LeasingDep, settings: SettingsDep) -> dict[str, int]:
    return {"released": await leasing.release(name, body.worker, _check_count(body.leases, settings.max_acks))}


@router.post(
    "/{name}/workers/{worker}/evict",
    summary="A worker known to be gone: its live leases are handed out again at once",
)
async def evict(name: str, worker: Annotated[str, PathParam(pattern=WORKER)], leasing: LeasingDep) -> dict[str, int]:
    return {"released": await leasing.evict(name, worker)}


@router.post("/{name}/cancel", summary="Stop handing out batches")
async def cancel(name: str, leasing: LeasingDep) -> dict[str, Any]:
    await leasing.on_job(name, lambda ds: leasing.jobs.cancel(ds, name))
    return await _progress(leasing, name)


@router.delete("/{name}", status_code=204, summary="Delete a job and all its state")
async def delete(name: str, leasing: LeasingDep) -> Response:
    async def drop(ds: str) -> int | None:
        return await leasing.jobs.delete(ds, name) or None

    await leasing.on_job(name, drop)
    return Response(status_code=204)
