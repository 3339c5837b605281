"""Upload bodies: documents as NDJSON, files in pieces, bodies that start over when a request is retried."""

from __future__ import annotations

import bz2
import json
import lzma
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


#: the (inner) suffixes of files sent as NDJSON; ``.json`` too, as corpora such as C4 ship their lines
NDJSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
#: compressed files the service decodes: sent as they are, with this Content-Encoding
SENT_ENCODED = {".gz": "gzip", ".zst": "zstd"}
#: compressed files decoded here as they are sent (the service takes neither encoding)
DECODED_HERE: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class FileUpload:
    """How a file is sent, by its suffixes: its compression (the outer one) and NDJSON or plain text (the
    inner one: ``docs.jsonl.gz`` is NDJSON sent gzip-encoded)."""

    path: Path
    ndjson: bool
    encoding: str | None  # the Content-Encoding it is sent with
    opener: Callable[[IO[bytes]], IO[bytes]] | None  # decodes it here

    @classmethod
    def of(cls, path: Path) -> "FileUpload":
        outer = path.suffix.lower()
        compressed = outer in SENT_ENCODED or outer in DECODED_HERE
        inner = Path(path.stem).suffix.lower() if compressed else outer
        return cls(path, inner in NDJSON_SUFFIXES, SENT_ENCODED.get(outer), DECODED_HERE.get(outer))

    def chunks(self, on_bytes: Callable[[int], None] | None) -> Iterator[bytes]:
        """The body, from the start; ``on_bytes(n)`` counts the bytes of the file read (as its size does)."""
        if self.opener is None:
            return file_chunks(self.path, on_bytes)
        return decoded_file_chunks(self.path, self.opener, on_bytes)


def decoded_file_chunks(
    path: Path, opener: Callable[[IO[bytes]], IO[bytes]], on_bytes: Callable[[int], None] | None, chunk: int = 1 << 20
) -> Iterator[bytes]:
    """A compressed file decoded as it is read, ``chunk`` bytes at a time (every stream of a multi-stream
    file); ``on_bytes`` gets the compressed bytes read."""
    with path.open("rb") as raw, opener(raw) as f:
        reported = 0
        while piece := f.read(chunk):
            yield piece
            if on_bytes:
                on_bytes(raw.tell() - reported)
                reported = raw.tell()
        if on_bytes and raw.tell() > reported:
            on_bytes(raw.tell() - reported)


class Replayable:
    """A request body that starts over each time httpx iterates it (for retries)."""

    def __init__(self, factory: Callable[[], Iterator[bytes]]) -> None:
        self._factory = factory

    def __iter__(self) -> Iterator[bytes]:
        return self._factory()
