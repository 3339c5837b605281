"""Columnar bodies: an Arrow IPC stream of record batches, one column read as documents.

The client reads Parquet, Arrow files and saved Hugging Face datasets in record
batches and sends the one column that matters as an Arrow IPC *stream*
(``application/vnd.apache.arrow.stream``), the columnar format that can be read
as it arrives. Here each record batch is read in a worker thread (the reader
pulls the body through :class:`~.streams.BlockingBody`), its column checked and
turned into documents: a list of strings (a text column) or the flat ids and
lengths of its rows (an ids column, checked and packed without a Python object
per token). A Parquet file sent as it is (``application/vnd.apache.parquet``)
is spooled to a temporary file first (its footer, at the end, says where the
rows are), then read the same way, a record batch at a time.

Nulls are refused, as ``{"text": null}`` is in NDJSON: a corpus with holes is
filtered by its owner, not silently shortened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from ..core.errors import MalformedDocument, PayloadTooLarge, TokenOutOfVocabulary
from .streams import BlockingBody

ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
ColumnKind = str  # "text" or "ids"


@dataclass(frozen=True, slots=True)
class IdsRows:
    """Rows of pre-tokenized ids: all rows' ids concatenated, and each row's length."""

    ids: np.ndarray
    lengths: np.ndarray


def _is_text(t: pa.DataType) -> bool:
    view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (view is not None and view(t))


def _is_ids(t: pa.DataType) -> bool:
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return lists and pa.types.is_integer(t.value_type)


def check_schema(schema: pa.Schema, column: str, kind: ColumnKind) -> None:
    """Refuse a stream without ``column`` or with a column of the wrong type, before any row is read."""
    have = ", ".join(f"{f.name}: {f.type}" for f in schema) or "none"
    if column not in schema.names:
        raise MalformedDocument(f"the Arrow stream has no column {column!r} (its columns: {have})", column=column)
    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if kind == "text" and not _is_text(t):
        raise MalformedDocument(
            f"text column {column!r} holds {t}, not strings (for pre-tokenized ids name it as the ids column)",
            column=column,
        )
    if kind == "ids" and not _is_ids(t):
        raise MalformedDocument(f"ids column {column!r} holds {t}, not lists of integers", column=column)


class ArrowDocuments:
    """Record batches of an Arrow IPC stream body -> documents; :meth:`next` runs in a worker thread."""

    def __init__(self, body: BlockingBody | None, column: str, kind: ColumnKind, vocab_size: int,
                 reserved: np.ndarray | None, max_batch_bytes: int) -> None:  # fmt: skip
        self._body = body
        self._column, self._kind = column, kind
        self._vocab_size, self._reserved = vocab_size, reserved
        self._max_batch_bytes = max_batch_bytes
        self._reader: pa.ipc.RecordBatchStreamReader | None = None
        self.rows = 0  # rows read so far (a row's number in errors is 0-based over the whole stream)

    def _next_batch(self) -> pa.RecordBatch | None:
        try:
            if self._reader is None:
                self._reader = pa.ipc.open_stream(self._body)
                check_schema(self._reader.schema, self._column, self._kind)
            return self._reader.read_next_batch()
        except StopIteration:
            return None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
            raise MalformedDocument(f"not a readable Arrow IPC stream after {self._body.consumed} bytes: {exc}") from None

    def next(self) -> list[str] | IdsRows | None:
        """The next record batch's documents; None at the end of the stream."""
        batch = self._next_batch()
        if batch is None:
            return None
        if batch.nbytes > self._max_batch_bytes:
            raise PayloadTooLarge(
                f"a record batch of {batch.nbytes} bytes exceeds the {self._max_batch_bytes}-byte limit per batch; "
                "send smaller record batches", limit=self._max_batch_bytes,
            )  # fmt: skip
        col = batch.column(self._column)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        first, self.rows = self.rows, self.rows + len(col)
        if col.null_count:
            row = first + int(np.flatnonzero(np.asarray(col.is_null()))[0])
            raise MalformedDocument(f"row {row}: null in column {self._column!r}", row=row, column=self._column)
        return col.to_pylist() if self._kind == "text" else self._ids(col, first)

    def _ids(self, col: pa.Array, first: int) -> IdsRows:
        """The rows' ids, flat, each checked against the vocabulary and the reserved (special) ids."""
        if pa.types.is_fixed_size_list(col.type):
            lengths = np.full(len(col), col.type.list_size, np.int64)
        else:
            offsets = np.asarray(col.offsets)
            lengths = np.diff(offsets).astype(np.int64)
        values = col.flatten()
        if values.null_count:
            at = int(np.flatnonzero(np.asarray(values.is_null()))[0])
            row = first + int(np.searchsorted(np.cumsum(lengths), at, side="right"))
            raise MalformedDocument(f"row {row}: a null id in column {self._column!r}", row=row, column=self._column)
        ids = np.asarray(values).astype(np.int64, copy=False)
        if len(ids):
            bad = (ids < 0) | (ids >= self._vocab_size)
            if self._reserved is not None:
                bad |= self._reserved[np.clip(ids, 0, self._vocab_size - 1)] & ~bad
            if bad.any():
                self._refuse(ids, lengths, int(np.flatnonzero(bad)[0]), first)
        return IdsRows(ids, lengths)

    def _refuse(self, ids: np.ndarray, lengths: np.ndarray, at: int, first: int) -> None:
        row = first + int(np.searchsorted(np.cumsum(lengths), at, side="right"))
        bad = int(ids[at])
        if not 0 <= bad < self._vocab_size:
            raise TokenOutOfVocabulary(
                f"row {row}: id {bad} is outside the vocabulary [0, {self._vocab_size})", row=row, id=bad
            )
        raise MalformedDocument(
            f"row {row}: id {bad} is a special token; pre-tokenized ids are the document's own tokens "
            "(the service adds cls/sep itself, and pad/mask would be taken for padding or masks)", row=row, id=bad,
        )  # fmt: skip


class ParquetDocuments(ArrowDocuments):
    """A Parquet file's column -> documents, a record batch of ``rows`` rows at a time (:meth:`next` runs in a
    worker thread). A Parquet body is spooled to a file first: its footer, at the end, says where the rows are."""

    def __init__(self, path: str, column: str, kind: ColumnKind, vocab_size: int, reserved: np.ndarray | None,
                 max_batch_bytes: int, rows: int = 4096) -> None:  # fmt: skip
        super().__init__(None, column, kind, vocab_size, reserved, max_batch_bytes)
        self._path, self._rows = path, rows
        self._batches = None

    def _next_batch(self) -> pa.RecordBatch | None:
        try:
            if self._batches is None:
                pf = pq.ParquetFile(self._path)
                check_schema(pf.schema_arrow, self._column, self._kind)
                self._batches = pf.iter_batches(batch_size=self._rows, columns=[self._column])
            return next(self._batches)
        except StopIteration:
            return None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
            raise MalformedDocument(f"not a readable Parquet file: {exc}") from None
