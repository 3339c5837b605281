"""Fetch sequences by id and mask them: the path every batch takes.

Shared by the stateless batch route, the masking report and jobs. Dynamic
masks are computed here; static ones are read from their cache in the same
Redis round trip as the data and applied, never recomputed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
from redis.exceptions import ResponseError

from ..core.errors import Conflict, DatasetEmpty, DatasetNotFound, StaticMasksMissing
from ..core.work import Workload
from ..data.catalog import Catalog, Chunks, DatasetRuntime
from ..data.packing import assemble
from ..masking.masking import Masked, MaskSpec, mask_batch
from ..masking.params import MaskingParams
from ..masking.static import apply, cache_id
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
    try:
        joined, mask_records = await catalog.store.fetch(
            rt.chunk_ref, chunks.ids, chunks.which, entries, rt.id_dtype.itemsize, masks=masks, word_starts=need_words,
            expect=(rt.uid, ds.num_sequences, ds.num_chunks) if checked else None,
        )
    except ResponseError as exc:
        if masks is not None and "missing masks" in str(exc):
            catalog.table_cache.drop(rt.uid, masks[0])
            raise StaticMasksMissing(
                f"static masks (cache {masks[0]}) of dataset {rt.name!r} were dropped; build them again",
                dataset=rt.name, cache=masks[0],
            ) from None  # fmt: skip
        raise Conflict(f"dataset {rt.name!r} changed while the batch was read; retry ({exc})") from None
    vocab = rt.vocab
    if masks is None and spec.random_tokens == "frequency":
        vocab = await catalog.weighted_vocab(rt)

    def compute() -> Masked:
        ids, ws, n = assemble(entries[:, 1], joined, rt.id_dtype, rt.seq_len, words=need_words)
        if masks is not None:
            out = apply(ids, n, masks[1][:, 1], mask_records, rt.id_dtype, rt.vocab.pad_id, rt.vocab.is_special)
            out.word_start = ws
            return out
        return mask_batch(ids, n, seq_ids, seed=seed, epoch=epoch, spec=spec, vocab=vocab, word_start=ws)

    return compute


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
    parts = []
    for epoch in distinct:
        rows = np.flatnonzero(epochs == epoch)
        part = await prepare_batch(catalog, ds, seq_ids[rows], seed=seed, epoch=int(epoch), params=params, spec=spec,
                                   checked=checked, step=step)  # fmt: skip
        parts.append((rows, part))
    return lambda: stitch([(rows, compute()) for rows, compute in parts], len(seq_ids))


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
        return render({**outputs(compute(), seq_ids, out, rt.vocab.pad_id), **(extra or {})}, meta, as_json, piece_bytes)

    return await work.run(body, tokens=len(seq_ids) * rt.seq_len)
