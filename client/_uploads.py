"""Upload bodies: documents as NDJSON, files in pieces, bodies that start over when a request is retried."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

Document = str | Mapping[str, Any] | Sequence[int]


def as_record(doc: Document) -> Mapping[str, Any]:
    if isinstance(doc, str):
        return {"text": doc}
    if isinstance(doc, Mapping):
        return doc
    return {"ids": [int(i) for i in doc]}


def ndjson(records: Iterable[Mapping[str, Any]], on_bytes: Callable[[int], None] | None = None, chunk: int = 1 << 16) -> Iterator[bytes]:
    buf: list[bytes] = []
    size = 0
    for rec in records:
        line = json.dumps(rec, ensure_ascii=False).encode() + b"\n"
        buf.append(line)
        size += len(line)
        if size >= chunk:
            yield b"".join(buf)
            if on_bytes:
                on_bytes(size)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)
        if on_bytes:
            on_bytes(size)


def file_chunks(path: Path, on_bytes: Callable[[int], None] | None, chunk: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while piece := f.read(chunk):
            yield piece
            if on_bytes:
                on_bytes(len(piece))


class Replayable:
    """A request body that starts over each time httpx iterates it (for retries)."""

    def __init__(self, factory: Callable[[], Iterator[bytes]]) -> None:
        self._factory = factory

    def __iter__(self) -> Iterator[bytes]:
        return self._factory()
