"""Sequences by id: the given sequences, masked for a given (seed, epoch) or static copy.

What a fixed evaluation set needs: the same ids under the same masks on every
call, on any replica, with no job and no stream position. Masks are the ones a
batch or job of the same (mask seed, epoch, masking config) would carry, so a
training run's masks can be replayed, and a seed no run trains on gives masks
no run has seen.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field

from wire import CONTENT_TYPE

from ...batches.batching import DatasetSnapshot, draw_with_retry, prepare_batch, render_batch
from ...batches.bodies import Piece, Pieces, hold_body
from ...batches.params import OutputParams
from ...core.errors import LimitExceeded, SequenceOutOfRange
from ...masking.params import MAX_INT64, MAX_SEED, MaskingParams
from .batches import wants_json

router = APIRouter(prefix="/v1/datasets", tags=["sequences"])


class SequencesRequest(MaskingParams, OutputParams):
    ids: list[Annotated[int, Field(ge=-MAX_INT64 - 1, le=MAX_INT64)]] = Field(
        min_length=1, description="Sequence ids, in the order the rows should come (repeats allowed)."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seeds the masks (and names the static cache).")
    epoch: int = Field(
        default=0, ge=0, le=MAX_INT64, description="Mask epoch; with mode=static, copy epoch mod copies is served."
    )
    format: str | None = Field(default=None, pattern="^(safetensors|json)$", description="Overrides the Accept header.")


@router.post(
    "/{name}/sequences",
    summary="Given sequence ids, masked for (seed, epoch) or a static copy",
    responses={200: {"content": {CONTENT_TYPE: {}, "application/json": {}}}},
)
async def get_sequences(name: str, body: SequencesRequest, request: Request) -> Pieces:
    state = request.app.state
    catalog, settings = state.catalog, state.settings
    if len(body.ids) > settings.max_batch_size:
        raise LimitExceeded(
            f"{len(body.ids)} ids exceed the batch-size limit of {settings.max_batch_size}", limit=settings.max_batch_size
        )
    spec = body.spec()
    as_json = wants_json(request, body.format)
    seq_ids = np.asarray(body.ids, dtype=np.int64) if max(body.ids) < 1 << 62 and min(body.ids) >= 0 else None

    async def draw(ds: DatasetSnapshot, checked: bool) -> list[Piece]:
        if seq_ids is None or int(seq_ids.max()) >= ds.num_sequences:
            bad = next(i for i in body.ids if not 0 <= i < ds.num_sequences)
            raise SequenceOutOfRange(
                f"sequence id {bad} is outside dataset {name!r}, which holds ids 0..{ds.num_sequences - 1}",
                dataset=name, num_sequences=ds.num_sequences,
            )  # fmt: skip
        hold_body(request, len(seq_ids), ds.rt, body, as_json)
        compute = await prepare_batch(catalog, ds, seq_ids, seed=body.seed, epoch=body.epoch, params=body, spec=spec,
                                      checked=checked)  # fmt: skip
        meta = {"dataset": name, "seed": body.seed, "epoch": body.epoch, "pad_id": ds.rt.vocab.pad_id,
                "mode": body.mode}  # fmt: skip
        return await render_batch(state.work, compute, seq_ids, body, ds.rt, meta, as_json,
                                  settings.response_piece_bytes)  # fmt: skip

    payload = await draw_with_retry(catalog, name, draw)
    state.metrics.sequences_served.labels(name).inc(len(body.ids))
    headers = {"Maskserve-Dataset": name, "Maskserve-Seed": str(body.seed), "Maskserve-Epoch": str(body.epoch)}
    return Pieces(payload, media_type="application/json" if as_json else CONTENT_TYPE, headers=headers)
