"""Liveness and readiness (open to all), Prometheus metrics (behind the token)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, StoreDep
from ..metrics import exposition

router = APIRouter(tags=["health"])


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
async def metrics(m: MetricsDep) -> Response:
    return Response(exposition(m.registry), media_type=CONTENT_TYPE_LATEST)
