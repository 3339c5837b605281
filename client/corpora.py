"""Columnar corpora for ingest: Parquet, Arrow and saved Hugging Face datasets, read in record batches.

Only the one column that matters is read, a record batch at a time (never a
whole file in memory), and sent as an Arrow IPC stream, the body the service
reads as it arrives. ``pyarrow`` is imported only here, when such a corpus is
ingested: the base client install does not need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import CorpusError

ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
#: record batches sent are cut to about this many bytes (the service tokenizes each in slices)
BATCH_BYTES = 4 << 20
#: rows read from a source per record batch before that cut
BATCH_ROWS = 8192
#: a Parquet file is ingested in units of consecutive row groups of about this many (uncompressed) bytes
UNIT_BYTES = 256 << 20


def pyarrow():  # noqa: ANN201 - the module
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CorpusError("reading Parquet, Arrow or Hugging Face datasets needs pyarrow: "
                          "pip install 'maskserve[corpora]'") from None  # fmt: skip
    return pa


@dataclass(frozen=True)
class Column:
    """The column to send: its name and whether it holds text or pre-tokenized ids."""

    name: str = "text"
    ids: bool = False

    @classmethod
    def of(cls, text_column: str | None, ids_column: str | None) -> "Column":
        if text_column is not None and ids_column is not None:
            raise CorpusError("name a text column or an ids column, not both")
        return cls(ids_column, True) if ids_column is not None else cls(text_column or "text", False)

    def params(self) -> dict[str, str]:
        return {"ids_column" if self.ids else "text_column": self.name}

    def check(self, schema: Any, where: str) -> None:  # noqa: ANN401 - a pyarrow schema
        """A clear error, before anything is sent, for a missing column or one of the wrong type."""
        pa = pyarrow()
        have = ", ".join(f"{f.name}: {f.type}" for f in schema) or "none"
        if self.name not in schema.names:
            raise CorpusError(f"{where} has no column {self.name!r} (its columns: {have})")
        t = schema.field(self.name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        ok = (listy and pa.types.is_integer(t.value_type)) if self.ids else (
            pa.types.is_string(t) or pa.types.is_large_string(t))  # fmt: skip
        if not ok:
            want = "lists of integers (token ids)" if self.ids else "strings (use ids_column for token ids)"
            raise CorpusError(f"{where}: column {self.name!r} holds {t}, not {want}")


@dataclass(frozen=True)
class Unit:
    """One request's worth of a columnar corpus: a file, or a run of a Parquet file's row groups."""

    path: Path
    kind: str  # "parquet" or "arrow"
    row_groups: tuple[int, ...] | None = None  # parquet: these row groups only

    def describe(self) -> str:
        if self.row_groups is None:
            return str(self.path)
        return f"{self.path} [row groups {self.row_groups[0]}-{self.row_groups[-1]}]"


def parquet_units(path: Path, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """A Parquet file in runs of consecutive row groups of about ``unit_bytes`` each; fixed by the file alone
    (not by how many run at once), so a re-run cuts it the same way."""
    meta = _parquet(path).metadata
    units, run, size = [], [], 0
    for g in range(meta.num_row_groups):
        run.append(g)
        size += meta.row_group(g).total_byte_size
        if size >= unit_bytes:
            units.append(Unit(path, "parquet", tuple(run)))
            run, size = [], 0
    if run or not units:
        units.append(Unit(path, "parquet", tuple(run)))
    return units if len(units) > 1 else [Unit(path, "parquet")]


def _parquet(path: Path):  # noqa: ANN202
    pa = pyarrow()
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None


def _arrow_reader(path: Path):  # noqa: ANN202 - a pyarrow reader of either IPC format
    pa = pyarrow()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        pass
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{path}: not an Arrow IPC file or stream ({exc})") from None


def unit_batches(unit: Unit, column: Column, rows: int = BATCH_ROWS) -> Iterator[Any]:
    """The record batches of one unit's column, read as they are sent."""
    pa = pyarrow()
    try:
        if unit.kind == "parquet":
            pf = _parquet(unit.path)
            column.check(pf.schema_arrow, str(unit.path))
            groups = list(unit.row_groups) if unit.row_groups is not None else None
            yield from pf.iter_batches(batch_size=rows, row_groups=groups, columns=[column.name])
            return
        reader = _arrow_reader(unit.path)
        column.check(reader.schema, str(unit.path))
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select([column.name])
        else:
            for batch in reader:
                yield batch.select([column.name])
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{unit.describe()}: could not be read ({exc})") from None


