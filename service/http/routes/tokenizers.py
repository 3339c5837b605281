"""Training a tokenizer on the fly from a corpus sent in the request body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from tokenizers import Tokenizer

from ...core.errors import UnsupportedMediaType
from ...data.ingest import TextSplit, documents, limited, parse
from ...data.tokenization import TokenizerKind, train_tokenizer
from ..deps import SettingsDep

router = APIRouter(prefix="/v1/tokenizers", tags=["tokenizers"])


@router.post(
    "/train",
    summary="Train a tokenizer on the body's documents; returns its tokenizer.json",
    responses={200: {"content": {"application/json": {}}}},
    openapi_extra={
        "requestBody": {
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}, "text/plain": {"schema": {"type": "string"}}},
            "required": True,
        }
    },
)
async def train(
    request: Request,
    settings: SettingsDep,
    kind: Annotated[TokenizerKind, Query(description="Tokenizer family.")] = "bpe",
    vocab_size: Annotated[int, Query(ge=64, le=1 << 20)] = 8000,
    min_frequency: Annotated[int, Query(ge=1, le=1 << 32)] = 2,  # bounded: the trainers take it as a u64
    split: Annotated[TextSplit, Query()] = "paragraph",
) -> Response:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/x-ndjson", "application/jsonl", "text/plain"):
        raise UnsupportedMediaType(f"send application/x-ndjson or text/plain, not {media_type or 'nothing'!r}")
    body = limited(request.stream(), settings.max_train_bytes)
    docs = [d async for d in documents(body, media_type, split, vocab_size=1 << 32)]
    tok = await request.app.state.work.run(_train, docs, kind, vocab_size, min_frequency)
    return Response(tok.to_str(), media_type="application/json")


def _train(docs: list, kind: str, vocab_size: int, min_frequency: int) -> Tokenizer:
    """Parse the documents and train on their texts (pre-tokenized ones have none): CPU work, off the loop."""
    return train_tokenizer([d for d in parse(docs) if isinstance(d, str)], kind, vocab_size, min_frequency)
