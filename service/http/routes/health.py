"""Liveness and readiness (open to all), Prometheus metrics (behind the token)."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from ..deps import JobsDep, MetricsDep, SettingsDep, StoreDep
from ..metrics import exposition, job_exposition

router = APIRouter(tags=["health"])
log = logging.getLogger("maskserve")


@router.get("/healthz", summary="The process is up (and which worker process answered)")
async def healthz() -> dict[str, Any]:
    return {"status": "ok", "process": os.getpid()}


@router.get("/readyz", summary="Redis answers; whether acks are confirmed only once durable")
async def readyz(store: StoreDep, request: Request) -> dict[str, Any]:
    await store.r.ping()  # a lost connection becomes a 503 problem
    durability = request.app.state.durability
    await durability.ensure()
    return {"status": "ready", **durability.describe()}


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(m: MetricsDep, jobs: JobsDep, settings: SettingsDep) -> Response:
    body = exposition(m.registry)
    if settings.metrics_max_jobs:
        try:
            progress = await jobs.progress_all()
        except RedisError as exc:  # the process's own metrics still answer; the jobs' need Redis
            log.warning("/metrics: job series left out: Redis: %s", exc)
        else:
            body += job_exposition(progress, settings.metrics_max_jobs, settings.metrics_max_workers)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
