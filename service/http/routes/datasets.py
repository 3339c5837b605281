"""Datasets: create, list, inspect, delete; ingest documents."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from ...core.errors import (
    Conflict, DatasetExists, DatasetNotFound, IngestNotFound, InvalidRequest, LimitExceeded, UnsupportedMediaType,
)
from ...data.catalog import DatasetRuntime, sha256
from ...data.encodings import ALIASES, ENCODINGS, decoded
from ...data.progress import IngestProgress
from ...data.ingest import (
    NDJSON_TYPES, SPLITS, IngestStats, Pipeline, TextSplit, documents, limited, run_arrow, run_pipeline,
)
from ...data.streams import BlockingBody, spooled
from ...data.tables import ARROW_STREAM, PARQUET, ArrowDocuments, ParquetDocuments
from ...data.packing import PACKING_MODES, Packing
from ...data.tokenization import ROLES, SpecialRole, TokenizerInfo, load_tokenizer, prepare
from ...masking.params import MAX_SEQ_LEN
from ...store.store import ChunkIdTaken, Staged, Store, pack_tokenizer
from ..deps import CatalogDep, MetricsDep, SettingsDep, StoreDep

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
log = logging.getLogger("maskserve")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class DatasetCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, '.', '_', '-'; at most 128.")
    seq_len: int = Field(
        ge=8, le=MAX_SEQ_LEN, description="Sequence length L, special tokens included (at most MASKSERVE_MAX_SEQ_LEN)."
    )
    packing: Packing = Field(default="complete", description=f"One of {PACKING_MODES}.")
    tokenizer: dict[str, Any] = Field(description="The tokenizer.json object of the 'tokenizers' library.")
    special_tokens: dict[SpecialRole, str] | None = Field(
        default=None,
        description=f"Token string per role {ROLES}; roles left out are found by name, "
        "and a missing cls/sep/pad/mask is added to the vocabulary.",
    )


class DatasetInfo(BaseModel):
    name: str
    uid: str
    seq_len: int
    packing: str
    vocab_size: int
    id_dtype: str
    special_tokens: dict[str, int | None]
    num_sequences: int
    num_tokens: int
    num_documents: int
    num_chunks: int
    bytes: int
    generation: int
    created_at: float
    tokenizer_sha256: str


class IngestResult(BaseModel):
    dataset: str
    documents: int
    sequences: int
    tokens: int
    bytes: int
    first_sequence_id: int | None = Field(
        description="The id of the ingest's first sequence (its sequences are consecutive); null while staged."
    )
    duplicate: bool = Field(default=False, description="True when this Idempotency-Key was committed before.")
    committed: bool = Field(
        default=True, description="False for an ingest staged with commit=false: POST .../ingests/{key}/commit."
    )


class IngestState(BaseModel):
    dataset: str
    key: str
    state: Literal["staged", "committed"] = Field(
        description="staged: stored, waiting for its commit (until MASKSERVE_STAGE_TTL_S); committed: part of "
        "the dataset (remembered for MASKSERVE_INGEST_IDEMPOTENCY_TTL_S)."
    )
    result: IngestResult


def _prepare_create(raw: bytes, max_seq_len: int) -> tuple[DatasetCreate, TokenizerInfo, bytes, str]:
    """Parse and check a create request, load its tokenizer; (body, tokenizer info, the tokenizer.json as
    stored, its sha256)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestValidationError([{"loc": ("body",), "msg": f"JSON decode error: {exc}", "type": "json_invalid"}])
    try:
        body = DatasetCreate.model_validate(obj)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    if body.seq_len > max_seq_len:
        raise LimitExceeded(f"seq_len {body.seq_len} exceeds the service limit of {max_seq_len}", limit=max_seq_len)
    info = prepare(load_tokenizer(json.dumps(body.tokenizer)), body.special_tokens)
    if info.special_ids["mask"] is None or info.special_ids["pad"] is None:
        raise InvalidRequest("the tokenizer needs a mask and a pad token")
    tok_json = info.tokenizer.to_str()
    return body, info, pack_tokenizer(tok_json), sha256(tok_json)


