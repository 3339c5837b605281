"""Packing documents into sequences of at most L tokens, and sequences into chunks.

Packing modes (the README's "Packing"; the chunk layout is in docs/storage.md):

``complete``
    RoBERTa FULL-SENTENCES: documents form one stream with ``sep`` after each,
    cut into blocks of L-1 tokens, each prefixed with ``cls``. Blocks cross
    document boundaries. The short tail left when an ingest request ends is
    stored as a short sequence (requests are atomic, so nothing carries over).
``doc``
    Never cross a document boundary: each document is cut into pieces of L-2
    tokens, each stored as ``cls`` piece ``sep``.
``none``
    One sequence per document: ``cls`` first L-2 tokens ``sep``; the rest of a
    long document is dropped.

A *chunk* is one immutable Redis string holding many sequences::

    count:u32 | count x (offset:u32, ntok:u32) | records...
    record = ntok ids (uint16 or uint32, little-endian)
             | ceil(ntok/8) bytes of word-start bits (bit i of byte i//8, LSB first)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from ..core.arrays import runs

#: how documents become sequences: packed across documents, one document per sequence (split when
#: long), or one sequence per document (truncated)
Packing = Literal["complete", "doc", "none"]
PACKING_MODES: tuple[Packing, ...] = get_args(Packing)

Sequence = tuple[np.ndarray, np.ndarray]  # (ids, word_start)

# Room left for Redis's own string header below the target chunk size.
_ALLOCATOR_SLACK = 64


class Packer:
    """Turn batches of tokenized documents into sequences, one mode each."""

    def __init__(self, mode: str, seq_len: int, cls_id: int | None, sep_id: int | None) -> None:
        if mode not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, not {mode!r}")
        self.mode = mode
        self.seq_len = seq_len
        self.cls = cls_id
        self.sep = sep_id
        self._head = np.array([] if cls_id is None else [cls_id], dtype=np.int64)
        self._tail = np.array([] if sep_id is None else [sep_id], dtype=np.int64)
        # complete mode: the stream not yet cut into a full block
        self._carry_ids = np.empty(0, dtype=np.int64)
        self._carry_ws = np.empty(0, dtype=bool)
        if seq_len - len(self._head) - (0 if mode == "complete" else len(self._tail)) < 1:
            raise ValueError(f"sequence length {seq_len} leaves no room for tokens")

    def feed(self, ids: np.ndarray, word_start: np.ndarray, doc_lengths: np.ndarray) -> list[Sequence]:
        if self.mode == "complete":
            return self._feed_complete(ids, word_start, doc_lengths)
        room = self.seq_len - len(self._head) - len(self._tail)
        out: list[Sequence] = []
        begin = 0
        for n in doc_lengths.tolist():
            end = begin + n
            stops = range(begin, end, room) if self.mode == "doc" else ([begin] if n else [])
            for a in stops:
                b = min(a + room, end)
                out.append(self._wrap(ids[a:b], word_start[a:b], self._tail))
            begin = end
        return out

    def _feed_complete(self, ids: np.ndarray, word_start: np.ndarray, doc_lengths: np.ndarray) -> list[Sequence]:
        nonempty = doc_lengths[doc_lengths > 0]
        if self.sep is not None and len(nonempty):
            ends = np.cumsum(nonempty)  # insert sep after each document
            ids = np.insert(ids, ends, self.sep)
            word_start = np.insert(word_start, ends, True)
        stream_ids = np.concatenate([self._carry_ids, ids])
        stream_ws = np.concatenate([self._carry_ws, word_start])
        room = self.seq_len - len(self._head)
        full = len(stream_ids) // room * room
        out = [
            self._wrap(stream_ids[a : a + room], stream_ws[a : a + room], np.empty(0, dtype=np.int64))
            for a in range(0, full, room)
        ]
        self._carry_ids, self._carry_ws = stream_ids[full:], stream_ws[full:]
        return out

    def flush(self) -> list[Sequence]:
        """End of the request: the short tail of the stream, if any."""
        if self.mode != "complete" or len(self._carry_ids) == 0:
            return []
        seq = self._wrap(self._carry_ids, self._carry_ws, np.empty(0, dtype=np.int64))
        self._carry_ids = self._carry_ids[:0]
        self._carry_ws = self._carry_ws[:0]
        return [seq]

    def _wrap(self, ids: np.ndarray, ws: np.ndarray, tail: np.ndarray) -> Sequence:
        out_ids = np.concatenate([self._head, ids, tail])
        out_ws = np.concatenate([np.ones(len(self._head), bool), ws, np.ones(len(tail), bool)])
        if len(out_ws) > len(self._head):
            out_ws[len(self._head)] = True  # a sequence's first real token starts a word
        return out_ids, out_ws


@dataclass
class ChunkBuilder:
    """Accumulate sequences into one chunk blob (see the module docstring)."""

    dtype: np.dtype
    max_bytes: int
    max_sequences: int
    _records: list[bytes] = field(default_factory=list)
    _ntok: list[int] = field(default_factory=list)
    _bytes: int = 0

    def fits(self, ntok: int) -> bool:
        """Would a record of ``ntok`` tokens keep the blob within ``max_bytes``?

        Chunks are closed *before* they pass the target: allocators round a
        blob up to their next size class, so a blob just over a power of two
        would waste up to a quarter of its memory.
        """
        if self.count == 0:
            return True
        grown = 4 + 8 * (self.count + 1) + self._bytes + record_length(ntok, self.dtype.itemsize)
        return grown <= self.max_bytes - _ALLOCATOR_SLACK and self.count < self.max_sequences

    def add(self, ids: np.ndarray, word_start: np.ndarray) -> None:
        rec = ids.astype(self.dtype).tobytes() + np.packbits(word_start, bitorder="little").tobytes()
        self._records.append(rec)
        self._ntok.append(len(ids))
        self._bytes += len(rec)

    @property
    def count(self) -> int:
        return len(self._records)

    @property
    def tokens(self) -> int:
        return sum(self._ntok)


    def build(self) -> bytes:
        """The blob; resets the builder."""
        count = self.count
        table = np.empty((count, 2), dtype="<u4")
        pos = 4 + 8 * count
        for k, rec in enumerate(self._records):
            table[k] = pos, self._ntok[k]
            pos += len(rec)
        blob = b"".join([struct.pack("<I", count), table.tobytes(), *self._records])
        self._records, self._ntok, self._bytes = [], [], 0
        return blob


def record_length(ntok: int, itemsize: int) -> int:
    return ntok * itemsize + (ntok + 7) // 8


def decode_records(records: list[tuple[int, bytes]], dtype: np.dtype, seq_len: int) -> tuple[np.ndarray, ...]:
    """Whole records (``ntok`` ids then word-start bytes each) -> ``assemble``'s arrays."""
    w = dtype.itemsize
    lengths = np.array([n for n, _ in records], dtype=np.int64)
    return assemble(lengths, b"".join(rec[: record_length(n, w)] for n, rec in records), dtype, seq_len, words=True)


