"""Fetch sequences by id and mask them: the path every batch takes.

Shared by the stateless batch route, the masking report and jobs. Dynamic
masks are computed here; static ones are read from their cache in the same
Redis round trip as the data and applied, never recomputed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
from redis.exceptions import ResponseError

from ..core.errors import Conflict, DatasetEmpty, DatasetNotFound, StaticMasksMissing
from ..core.work import Workload
from ..data.catalog import Catalog, Chunks, DatasetRuntime
from ..data.packing import assemble
from ..masking.masking import Masked, MaskSpec, Vocab, mask_batch
from ..masking.params import MaskingParams
from ..masking.static import apply, cache_id
from ..store.chunks import RowsRead
from ..store.store import StaleCounters
from .bodies import Piece, render
from .params import OutputParams

T = TypeVar("T")


@dataclass
class DatasetSnapshot:
    """A dataset as one batch sees it: its runtime (with the chunk table) and the
    counters (sequences, chunks) the batch is drawn against."""

    rt: DatasetRuntime
    num_sequences: int
    num_chunks: int


async def open_dataset(catalog: Catalog, name: str, counters: tuple[str, int, int] | None = None) -> DatasetSnapshot:
    """The dataset as it is now: runtime with its chunk table, and counters
    (read from Redis, unless the caller passes those it knows)."""
    if counters is None:
        counters = await catalog.store.counters(name)
    if counters is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    uid, num_sequences, num_chunks = counters
    if num_sequences == 0:
        raise DatasetEmpty(f"dataset {name!r} has no sequences yet; ingest documents first", dataset=name)
    rt = await catalog.runtime(name, uid)
    if rt.uid != uid:  # re-created between the two reads: never pair one's counters with the other
        raise Conflict(f"dataset {name!r} was re-created while the batch was read; retry")
    rt.seen = (num_sequences, num_chunks)
    rt = await catalog.with_chunks(rt, num_chunks)
    return DatasetSnapshot(rt, num_sequences, num_chunks)


async def draw_with_retry(catalog: Catalog, name: str, draw: Callable[[DatasetSnapshot, bool], Awaitable[T]]) -> T:
    """Run ``draw(ds, checked)`` against the dataset's counters, read optimistically, and once more
    against the current ones when those turn out stale.

    The counters this process read last (kept on the dataset's runtime, so they
    are always that dataset's) are used at once, and the batch's fetch
    script checks them (``checked``) in the same round trip as the data: no
    separate read on the hot path. When they moved on (an ingest, a delete, a
    re-creation), the script answers with the current ones and the batch is
    drawn again from those, so a batch is always drawn from the counters as they
    were when its sequences were read.
    """
    known = catalog.known(name)
    if known is None:
        return await draw(await open_dataset(catalog, name), False)
    try:
        return await draw(await open_dataset(catalog, name, known), True)
    except StaleCounters as stale:
        if stale.current is None:
            catalog.forget(name)
            raise DatasetNotFound(f"no dataset named {name!r}", dataset=name) from None
        current: tuple[str, int, int] | None = stale.current
    except (Conflict, StaticMasksMissing):  # a chunk or cache the known counters imply is gone: read them
        current = None
    return await draw(await open_dataset(catalog, name, current), False)


@dataclass
class Read:
    """A dataset's rows of a batch as read from Redis (with their static masks), before masking."""

    rt: DatasetRuntime
    seq_ids: np.ndarray
    lengths: np.ndarray
    joined: bytes | memoryview
    words: bool
    whole: bool  # ``joined`` holds whole records (ids and word-start bits), even without ``words``
    seed: int
    epoch: int
    spec: MaskSpec
    vocab: Vocab
    static: tuple[np.ndarray, bytes | memoryview] | None  # the rows' mask entries and records

    def assemble(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(ids (B, L) int32, word starts or None, lengths)``."""
        return assemble(self.lengths, self.joined, self.rt.id_dtype, self.rt.seq_len, words=self.words,
                        whole=self.whole)  # fmt: skip

    def compute(self) -> Masked:
        """The rows masked for their epoch (CPU work)."""
        ids, ws, n = self.assemble()
        if self.static is not None:
            out = apply(ids, n, self.static[0], self.static[1], self.rt.id_dtype, self.rt.vocab.pad_id,
                        self.rt.vocab.is_special)  # fmt: skip
            out.word_start = ws
            return out
        return mask_batch(ids, n, self.seq_ids, seed=self.seed, epoch=self.epoch, spec=self.spec, vocab=self.vocab,
                          word_start=ws)  # fmt: skip


async def prepare_batch(
    catalog: Catalog, ds: DatasetSnapshot, seq_ids: np.ndarray, *, seed: int, epoch: int, params: MaskingParams,
    spec: MaskSpec, need_words: bool = False, checked: bool = False, step: int | None = None,
) -> Callable[[], Masked]:  # fmt: skip
    """Prepare a batch: read the sequences ``seq_ids`` (and their static masks) and return the CPU work
    that masks them for ``epoch``, to run where the caller chooses (see ``work.Workload.run``).
    ``need_words`` also returns word starts; ``checked``: have the fetch verify ``ds``'s counters
    (see ``draw_with_retry``).
    ``step``: where the batch sits for a mask-rate schedule counted in steps (callers without steps
    count one per epoch)."""
    read = await read_batch(catalog, ds, seq_ids, seed=seed, epoch=epoch, params=params, spec=spec,
                            need_words=need_words, checked=checked, step=step)  # fmt: skip
    return read.compute


async def read_batch(
    catalog: Catalog, ds: DatasetSnapshot, seq_ids: np.ndarray, *, seed: int, epoch: int, params: MaskingParams,
    spec: MaskSpec, need_words: bool = False, checked: bool = False, step: int | None = None,
) -> Read:  # fmt: skip
    """``prepare_batch``'s read: the rows and what masking them takes, not yet masked."""
    plan = await _plan(catalog, ds, seq_ids, seed=seed, epoch=epoch, params=params, spec=spec, need_words=need_words,
                       step=step)  # fmt: skip
    expect = (ds.rt.uid, ds.num_sequences, ds.num_chunks) if checked else None
    t0 = time.perf_counter()
    try:
        joined, records = await catalog.store.fetch_rows(plan.rows, expect)
    except ResponseError as exc:
        raise _read_failed(catalog, plan, exc) from None
    catalog.observe("fetch", time.perf_counter() - t0)
    return plan.read(joined, records)


@dataclass
class _Plan:
    """What reading a dataset's rows takes: where they lie (and their static masks), how to mask them."""

    rows: RowsRead
    rt: DatasetRuntime
    read: Callable[[bytes | memoryview, bytes | None], Read]  # the rows as fetched -> a Read


async def _plan(
    catalog: Catalog, ds: DatasetSnapshot, seq_ids: np.ndarray, *, seed: int, epoch: int, params: MaskingParams,
    spec: MaskSpec, need_words: bool, step: int | None,
) -> _Plan:  # fmt: skip
    if params.schedule != "constant":
        spec = params.spec_at(epoch, epoch if step is None else step)
    rt = ds.rt
    chunk, local = rt.locate(seq_ids)
    chunks = Chunks.of(chunk)
    static = params.mode == "static"
    need_words = need_words or (not static and spec.unit != "token")
    entries = await catalog.entries(rt, chunks, local, ds.num_sequences)
    masks = None
    if static:
        cache = cache_id(spec, seed, params.copies)
        mask_entries = await catalog.entries(
            rt, chunks, local * params.copies + epoch % params.copies, ds.num_sequences, cache, params.copies
        )
        if mask_entries is None:
            raise StaticMasksMissing(
                f"static masks (cache {cache}) are not built for all of dataset {rt.name!r}: "
                f"POST /v1/datasets/{rt.name}/static-masks with the same masking config, seed and copies",
                dataset=rt.name, cache=cache,
            )  # fmt: skip
        masks = (cache, mask_entries)
    vocab = rt.vocab
    if masks is None and spec.random_tokens == "frequency":
        vocab = await catalog.weighted_vocab(rt)
    rows = RowsRead(rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize, masks, need_words)

    def read(joined: bytes | memoryview, records: bytes | None) -> Read:
        static_part = None if masks is None else (masks[1][:, 1], records)
        whole = need_words or catalog.store.whole_records
        return Read(rt, seq_ids, entries[:, 1], joined, need_words, whole, seed, epoch, spec, vocab, static_part)

    return _Plan(rows, rt, read)


def _read_failed(catalog: Catalog, plan: _Plan, exc: ResponseError) -> Exception:
    """The error to raise for a fetch that failed: static masks dropped, or the dataset changed under it."""
    rt, masks = plan.rt, plan.rows.masks
    name = rt.name
    if masks is not None and "missing masks" in str(exc):
        catalog.table_cache.drop(rt.uid, masks[0])
        return StaticMasksMissing(f"static masks (cache {masks[0]}) of dataset {name!r} were dropped; build them again",
                                  dataset=name, cache=masks[0])  # fmt: skip
    return Conflict(f"dataset {name!r} changed while the batch was read; retry ({exc})")


async def prepare_parts(
    catalog: Catalog, parts: list[tuple[DatasetSnapshot, np.ndarray, np.ndarray, int]], b: int, *, seed: int,
    params: MaskingParams, spec: MaskSpec, checked: bool = False, step: int | None = None,
) -> Callable[[], Masked]:  # fmt: skip
    """A batch of ``b`` rows from several datasets or epochs: ``parts`` lists, per (dataset, epoch), the rows it
    fills and their sequence ids (``(ds, rows, seq_ids, epoch)``, rows in ``range(b)``). Every part is read in
    one round trip (one script call on one server); each row is masked exactly as in a batch of its own dataset
    and epoch. Dynamic parts that mask alike (one spec, one vocabulary) are masked in one pass over the joined
    rows. With ``checked``, each part's counters are checked as ``prepare_batch`` checks them."""
    rows = [p[1] for p in parts]
    if checked:
        reads = list(await asyncio.gather(*(
            read_batch(catalog, ds, ids, seed=seed, epoch=epoch, params=params, spec=spec, checked=True, step=step)
            for ds, _, ids, epoch in parts)))  # fmt: skip
    else:
        plans = [await _plan(catalog, ds, ids, seed=seed, epoch=epoch, params=params, spec=spec, need_words=False,
                             step=step) for ds, _, ids, epoch in parts]  # fmt: skip
        t0 = time.perf_counter()
        try:
            fetched = await catalog.store.fetch_many([plan.rows for plan in plans])
        except ResponseError:  # one part's chunk or masks gone: each part read alone says which, as it would alone
            fetched = []
            for plan in plans:
                try:
                    fetched.append(await catalog.store.fetch_rows(plan.rows))
                except ResponseError as exc:
                    raise _read_failed(catalog, plan, exc) from None
        catalog.observe("fetch", time.perf_counter() - t0)
        reads = [plan.read(joined, records) for plan, (joined, records) in zip(plans, fetched)]
    if len(reads) == 1:
        return reads[0].compute
    if not _mask_alike(reads):
        return lambda: stitch([(r, read.compute()) for r, read in zip(rows, reads)], b)

    def compute() -> Masked:  # the parts' rows assembled as one, put in batch order, masked in one pass
        first = reads[0]
        joined_ids, joined_ws, joined_n = assemble(np.concatenate([r.lengths for r in reads]),
                                                   b"".join(r.joined for r in reads), first.rt.id_dtype,
                                                   first.rt.seq_len, words=first.words, whole=first.whole)  # fmt: skip
        order = np.concatenate(rows)  # each assembled row's place in the batch
        ids = np.empty_like(joined_ids)
        ids[order] = joined_ids
        lengths = np.empty_like(joined_n)
        lengths[order] = joined_n
        ws = None
        if joined_ws is not None:
            ws = np.empty_like(joined_ws)
            ws[order] = joined_ws
        seq_ids = np.empty(b, dtype=np.int64)
        seq_ids[order] = np.concatenate([r.seq_ids for r in reads])
        epochs = np.empty(b, dtype=np.int64)
        epochs[order] = np.repeat([r.epoch for r in reads], [len(r.seq_ids) for r in reads])
        return mask_batch(ids, lengths, seq_ids, seed=seed, epoch=epochs, spec=first.spec, vocab=first.vocab,
                          word_start=ws)  # fmt: skip

    return compute


def _mask_alike(reads: list[Read]) -> bool:
    """Whether one ``mask_batch`` call masks every read's rows as its own would: dynamic, one spec and seed, and a
    vocabulary that draws alike (frequency-weighted replacements are each dataset's own)."""
    first = reads[0]
    v = first.vocab
    return all(
        r.static is None and r.spec == first.spec and r.seed == first.seed and r.words == first.words
        and r.whole == first.whole
        and r.rt.seq_len == first.rt.seq_len and r.rt.id_dtype == first.rt.id_dtype
        and r.spec.random_tokens != "frequency"
        and (r.vocab is v or (r.vocab.mask_id == v.mask_id and r.vocab.pad_id == v.pad_id
                              and np.array_equal(r.vocab.is_special, v.is_special)))
        for r in reads
    )  # fmt: skip


async def prepare_batch_rows(
    catalog: Catalog, ds: DatasetSnapshot, seq_ids: np.ndarray, epochs: np.ndarray, *, seed: int, params: MaskingParams,
    spec: MaskSpec, checked: bool = False, step: int | None = None,
) -> Callable[[], Masked]:  # fmt: skip
    """``prepare_batch`` with an epoch per row (a stateless batch that straddles an epoch boundary): each
    row is masked exactly as it would be in a batch of its own epoch."""
    distinct = np.unique(epochs)
    if len(distinct) == 1:
        return await prepare_batch(catalog, ds, seq_ids, seed=seed, epoch=int(distinct[0]), params=params, spec=spec,
                                   checked=checked, step=step)  # fmt: skip
    parts = [(ds, rows, seq_ids[rows], int(epoch)) for epoch in distinct for rows in [np.flatnonzero(epochs == epoch)]]
    return await prepare_parts(catalog, parts, len(seq_ids), seed=seed, params=params, spec=spec, checked=checked,
                               step=step)  # fmt: skip


def stitch(parts: list[tuple[np.ndarray, Masked]], b: int) -> Masked:
    """One ``Masked`` of ``b`` rows from parts that each cover the rows listed with them.

    Every per-row array is joined, the special-token mask among them: a part computes its own
    (dynamic masks carry it; static ones derive it from ``is_special``), so the joined batch
    answers every output option as each part would."""
    first = parts[0][1]
    arrays: dict[str, np.ndarray | None] = {}
    for f in fields(Masked):
        if f.name == "is_special":
            continue
        per_part = [part.special_tokens_mask if f.name == "special" else getattr(part, f.name) for _, part in parts]
        if any(a is None for a in per_part):
            arrays[f.name] = None
            continue
        out = np.empty((b, *per_part[0].shape[1:]), dtype=per_part[0].dtype)
        for (rows, _), a in zip(parts, per_part):
            out[rows] = a
        arrays[f.name] = out
    return Masked(**arrays, is_special=first.is_special)


def outputs(m: Masked, seq_ids: np.ndarray, out: OutputParams, pad_id: int) -> dict[str, np.ndarray]:
    """The arrays a client receives, per the output options.

    ``pad_to_multiple_of`` rounds the batch's longest sequence up, but never past L: the model's
    position table has L rows, so a wider batch could not be fed to it (when L is not a multiple,
    a batch whose longest sequence rounds past L is L wide)."""
    width = m.input_ids.shape[1]
    if out.pad_to_multiple_of is not None:
        longest = int(m.attention_mask.sum(axis=1).max()) if len(seq_ids) else 0
        width = min(width, max(1, -(-longest // out.pad_to_multiple_of) * out.pad_to_multiple_of))

    def fit(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, :width])

    arrays = {"input_ids": fit(m.input_ids), "attention_mask": fit(m.attention_mask)}
    if out.labels == "dense":
        arrays["labels"] = fit(m.labels)
    else:
        rows, cols = np.nonzero(m.selected)
        arrays["masked_positions"] = np.stack([rows, cols], axis=1).astype(np.int32)
        arrays["masked_ids"] = m.labels[rows, cols]
    if out.special_tokens_mask:
        arrays["special_tokens_mask"] = fit(m.special_tokens_mask.astype(np.uint8))
    arrays["sequence_ids"] = seq_ids.astype(np.int64)
    return arrays


async def render_batch(
    work: Workload, compute: Callable[[], Masked], seq_ids: np.ndarray, out: OutputParams, rt: DatasetRuntime,
    meta: dict[str, object], as_json: bool, piece_bytes: int, extra: dict[str, np.ndarray] | None = None,
) -> list[Piece]:  # fmt: skip
    """Render a batch into its response body: its masking (``compute``, from :func:`prepare_batch`), the
    output options and the encoding into pieces of at most ``piece_bytes`` (see ``bodies``), as one piece
    of CPU work (on the pool unless the batch is small). ``extra``: more per-row arrays to send."""
    def body() -> list[Piece]:
        t0 = time.perf_counter()
        masked = compute()
        t1 = time.perf_counter()
        pieces = render({**outputs(masked, seq_ids, out, rt.vocab.pad_id), **(extra or {})}, meta, as_json, piece_bytes)
        work.observe("mask", t1 - t0)
        work.observe("encode", time.perf_counter() - t1)
        return pieces

    return await work.run(body, tokens=len(seq_ids) * rt.seq_len)
