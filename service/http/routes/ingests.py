"""The ingests running now, on every process of the fleet (their progress records, see data/progress.py)."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field
from fastapi import APIRouter

from ...data.progress import stale_after
from ..deps import SettingsDep, StoreDep

router = APIRouter(prefix="/v1/ingests", tags=["datasets"])


class RunningIngest(BaseModel):
    id: str = Field(description="The ingest's own id (not its Idempotency-Key).")
    dataset: str
    key: str | None = Field(description="Its Idempotency-Key, when one was sent.")
    media_type: str
    content_length: int | None = Field(description="The body's announced length (bytes as sent), if any.")
    content_encoding: str
    started: float = Field(description="Unix time the ingest started.")
    updated: float = Field(description="Unix time of its latest progress record (refreshed every "
                           "MASKSERVE_INGEST_PROGRESS_INTERVAL_S).")
    bytes_received: int = Field(description="Body bytes received so far, as sent (compressed, if it is).")
    documents: int
    sequences: int
    tokens: int
    bytes_staged: int = Field(description="Chunk bytes stored (staged) so far.")
    chunks: int


class RunningIngests(BaseModel):
    ingests: list[RunningIngest]


@router.get("", response_model=RunningIngests, summary="The ingests running now, on every process")
async def running(store: StoreDep, settings: SettingsDep) -> RunningIngests:
    fresh_since = time.time() - stale_after(settings.ingest_progress_interval_s)
    return RunningIngests(ingests=[RunningIngest(**r) for r in await store.running_ingests(fresh_since)])