def assemble(
    lengths: np.ndarray, joined: bytes | memoryview, dtype: np.dtype, seq_len: int, *, words: bool,
    whole: bool | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Fetched sequences -> ``(ids (B, L) int32, word_start (B, L) bool or None, lengths)``.

    ``joined`` holds the sequences back to back: each one's ids, or with
    ``words`` its whole record (ids, then ``ceil(n / 8)`` word-start bytes);
    ``whole`` says that it holds whole records even without ``words`` (their
    word-start bits are then skipped). Vectorized: a reshape when every
    sequence is full, else one gather.
    """
    whole = words if whole is None else whole or words
    n = np.asarray(lengths, dtype=np.int64)
    b, w = len(n), dtype.itemsize
    buf = np.frombuffer(joined, dtype=np.uint8)
    bit_bytes = (n + 7) // 8
    size = n * w + (bit_bytes if whole else 0)  # bytes per sequence in ``joined``
    begin = np.cumsum(size) - size
    full = b > 0 and bool((n == seq_len).all())
    if full:  # the common case: rows of equal records
        rows = buf.reshape(b, -1)
        ids = rows[:, : seq_len * w].view(dtype).astype(np.int32)
    else:
        ids = np.zeros((b, seq_len), dtype=np.int32)
        ids[np.arange(seq_len)[None, :] < n[:, None]] = (buf[runs(begin, n * w)] if whole else buf).view(dtype)
    if not words:
        return ids, None, n
    if full:
        packed = rows[:, seq_len * w :]
    else:
        width = int(bit_bytes.max()) if b else 0
        packed = np.zeros((b, width), dtype=np.uint8)
        packed[np.arange(width)[None, :] < bit_bytes[:, None]] = buf[runs(begin + n * w, bit_bytes)]
    bits = np.unpackbits(packed, axis=1, bitorder="little").view(bool)
    ws = np.zeros((b, seq_len), dtype=bool)
    cols = min(bits.shape[1], seq_len)
    ws[:, :cols] = bits[:, :cols] & (np.arange(cols)[None, :] < n[:, None])
    return ids, ws, n


def split_chunk(blob: bytes, itemsize: int) -> tuple[np.ndarray, memoryview]:
    """A whole chunk blob -> its sequences' lengths and their records, back to back (as ``assemble`` takes)."""
    (count,) = struct.unpack_from("<I", blob, 0)
    table = np.frombuffer(blob, dtype="<u4", count=2 * count, offset=4).reshape(count, 2)
    return table[:, 1].astype(np.int64), memoryview(blob)[4 + 8 * count :]
