"""Stateless masked batches: B random sequences of a dataset, masked dynamically or statically."""

from __future__ import annotations

import secrets

import numpy as np

from fastapi import APIRouter, Request
from pydantic import Field

from wire import CONTENT_TYPE

from ...batches.batching import DatasetSnapshot, draw_with_retry, prepare_batch_rows, render_batch
from ...batches.bodies import Piece, Pieces, hold_body
from ...batches.params import OutputParams
from ...batches.permute import stream_ids
from ...core.errors import LimitExceeded, NotAcceptable
from ...masking.params import MAX_BATCH, MAX_INDEX, MAX_INT64, MAX_SEED, MaskingParams
from ..deps import parse_query, query_docs

router = APIRouter(prefix="/v1/datasets", tags=["batches"])


class BatchQuery(MaskingParams, OutputParams):
    size: int = Field(default=32, ge=1, le=MAX_BATCH, description="Batch size B (at most MASKSERVE_MAX_BATCH_SIZE).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Omit for a fresh random seed (echoed back).")
    index: int = Field(
        default=0, ge=0, le=MAX_INDEX,
        description="Batch number: stream positions index*B .. index*B+B-1 of the seed's per-epoch permutations.",
    )  # fmt: skip
    epoch: int | None = Field(
        default=None, ge=0, le=MAX_INT64, description="Mask epoch for every row; default each row's pass over the data."
    )
    mask_seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seeds the masks; default `seed`.")
    format: str | None = Field(default=None, pattern="^(safetensors|json)$", description="Overrides the Accept header.")


def wants_json(request: Request, fmt: str | None) -> bool:
    """Content negotiation for batches: safetensors or JSON, by the Accept header's q-values (RFC 9110);
    ties, and no Accept at all, go to safetensors."""
    if fmt is not None:
        return fmt == "json"
    accept = request.headers.get("accept", "*/*").lower()
    if accept in (CONTENT_TYPE, "*/*", ""):  # the common cases, decided without parsing
        return False
    binary = _quality(accept, CONTENT_TYPE)
    if "application/octet-stream" in accept:  # an alias of ours, when named: not through application/* or */*
        binary = max(binary, _quality(accept, "application/octet-stream", exact=True))
    as_json = _quality(accept, "application/json")
    if binary <= 0 and as_json <= 0:
        raise NotAcceptable(f"batches are served as {CONTENT_TYPE} or application/json, not {accept!r}")
    return as_json > binary


def _quality(accept: str, media_type: str, exact: bool = False) -> float:
    """The q-value ``accept`` gives ``media_type``: that of its most specific matching range, 0 if none
    (``exact``: only a range naming it counts)."""
    main = media_type.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for item in accept.split(","):
        kind, *params = (p.strip() for p in item.split(";"))
        specificity = 2 if kind == media_type else 1 if kind == f"{main}/*" else 0 if kind == "*/*" else -1
        if exact and specificity < 2:
            continue
        if specificity < best[0] or specificity < 0:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        best = (specificity, q)
    return best[1]


@router.get(
    "/{name}/batch",
    summary="A random batch of B sequences, masked",
    responses={200: {"content": {CONTENT_TYPE: {}, "application/json": {}}}},
    openapi_extra=query_docs(BatchQuery),
)
async def get_batch(name: str, request: Request) -> Pieces:
    q = parse_query(BatchQuery, request)
    state = request.app.state  # no dependencies on the hot path (see deps.parse_query)
    catalog, settings, metrics, work = state.catalog, state.settings, state.metrics, state.work
    if q.size > settings.max_batch_size:
        raise LimitExceeded(f"size {q.size} exceeds the limit of {settings.max_batch_size}", limit=settings.max_batch_size)
    spec = q.spec()
    as_json = wants_json(request, q.format)
    seed = secrets.randbits(63) if q.seed is None else q.seed

    async def draw(ds: DatasetSnapshot, checked: bool) -> tuple[list[Piece], int]:
        hold_body(request, q.size, ds.rt, q, as_json)
        # O(B) work: weighed as B tokens (a thread hop costs more than drawing a few thousand ids)
        seq_ids, epochs = await work.run(stream_ids, seed, q.index, q.size, ds.num_sequences, tokens=q.size)
        epoch = int(epochs[0]) if q.epoch is None else q.epoch
        mask_epochs = epochs if q.epoch is None else np.full_like(epochs, q.epoch)
        mask_seed = seed if q.mask_seed is None else q.mask_seed
        compute = await prepare_batch_rows(catalog, ds, seq_ids, mask_epochs, seed=mask_seed, params=q, spec=spec,
                                           checked=checked, step=q.index)  # fmt: skip
        meta = {"dataset": name, "seed": seed, "epoch": epoch, "index": q.index, "pad_id": ds.rt.vocab.pad_id,
                "mode": q.mode}  # fmt: skip
        body = await render_batch(work, compute, seq_ids, q, ds.rt, meta, as_json, settings.response_piece_bytes)
        return body, epoch

    body, epoch = await draw_with_retry(catalog, name, draw)
    metrics.sequences_served.labels(name).inc(q.size)
    headers = {
        "Maskserve-Dataset": name,
        "Maskserve-Seed": str(seed),
        "Maskserve-Epoch": str(epoch),
        "Maskserve-Batch-Index": str(q.index),
    }
    return Pieces(body, media_type="application/json" if as_json else CONTENT_TYPE, headers=headers)
