"""Stateless masked batches: B random sequences of a dataset, masked dynamically."""

from __future__ import annotations

import json
import secrets
from typing import Annotated

import anyio

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from redis.exceptions import ResponseError

from client._wire import CONTENT_TYPE, encode

from ..deps import CatalogDep, MetricsDep, SettingsDep, StoreDep
from ..errors import Conflict, DatasetEmpty, DatasetNotFound, LimitExceeded, NotAcceptable, ValidationFailed
from ..masking import MaskSpec, mask_tokens, sample_ids
from ..packing import decode_records

router = APIRouter(prefix="/v1/datasets", tags=["batches"])

MAX_SEED = (1 << 64) - 1


class BatchQuery(BaseModel):
    size: int = Field(default=32, ge=1, description="Batch size B.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Omit for a fresh random seed (echoed back).")
    index: int = Field(default=0, ge=0, description="Batch number: which B sequences (seed, index) draws.")
    epoch: int | None = Field(
        default=None, ge=0, description="Mask epoch; default index * B // num_sequences (a pass over the data)."
    )
    mlm_probability: float = Field(default=0.15, ge=0.0, le=1.0)
    mask_ratio: float = Field(default=0.8, ge=0.0, le=1.0, description="Share of selected tokens set to the mask token.")
    random_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Share replaced by a random ordinary token.")
    format: str | None = Field(default=None, pattern="^(safetensors|json)$", description="Overrides the Accept header.")


def _wants_json(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "json"
    accept = request.headers.get("accept", "*/*").lower()
    if CONTENT_TYPE in accept or "application/octet-stream" in accept or "*/*" in accept or not accept:
        return False
    if "application/json" in accept:
        return True
    raise NotAcceptable(f"batches are served as {CONTENT_TYPE} or application/json, not {accept!r}")


@router.get(
    "/{name}/batch",
    summary="A random batch of B sequences, masked dynamically",
    responses={200: {"content": {CONTENT_TYPE: {}, "application/json": {}}}},
)
async def get_batch(
    name: str,
    q: Annotated[BatchQuery, Query()],
    request: Request,
    store: StoreDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    if q.size > settings.max_batch_size:
        raise LimitExceeded(f"size {q.size} exceeds the limit of {settings.max_batch_size}", limit=settings.max_batch_size)
    try:
        spec = MaskSpec(q.mlm_probability, q.mask_ratio, q.random_ratio)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    as_json = _wants_json(request, q.format)
    counters = await store.counters(name)
    if counters is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    uid, num_sequences, num_chunks = counters
    if num_sequences == 0:
        raise DatasetEmpty(f"dataset {name!r} has no sequences yet; ingest documents first", dataset=name)
    rt = await catalog.with_chunks(await catalog.runtime(name, uid), num_chunks)

    seed = secrets.randbits(63) if q.seed is None else q.seed
    epoch = q.index * q.size // num_sequences if q.epoch is None else q.epoch
    seq_ids = sample_ids(seed, q.index, q.size, num_sequences)
    chunk, local = rt.locate(seq_ids)
    try:
        records = await store.fetch(name, chunk, local, rt.id_dtype.itemsize)
    except ResponseError as exc:
        raise Conflict(f"dataset {name!r} changed while the batch was read; retry ({exc})") from None

    def build() -> bytes:
        ids, _, lengths = decode_records(records, rt.id_dtype, rt.seq_len)
        input_ids, labels, attention = mask_tokens(
            ids, lengths, seq_ids, seed=seed, epoch=epoch, spec=spec, vocab=rt.vocab
        )
        arrays = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "sequence_ids": seq_ids}
        meta = {"dataset": name, "seed": seed, "epoch": epoch, "index": q.index, "pad_id": rt.vocab.pad_id}
        if as_json:
            return json.dumps({"metadata": meta, **{k: v.tolist() for k, v in arrays.items()}}).encode()
        return encode(arrays, meta)

    body = build() if q.size * rt.seq_len <= 1 << 16 else await anyio.to_thread.run_sync(build)
    metrics.sequences_served.labels(name).inc(q.size)
    headers = {
        "Maskserve-Dataset": name,
        "Maskserve-Seed": str(seed),
        "Maskserve-Epoch": str(epoch),
        "Maskserve-Batch-Index": str(q.index),
    }
    return Response(body, media_type="application/json" if as_json else CONTENT_TYPE, headers=headers)