def _info(meta: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(**{k: meta[k] for k in DatasetInfo.model_fields})


@router.post(
    "", status_code=201, response_model=DatasetInfo, summary="Create a dataset",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": DatasetCreate.model_json_schema()}}}},
)  # fmt: skip
async def create_dataset(request: Request, store: StoreDep, settings: SettingsDep, response: Response) -> DatasetInfo:
    # The body (up to MASKSERVE_MAX_TOKENIZER_BYTES of tokenizer.json) is parsed, validated and loaded in a worker
    # thread, not on the event loop: a large tokenizer must not stall the health probes or other requests.
    raw = await request.body()  # bounded as it arrives (see app.Gatekeeper)
    body, info, tok_blob, tok_sha = await request.app.state.work.run(_prepare_create, raw, settings.max_seq_len)
    meta = {
        "name": body.name,
        "uid": uuid.uuid4().hex,
        "seq_len": body.seq_len,
        "packing": body.packing,
        "vocab_size": info.vocab_size,
        "id_dtype": info.id_dtype.str,
        "special_tokens": info.special_ids,
        "all_special_ids": list(info.all_special_ids),
        "num_sequences": 0,
        "num_tokens": 0,
        "num_documents": 0,
        "num_chunks": 0,
        "bytes": 0,
        "generation": 0,
        "created_at": time.time(),
        "tokenizer_sha256": tok_sha,
    }
    if not await store.create_dataset(body.name, meta, tok_blob):
        raise DatasetExists(f"a dataset named {body.name!r} exists; delete it first", dataset=body.name)
    response.headers["Location"] = f"/v1/datasets/{body.name}"
    return _info(meta)


@router.get("", summary="List datasets")
async def list_datasets(store: StoreDep) -> dict[str, list[DatasetInfo]]:
    out = []
    for name in await store.list_names():
        meta = await store.meta(name)
        if meta is not None:
            out.append(_info(meta))
    return {"datasets": out}


async def _meta(store: StoreDep, name: str) -> dict[str, Any]:
    meta = await store.meta(name)
    if meta is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    return meta


@router.get("/{name}", response_model=DatasetInfo, summary="Inspect a dataset")
async def get_dataset(name: str, store: StoreDep) -> DatasetInfo:
    return _info(await _meta(store, name))


@router.get("/{name}/tokenizer", summary="The dataset's tokenizer.json")
async def get_tokenizer(name: str, store: StoreDep) -> Response:
    raw = await store.tokenizer_json(name)
    if raw is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    return Response(raw, media_type="application/json")


@router.delete("/{name}", status_code=204, summary="Delete a dataset and every key it owns")
async def delete_dataset(name: str, store: StoreDep, catalog: CatalogDep, request: Request) -> Response:
    if not await store.delete_dataset(name):
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    catalog.forget(name)
    request.app.state.jobs.forget(dataset=name)  # its jobs went with it
    return Response(status_code=204)


@router.post(
    "/{name}/documents",
    response_model=IngestResult,
    summary="Ingest documents (NDJSON, plain text, an Arrow stream or Parquet; optionally compressed), atomically",
    responses={202: {"model": IngestResult, "description": "Staged (commit=false): commit it by its key."}},
    openapi_extra={
        "parameters": [
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "enum": list(ENCODINGS), "default": "identity"},
                "description": "The body's compression, decoded as it arrives: gzip (every member of a "
                "multi-member file) or zstd (every frame). MASKSERVE_MAX_BODY_BYTES bounds the decoded "
                "bytes as well as those sent; a body that does not decode is 400 corrupt-body, another "
                "encoding (or a list of several) 415.",
            }
        ],
        "requestBody": {
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
                ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
                PARQUET: {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        },
    },
)
async def ingest(
    name: str,
    request: Request,
    response: Response,
    store: StoreDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    split: Annotated[
        TextSplit,
        Query(description=f"text/plain only: how the body splits into documents, one of {SPLITS}."),
    ] = "none",
    text_column: Annotated[
        str | None, Query(max_length=256, description="Arrow and Parquet bodies: the column of texts (default: text).")
    ] = None,
    ids_column: Annotated[
        str | None, Query(max_length=256, description="Arrow and Parquet bodies: a column of pre-tokenized id lists.")
    ] = None,
    commit: Annotated[
        bool, Query(description="false: stage only, under the Idempotency-Key (required), and commit later with "
                    "POST /v1/datasets/{name}/ingests/{key}/commit; commits in the order wanted fix the ids.")
    ] = True,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> IngestResult:
    media_type = _ingest_media_type(request)
    encoding = _content_encoding(request)
    if not commit and not idempotency_key:
        raise InvalidRequest("commit=false stages the ingest under its Idempotency-Key: send one")
    if text_column is not None and ids_column is not None:
        raise InvalidRequest("name either text_column or ids_column, not both")
    if media_type not in (ARROW_STREAM, PARQUET) and (text_column is not None or ids_column is not None):
        raise InvalidRequest(f"text_column and ids_column name a column of an {ARROW_STREAM} or {PARQUET} body")
    rt = await catalog.current(name)
    info = await catalog.tokenizer(rt)
    pipeline = Pipeline(info, rt.meta["packing"], rt.seq_len, settings.chunk_bytes, settings.chunk_max_sequences)
    ingest_id = store.new_ingest_id()
    staged: list[Staged] = []

    async def stage(blob: bytes) -> None:
        try:
            chunk = await store.stage_chunk(name, rt.uid, ingest_id, len(staged), blob, settings.stage_ttl_s)
        except ChunkIdTaken as taken:
            raise Conflict(f"a staged chunk's key was taken ({taken}); retry the ingest") from None
        if chunk is None:
            raise DatasetNotFound(f"dataset {name!r} was deleted or replaced during the ingest", dataset=name)
        staged.append(chunk)

    length = request.headers.get("content-length")
    progress = IngestProgress(store, name, pipeline.stats, interval=settings.ingest_progress_interval_s,
                              key=idempotency_key, media_type=media_type, encoding=encoding,
                              length=int(length) if length and length.isdigit() else None,
                              on_bytes=metrics.ingest_bytes_received.labels(name).inc,
                              running=metrics.ingests_running.labels(name))  # fmt: skip
    body = limited(progress.received(request.stream()), settings.max_body_bytes)
    limiter = request.app.state.work.limiter
    if encoding != "identity":  # the decoded bytes count against the limit too: a small bomb must not pass
        body = limited(decoded(body, encoding), settings.max_body_bytes, "decoded request body")
    async with progress:  # what arrived, for GET /v1/ingests, until the ingest ends
        try:
            if media_type in (ARROW_STREAM, PARQUET):
                column, kind = (ids_column, "ids") if ids_column is not None else (text_column or "text", "text")
                limit = settings.ingest_max_record_batch_bytes
                args = (column, kind, rt.meta["vocab_size"], _reserved(rt), limit)
                if media_type == ARROW_STREAM:
                    stats = await run_arrow(pipeline, ArrowDocuments(BlockingBody(body, limit), *args),
                                            settings.ingest_batch_bytes, stage, settings.ingest_batch_docs, limiter)  # fmt: skip
                else:
                    async with spooled(body) as path:
                        stats = await run_arrow(pipeline, ParquetDocuments(path, *args), settings.ingest_batch_bytes,
                                                stage, settings.ingest_batch_docs, limiter)  # fmt: skip
            else:
                docs = documents(body, media_type, split, rt.meta["vocab_size"], _reserved(rt))
                stats = await run_pipeline(pipeline, docs, settings.ingest_batch_bytes, stage,
                                           settings.ingest_batch_docs, limiter)  # fmt: skip
            if commit:
                status, payload = await _commit(store, name, rt, idempotency_key or "", staged, stats, pipeline)
            else:
                status, payload = await _stage_only(store, name, rt, idempotency_key or "", staged, stats, pipeline,
                                                    settings.stage_ttl_s)  # fmt: skip
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await store.drop_staged(name, staged)
                except Exception as exc:  # noqa: BLE001 - the staged keys expire by themselves
                    log.warning("could not drop staged chunks of a failed ingest into %s: %s", name, exc)
            raise
    if status == 2:
        response.status_code = 202
        return IngestResult(**json.loads(payload), first_sequence_id=None, committed=False)
    out = IngestResult(**json.loads(payload), duplicate=status == 1)
    if status == 0:
        metrics.tokens_ingested.labels(name).inc(stats.tokens)
        metrics.documents_ingested.labels(name).inc(stats.documents)
        metrics.bytes_stored.labels(name).inc(stats.bytes)
    return out


@router.get("/{name}/ingests/{key}", response_model=IngestState, summary="Whether an ingest is staged or committed")
async def ingest_state(name: str, key: Annotated[str, Path(max_length=128)], store: StoreDep) -> IngestState:
    done = await store.committed(name, key)
    if done is not None:
        return IngestState(dataset=name, key=key, state="committed", result=IngestResult(**json.loads(done)))
    record = await store.pending(name, key)
    meta = await store.meta(name)
    if record is None or meta is None or record["uid"] != meta.get("uid"):
        if meta is None:
            raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
        raise IngestNotFound(f"nothing staged or committed in {name!r} under key {key!r}", dataset=name, key=key)
    result = IngestResult(**record["result"], first_sequence_id=None, committed=False)
    return IngestState(dataset=name, key=key, state="staged", result=result)


@router.post("/{name}/ingests/{key}/commit", response_model=IngestResult, summary="Commit a staged ingest")
async def commit_staged(
    name: str, key: Annotated[str, Path(max_length=128)], store: StoreDep, catalog: CatalogDep,
    metrics: MetricsDep,
) -> IngestResult:  # fmt: skip
    """Make an ingest staged with commit=false part of the dataset: its sequences get the next ids. Committing
    a committed key again answers its result with duplicate=true."""
    record = await store.pending(name, key)
    rt = await catalog.current(name)
    if record is None or record["uid"] != rt.uid:
        done = await store.committed(name, key)
        if done is not None:
            return IngestResult(**json.loads(done), duplicate=True)
        raise IngestNotFound(f"nothing staged in {name!r} under key {key!r} (never staged, or its staged data "
                             "expired: ingest it again)", dataset=name, key=key)  # fmt: skip
    staged = [Staged(int(i), k) for i, k in zip(record["ids"], record["keys"])]
    counts = np.zeros(rt.meta["vocab_size"], np.int64)
    pairs = np.frombuffer(base64.b64decode(record["freq"]), "<i8").reshape(-1, 2)
    counts[pairs[:, 0]] = pairs[:, 1]
    s = record["result"]
    status, payload = await store.commit_ingest(
        name, rt.uid, key, staged, record["counts"], s["sequences"], s["tokens"], s["documents"], s["bytes"],
        s, counts, own_chunks=False,
    )  # fmt: skip
    _refuse_failed_commit(name, status, payload)
    await store.drop_pending(name, key)
    if status == 0:
        metrics.tokens_ingested.labels(name).inc(s["tokens"])
        metrics.documents_ingested.labels(name).inc(s["documents"])
        metrics.bytes_stored.labels(name).inc(s["bytes"])
    return IngestResult(**json.loads(payload), duplicate=status == 1)


def _ingest_media_type(request: Request) -> str:
    """The ingest body's media type: NDJSON or plain text, else 415."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (*NDJSON_TYPES, "text/plain", ARROW_STREAM, PARQUET):
        raise UnsupportedMediaType(
            f"send application/x-ndjson ({{\"text\": ...}} or {{\"ids\": [...]}} per line), text/plain or "
            f"{ARROW_STREAM} or {PARQUET} (a text or ids column), "
            f"not {media_type or 'no content type'!r}"
        )
    return media_type


def _content_encoding(request: Request) -> str:
    """The ingest body's Content-Encoding: one of ``ENCODINGS`` (none given: identity), else 415."""
    values = [v.strip().lower() for h in request.headers.getlist("content-encoding") for v in h.split(",")]
    values = [ALIASES.get(v, v) for v in values if v]
    if not values:
        return "identity"
    if len(values) == 1 and values[0] in ENCODINGS:
        return values[0]
    raise UnsupportedMediaType(
        f"send the body as it is or with one Content-Encoding of {', '.join(ENCODINGS)}, not {', '.join(values)!r}"
    )


async def _commit(
    store: Store, name: str, rt: DatasetRuntime, idempotency_key: str, staged: list[Staged], stats: IngestStats,
    pipeline: Pipeline,
) -> tuple[int, str]:
    """Commit the staged chunks: (0 committed or 1 a duplicate of the key's earlier ingest, its stored result)."""
    result = {"dataset": name, "documents": stats.documents, "sequences": stats.sequences,
              "tokens": stats.tokens, "bytes": stats.bytes}  # fmt: skip
    status, payload = await store.commit_ingest(
        name, rt.uid, idempotency_key, staged, stats.chunk_counts,
        stats.sequences, stats.tokens, stats.documents, stats.bytes, result, pipeline.token_counts,
    )  # fmt: skip
    _refuse_failed_commit(name, status, payload)
    return status, payload


def _refuse_failed_commit(name: str, status: int, payload: str) -> None:
    if status == -1:
        raise DatasetNotFound(f"dataset {name!r} was deleted or replaced during the ingest", dataset=name)
    if status == -2:
        raise Conflict(f"staged data expired before commit ({payload}); retry the ingest")


async def _stage_only(
    store: Store, name: str, rt: DatasetRuntime, idempotency_key: str, staged: list[Staged], stats: IngestStats,
    pipeline: Pipeline, ttl: int,
) -> tuple[int, str]:
    """Keep a staged ingest for a later commit: (2 staged, its result so far), or (1, the stored result) when
    the key was committed before (the chunks just staged are dropped)."""
    done = await store.committed(name, idempotency_key)
    if done is not None:
        await store.drop_staged(name, staged)
        return 1, done
    result = {"dataset": name, "documents": stats.documents, "sequences": stats.sequences,
              "tokens": stats.tokens, "bytes": stats.bytes}  # fmt: skip
    nz = np.flatnonzero(pipeline.token_counts)
    freq = np.stack([nz, pipeline.token_counts[nz]], axis=1).astype("<i8").tobytes()
    record = {"uid": rt.uid, "ids": [s.id for s in staged], "keys": [s.key for s in staged],
              "counts": stats.chunk_counts, "result": result, "freq": base64.b64encode(freq).decode()}  # fmt: skip
    await store.save_pending(name, idempotency_key, record, ttl)
    return 2, json.dumps(result)


def _reserved(rt: DatasetRuntime) -> np.ndarray:
    """Ids pre-tokenized documents may not hold: the special tokens, except unk."""
    reserved = rt.vocab.is_special.copy()
    unk = rt.meta["special_tokens"].get("unk")
    if unk is not None:
        reserved[unk] = False
    return reserved