def hf_files(directory: Path, split: str | None) -> list[Path]:
    """The Arrow files of a Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or one split of a
    DatasetDict), in order; or a cache directory's ``*-<split>.arrow`` / ``*-<split>-NNNNN-of-NNNNN.arrow``."""
    directory = Path(directory)
    if (directory / "dataset_dict.json").exists():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        if split is None:
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise CorpusError(f"{directory}: a DatasetDict with splits {splits}; name one with --split")
        return hf_files(directory / split, None)
    if (directory / "state.json").exists():
        state = json.loads((directory / "state.json").read_text())
        return [directory / f["filename"] for f in state.get("_data_files", [])]
    name = split or "train"
    files = sorted(directory.glob(f"*-{name}.arrow")) + sorted(directory.glob(f"*-{name}-*-of-*.arrow"))
    if not files:
        raise CorpusError(f"{directory}: no save_to_disk dataset (state.json or dataset_dict.json) and no cached "
                          f"Arrow files of split {name!r}")  # fmt: skip
    return files


def dataset_batches(dataset: Any, column: Column, rows: int = BATCH_ROWS) -> Iterator[Any]:  # noqa: ANN401
    """Record batches of a ``datasets.Dataset`` (its Arrow table, zero copy) or ``IterableDataset``."""
    pa = pyarrow()
    if hasattr(dataset, "with_format") and hasattr(dataset, "data"):  # a map-style Dataset
        column.check(dataset.data.schema, "the dataset")
        for table in dataset.with_format("arrow").iter(batch_size=rows):
            yield from table.select([column.name]).to_batches()
        return
    for rows_ in dataset.iter(batch_size=rows):
        if column.name not in rows_:
            raise CorpusError(f"the dataset has no column {column.name!r} (its columns: {sorted(rows_)})")
        values = rows_[column.name]
        array = pa.array(values, type=pa.list_(pa.int64()) if column.ids else pa.string())
        yield pa.record_batch([array], names=[column.name])


def arrow_body(batches: Iterable[Any], on_rows: Callable[[int], None] | None = None,
               batch_bytes: int = BATCH_BYTES) -> Iterator[bytes]:  # fmt: skip
    """Record batches as an Arrow IPC stream body, a piece per batch (batches cut to about ``batch_bytes``)."""
    pa = pyarrow()
    sink = _Drain()
    writer = None
    for batch in batches:
        if writer is None:
            writer = pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), batch.schema)
        for part in _cut(batch, batch_bytes):
            writer.write_batch(part)
            yield sink.take()
            if on_rows:
                on_rows(part.num_rows)
    if writer is not None:
        writer.close()
        yield sink.take()


class _Drain:
    """A write-only file whose bytes are taken as they come (the stream writer's sink)."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:  # noqa: ANN401 - bytes or a buffer
        self._parts.append(bytes(data))
        return len(self._parts[-1])

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


def _cut(batch: Any, batch_bytes: int) -> Iterator[Any]:  # noqa: ANN401
    n = batch.num_rows
    if n <= 1 or batch.nbytes <= batch_bytes:
        yield batch
        return
    step = max(1, n * batch_bytes // batch.nbytes)
    for start in range(0, n, step):
        yield batch.slice(start, step)
