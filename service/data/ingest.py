"""Ingest: a streamed request body -> documents -> tokens -> packed chunks.

Bodies are read as they arrive and never held whole (except a single
``text/plain`` document, which is one document by definition). Documents are
tokenized in bulk, in a worker thread, a batch of about ``ingest_batch_bytes``
at a time; full chunks are staged in Redis as soon as they are built, and the
request commits them all at once at the end (see store.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import anyio
import numpy as np

from ..core.errors import MalformedDocument, PayloadTooLarge, TokenOutOfVocabulary
from .packing import ChunkBuilder, Packer
from .streams import pulled
from .tables import ArrowDocuments, IdsRows
from .tokenization import TokenizerInfo, encode_texts, word_starts

Document = str | np.ndarray  # text, or pre-tokenized ids
#: how a plain-text body is cut into documents: whole, one per line, or one per blank-line-separated paragraph
TextSplit = Literal["none", "line", "paragraph"]
SPLITS: tuple[TextSplit, ...] = get_args(TextSplit)
#: the media types a body of NDJSON documents may be sent as
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/ndjson")


async def limited(stream: AsyncIterator[bytes], limit: int, what: str = "request body") -> AsyncIterator[bytes]:
    """Pass body chunks through, failing once more than ``limit`` bytes came (``what``: the bytes counted,
    for the message: the body on the wire, or decoded)."""
    seen = 0
    async for piece in stream:
        seen += len(piece)
        if seen > limit:
            raise PayloadTooLarge(f"{what} exceeds the {limit}-byte limit", limit=limit)
        yield piece


async def lines(stream: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Split a byte stream into numbered lines (1-based, without the newline).

    Linear in the body: each piece is searched once, and a line's pieces are joined once, when its newline
    comes (re-splitting a growing buffer per piece would be quadratic in a long line)."""
    pending: list[bytes] = []
    number = 0
    async for piece in stream:
        start = 0
        while (end := piece.find(b"\n", start)) >= 0:
            pending.append(piece[start:end])
            number += 1
            yield number, b"".join(pending)
            pending = []
            start = end + 1
        if start < len(piece):
            pending.append(piece[start:])
    if pending:
        yield number + 1, b"".join(pending)


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedDocument(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def parse_ndjson_line(number: int, raw: bytes, vocab_size: int, reserved: np.ndarray | None = None) -> Document | None:
    """One NDJSON document: text, or ids within the vocabulary and none of them ``reserved`` (the special
    tokens the service places itself: cls/bos, sep/eos, pad, mask; unk is an ordinary token here)."""
    raw = raw.strip()
    if not raw:
        return None
    where = f"line {number}"
    try:
        obj = json.loads(_utf8(raw, where))
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise MalformedDocument(f"{where}: not JSON ({reason})", line=number) from None
    if not isinstance(obj, dict) or ("text" in obj) == ("ids" in obj):
        raise MalformedDocument(f'{where}: expected an object with exactly one of "text" or "ids"', line=number)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise MalformedDocument(f'{where}: "text" must be a string', line=number)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            raise MalformedDocument(f"{where}: text is not valid Unicode ({exc.reason})", line=number) from None
        return text
    ids = obj["ids"]
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise MalformedDocument(f'{where}: "ids" must be a list of integers', line=number)
    try:
        arr = np.array(ids, dtype=np.int64)
    except OverflowError:
        arr = None
    if arr is None or (len(arr) and (arr.min() < 0 or arr.max() >= vocab_size)):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise TokenOutOfVocabulary(
            f"{where}: id {bad} is outside the vocabulary [0, {vocab_size})", line=number, id=bad
        )
    if reserved is not None and len(arr) and reserved[arr].any():
        bad = int(arr[reserved[arr]][0])
        raise MalformedDocument(
            f"{where}: id {bad} is a special token; pre-tokenized ids are the document's own tokens "
            "(the service adds cls/sep itself, and pad/mask would be taken for padding or masks)",
            line=number, id=bad,
        )  # fmt: skip
    return arr


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A document as it arrived, parsed where the CPU work belongs (a worker thread, by :func:`parse`):
    an NDJSON line, or a body or line of text still in UTF-8 (see :func:`parse_one`)."""

    number: int  # the line number (0: the whole body)
    raw: bytes
    ndjson: bool
    vocab_size: int
    reserved: np.ndarray | None


def parse_one(doc: Unparsed) -> Document | None:
    """An unparsed document parsed: None for a blank one."""
    if doc.ndjson:
        return parse_ndjson_line(doc.number, doc.raw, doc.vocab_size, doc.reserved)
    text = _utf8(doc.raw, f"line {doc.number}" if doc.number else "body")
    if doc.number:
        text = text.rstrip("\r")
    return text if text.strip() else None


def parse(docs: list[Document | Unparsed]) -> list[Document]:
    """The documents of a batch, the unparsed ones parsed (CPU work: called off the event loop)."""
    out = []
    for d in docs:
        doc = parse_one(d) if isinstance(d, Unparsed) else d
        if doc is not None:
            out.append(doc)
    return out


def size_of(doc: Document | Unparsed) -> int:
    """Bytes a document stands for, for batching."""
    if isinstance(doc, Unparsed):
        return len(doc.raw)
    return len(doc) if isinstance(doc, str) else 4 * len(doc)


async def documents(
    body: AsyncIterator[bytes], media_type: str, split: str, vocab_size: int, reserved: np.ndarray | None = None
) -> AsyncIterator[Document | Unparsed]:
    """Documents of a body: NDJSON lines, or plain text split as asked. On the event loop only the lines are
    found: JSON and UTF-8 are parsed by :func:`parse`, off it (a line, or a body, may be up to the body
    limit). Paragraphs are the exception: finding them needs each line's text (to tell blank lines)."""
    if media_type in NDJSON_TYPES:
        async for number, raw in lines(body):
            yield Unparsed(number, raw, True, vocab_size, reserved)
        return
    # text/plain
    if split == "none":
        yield Unparsed(0, b"".join([p async for p in body]), False, vocab_size, reserved)
        return
    if split == "line":
        async for number, raw in lines(body):
            yield Unparsed(number, raw, False, vocab_size, reserved)
        return
    paragraphs = Paragraphs()
    async for number, raw in lines(body):
        para = paragraphs.add(_utf8(raw, f"line {number}").rstrip("\r"))
        if para is not None:
            yield para
    para = paragraphs.end()
    if para is not None:
        yield para


class Paragraphs:
    """Lines of plain text -> its paragraphs (``split=paragraph``): each run of non-blank lines, joined by
    newlines; blank (or whitespace-only) lines separate them. The one rule for the service's ingest and for
    files read ahead of an upload (``holdout.read_documents``)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(self, line: str) -> str | None:
        """Take the next line (without its line break); returns the paragraph it ends, if any."""
        if line.strip():
            self._lines.append(line)
            return None
        return self.end()

    def end(self) -> str | None:
        """At the end of the text: the paragraph still open, if any."""
        if not self._lines:
            return None
        para = "\n".join(self._lines)
        self._lines = []
        return para


@dataclass
class IngestStats:
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes: int = 0
    chunk_counts: list[int] = field(default_factory=list)


class Pipeline:
    """Tokenize + pack + build chunks; synchronous, run in a worker thread."""

    def __init__(self, info: TokenizerInfo, packing: str, seq_len: int, chunk_bytes: int, chunk_seqs: int) -> None:
        self.info = info
        self.packer = Packer(packing, seq_len, info.special_ids.get("cls"), info.special_ids.get("sep"))
        self.builder = ChunkBuilder(info.id_dtype, chunk_bytes, chunk_seqs)
        self.stats = IngestStats()
        self.token_counts = np.zeros(info.vocab_size, dtype=np.int64)  # for frequency-weighted replacements

    def feed(self, batch: list[Document | Unparsed]) -> list[bytes]:
        """Parse and tokenize a batch of documents; return the chunk blobs completed.

        Word starts are computed from the ids after tokenization, by one rule for text and
        pre-tokenized documents alike (``tokenization.word_starts``)."""
        docs = parse(batch)
        texts = [d for d in docs if isinstance(d, str)]
        t_ids, _, t_len = encode_texts(self.info, texts) if texts else (None, None, None)
        parts_ids, lengths = [], []
        t_pos = t_doc = 0
        for d in docs:
            if isinstance(d, str):
                n = int(t_len[t_doc])
                parts_ids.append(t_ids[t_pos : t_pos + n])
                t_pos += n
                t_doc += 1
            else:
                parts_ids.append(d)
                n = len(d)
            lengths.append(n)
        self.stats.documents += len(docs)
        if not parts_ids:
            return []
        return self.feed_ids(np.concatenate(parts_ids), np.array(lengths, np.int64), count=False)

    def feed_texts(self, texts: list[str]) -> list[bytes]:
        """A batch of text documents, already parsed (a text column); returns the chunk blobs completed."""
        self.stats.documents += len(texts)
        if not texts:
            return []
        ids, _, lengths = encode_texts(self.info, texts)
        return self.feed_ids(ids, lengths, count=False)

    def feed_ids(self, all_ids: np.ndarray, doc_lengths: np.ndarray, *, count: bool = True) -> list[bytes]:
        """Documents as their ids, concatenated, and each one's length (checked by the caller); returns the
        chunk blobs completed."""
        if count:
            self.stats.documents += len(doc_lengths)
        if not len(doc_lengths):
            return []
        self.token_counts += np.bincount(all_ids, minlength=len(self.token_counts))
        seqs = self.packer.feed(all_ids, word_starts(self.info, all_ids, doc_lengths), doc_lengths)
        return self._add(seqs)

    def finish(self) -> list[bytes]:
        blobs = self._add(self.packer.flush())
        if self.builder.count:
            blobs.append(self._build())
        return blobs

    def _add(self, seqs: list[tuple[np.ndarray, np.ndarray]]) -> list[bytes]:
        blobs = []
        for ids, ws in seqs:
            if not self.builder.fits(len(ids)):
                blobs.append(self._build())
            self.builder.add(ids, ws)
            self.stats.sequences += 1
            self.stats.tokens += len(ids)
        return blobs

    def _build(self) -> bytes:
        self.stats.chunk_counts.append(self.builder.count)
        blob = self.builder.build()
        self.stats.bytes += len(blob)
        return blob


async def run_pipeline(
    pipeline: Pipeline, docs: AsyncIterator[Document | Unparsed], batch_bytes: int, stage, batch_docs: int = 8192,
    limiter: anyio.CapacityLimiter | None = None,
) -> IngestStats:
    """Drive ``docs`` through ``pipeline``; ``stage(blob)`` stores each chunk.

    A batch goes to the tokenizer at ``batch_bytes`` of text or ``batch_docs`` documents, whichever comes
    first: each document costs objects of its own (its encoding), so many tiny ones must not pile up.
    Tokenizing runs on worker threads (``limiter``: the process's CPU pool)."""
    batch: list[Document | Unparsed] = []
    size = 0
    async for doc in docs:
        batch.append(doc)
        size += size_of(doc)
        if size >= batch_bytes or len(batch) >= batch_docs:
            for blob in await anyio.to_thread.run_sync(pipeline.feed, batch, limiter=limiter):
                await stage(blob)
            batch, size = [], 0
    if batch:
        for blob in await anyio.to_thread.run_sync(pipeline.feed, batch, limiter=limiter):
            await stage(blob)
    for blob in await anyio.to_thread.run_sync(pipeline.finish, limiter=limiter):
        await stage(blob)
    return pipeline.stats


def _text_slices(texts: list[str], batch_bytes: int, batch_docs: int) -> list[list[str]]:
    """A record batch's texts in tokenizer-sized slices (as :func:`run_pipeline` batches NDJSON)."""
    out, start, size = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= batch_bytes or i + 1 - start >= batch_docs:
            out.append(texts[start : i + 1])
            start, size = i + 1, 0
    if start < len(texts):
        out.append(texts[start:])
    return out


async def run_arrow(
    pipeline: Pipeline, reader: ArrowDocuments, batch_bytes: int, stage, batch_docs: int = 8192,
    limiter: anyio.CapacityLimiter | None = None,
) -> IngestStats:
    """Drive an Arrow stream's record batches through ``pipeline``; ``stage(blob)`` stores each chunk.

    Reading a record batch waits for the network, so it runs on anyio's shared threads; tokenizing and
    packing run on ``limiter`` (the CPU pool), a text batch in slices of ``batch_bytes``/``batch_docs``."""
    async for docs in pulled(reader.next):
        if isinstance(docs, IdsRows):
            parts = [functools.partial(pipeline.feed_ids, docs.ids, docs.lengths)]
        else:
            parts = [functools.partial(pipeline.feed_texts, s) for s in _text_slices(docs, batch_bytes, batch_docs)]
        for part in parts:
            for blob in await anyio.to_thread.run_sync(part, limiter=limiter):
                await stage(blob)
    for blob in await anyio.to_thread.run_sync(pipeline.finish, limiter=limiter):
        await stage(blob)
    return pipeline.stats
