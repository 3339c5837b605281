"""Static-mask caches (build, list, drop) and the masking report."""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import Field

from ...batches.batching import open_dataset, prepare_batch
from ...core.errors import DatasetNotFound, LimitExceeded, NotFound, ValidationFailed
from ...core.work import Workload
from ...data.catalog import Catalog
from ...data.packing import assemble, split_chunk
from ...masking.masking import Masked, MaskSpec, Vocab, mask_batch
from ...masking.params import MAX_INT64, MAX_SEED, MaskingParams
from ...masking.static import cache_id, encode_chunk
from ...store.store import CachesFull
from ..deps import CatalogDep, SettingsDep, StoreDep


router = APIRouter(prefix="/v1/datasets", tags=["masks"])


class StaticBuild(MaskingParams):
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Copy c of sequence s is the mask of (seed, c, s).")
    max_chunks: int | None = Field(
        default=None, ge=1, le=MAX_INT64, description="Build at most this many chunks in this call."
    )


class ReportRequest(MaskingParams):
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    sequences: int = Field(default=256, ge=1, le=100_000, description="How many sequences to mask.")
    epochs: int | None = Field(
        default=None, ge=1, le=1000, description="Epochs to mask each sequence for; default 2 x copies (static) or 20."
    )


def _status(meta: dict[str, Any], num_chunks: int, num_tokens: int) -> dict[str, Any]:
    return {
        "cache": meta["cache"],
        "masking": meta["masking"],
        "seed": meta["seed"],
        "copies": meta["copies"],
        "built": meta["built"],
        "chunks": num_chunks,
        "complete": meta["built"] >= num_chunks,
        "bytes": meta["bytes"],
        "bytes_per_token": meta["bytes"] / num_tokens if num_tokens else 0.0,
    }


@router.post("/{name}/static-masks", summary="Build (or go on building) a static-mask cache; idempotent")
async def build_static(
    name: str, body: StaticBuild, store: StoreDep, catalog: CatalogDep, settings: SettingsDep, request: Request
) -> dict[str, Any]:
    """Builds chunk by chunk, each on the CPU pool. A call stops after ``static_build_max_s`` (or
    ``max_chunks`` chunks, or when its client has gone) with the chunks so far kept: the answer says
    ``complete: false`` and the next call goes on from there."""
    if body.schedule != "constant":
        raise ValidationFailed("static masks are built once, at one rate: a mask-rate schedule needs dynamic masks")
    if body.copies > settings.max_static_copies:
        raise LimitExceeded(f"copies {body.copies} exceeds the limit of {settings.max_static_copies}",
                            limit=settings.max_static_copies)  # fmt: skip
    spec = body.spec()
    ds = await open_dataset(catalog, name)
    rt = ds.rt
    cache = cache_id(spec, body.seed, body.copies)
    fields = {"cache": cache, "masking": body.model_dump_json(exclude={"seed", "max_chunks", "mode"}),
              "seed": body.seed, "copies": body.copies, "built": 0, "bytes": 0, "created_at": time.time()}  # fmt: skip
    if spec.random_tokens == "frequency":
        await catalog.weighted_vocab(rt)
    try:
        meta = await store.open_mask_cache(name, rt.uid, cache, fields, settings.max_mask_caches)
    except CachesFull as full:
        raise LimitExceeded(f"dataset {name!r} {full}: drop one first (DELETE .../static-masks/ID)",
                            limit=full.limit, dataset=name)  # fmt: skip
    if meta is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    work: Workload = request.app.state.work
    k = meta["built"]
    stop = ds.num_chunks if body.max_chunks is None else min(ds.num_chunks, k + body.max_chunks)
    deadline = time.monotonic() + settings.static_build_max_s
    while k < stop:  # at least one chunk per call, so that calls in a row always finish the cache
        blob = await store.read_chunk(rt.chunk_ref, k)
        if blob is None:
            raise DatasetNotFound(f"dataset {name!r} was deleted during the build", dataset=name)
        masks = await work.run(_mask_chunk, catalog, rt, blob, int(rt.chunk_starts[k]), body, spec)
        built = await store.save_mask_chunk(rt.chunk_ref, cache, k, masks)
        if built < 0:
            raise DatasetNotFound(f"dataset {name!r} was deleted or replaced during the build", dataset=name)
        request.app.state.metrics.mask_chunks_built.labels(name).inc()
        k = max(k + 1, built)
        if time.monotonic() > deadline or await request.is_disconnected():
            break
    meta = await store.mask_cache(name, cache)
    counters = await store.meta(name)
    return _status(meta, ds.num_chunks, counters["num_tokens"] if counters else 0)


def _mask_chunk(catalog: Catalog, rt: Any, blob: bytes, first_id: int, body: StaticBuild, spec: MaskSpec) -> bytes:
    lengths, records = split_chunk(blob, rt.id_dtype.itemsize)
    ids, ws, n = assemble(lengths, records, rt.id_dtype, rt.seq_len, words=True)
    seq_ids = first_id + np.arange(len(n), dtype=np.int64)
    vocab = rt.weighted if spec.random_tokens == "frequency" and rt.weighted else rt.vocab
    copies = (  # one copy at a time: encode_chunk keeps only each copy's selected positions
        mask_batch(ids, n, seq_ids, seed=body.seed, epoch=c, spec=spec, vocab=vocab, word_start=ws.copy())
        for c in range(body.copies)
    )
    return encode_chunk(copies, rt.id_dtype)


@router.get("/{name}/static-masks", summary="The dataset's static-mask caches and how complete they are")
async def list_static(name: str, store: StoreDep) -> dict[str, list[dict[str, Any]]]:
    meta = await store.meta(name)
    if meta is None:
        raise DatasetNotFound(f"no dataset named {name!r}", dataset=name)
    caches = await store.mask_caches(name)
    return {"caches": [_status(c, meta["num_chunks"], meta["num_tokens"]) for c in caches]}


@router.delete("/{name}/static-masks/{cache}", status_code=204, summary="Drop one static-mask cache")
async def drop_static(
    name: str, cache: Annotated[str, Path(pattern="^[0-9a-f]{16}$")], store: StoreDep
) -> Response:
    if await store.mask_cache(name, cache) is None:
        raise NotFound(f"dataset {name!r} has no static-mask cache {cache!r}", dataset=name, cache=cache)
    await store.drop_mask_cache(name, cache)
    return Response(status_code=204)


@router.post("/{name}/masking-report", summary="Mask N sequences for several epochs and measure the result")
async def report(
    name: str, body: ReportRequest, catalog: CatalogDep, settings: SettingsDep, request: Request
) -> dict[str, Any]:
    work: Workload = request.app.state.work
    spec = body.spec()
    ds = await open_dataset(catalog, name)
    epochs, sequences = _report_size(body, ds.rt.seq_len, ds.num_sequences, settings.max_report_tokens)
    if spec.random_tokens == "frequency":
        await catalog.weighted_vocab(ds.rt)
    seq_ids = np.unique(np.linspace(0, ds.num_sequences - 1, sequences).astype(np.int64))
    tally = _Tally(ds.rt.vocab, len(seq_ids), spans=spec.unit == "span")
    for epoch in range(epochs):  # one epoch's masks in memory at a time; the CPU work off the event loop
        compute = await prepare_batch(catalog, ds, seq_ids, seed=body.seed, epoch=epoch, params=body, spec=spec,
                                      need_words=True)  # fmt: skip
        await work.run(lambda: tally(compute()))
    return {
        "dataset": name, "mode": body.mode, "masking": body.model_dump(exclude={"seed", "sequences", "epochs"}),
        "seed": body.seed, "sequences": len(seq_ids), "epochs": epochs, **tally.summary(),
    }  # fmt: skip


def _report_size(body: ReportRequest, seq_len: int, num_sequences: int, max_tokens: int) -> tuple[int, int]:
    """The report's epochs and sequences, within the ``max_report_tokens`` setting (``max_tokens``)."""
    epochs = body.epochs or (2 * body.copies if body.mode == "static" else 20)
    sequences = min(body.sequences, num_sequences)
    tokens = sequences * epochs * seq_len
    if tokens > max_tokens:
        raise LimitExceeded(
            f"a report of {sequences} sequences x {epochs} epochs x L={seq_len} masks {tokens} tokens, over the "
            f"limit of {max_tokens}: ask for fewer sequences or epochs",
            limit=max_tokens,
        )  # fmt: skip
    return epochs, sequences


class _Tally:
    """The masking report's counts, one epoch's masks at a time (called off the event loop)."""

    def __init__(self, vocab: Vocab, rows: int, *, spans: bool) -> None:
        self.vocab = vocab
        self.spans = spans
        self.totals = dict.fromkeys(("candidates", "selected", "masked", "random", "kept", "selected_words",
                                     "special_selected", "special_drawn"), 0)  # fmt: skip
        self.seen: list[set[bytes]] = [set() for _ in range(rows)]
        self.runs: list[np.ndarray] = []

    def __call__(self, m: Masked) -> None:
        totals, vocab = self.totals, self.vocab
        sel = m.selected
        orig = np.where(sel, m.labels, 0)
        totals["candidates"] += int((~m.special_tokens_mask).sum())
        totals["selected"] += int(sel.sum())
        totals["masked"] += int((sel & (m.input_ids == vocab.mask_id)).sum())
        totals["kept"] += int((sel & (m.input_ids == orig)).sum())
        drawn = sel & (m.input_ids != vocab.mask_id) & (m.input_ids != orig)
        totals["random"] += int(drawn.sum())
        totals["special_selected"] += int((sel & m.special_tokens_mask).sum())
        totals["special_drawn"] += int((drawn & vocab.is_special[m.input_ids]).sum())
        if m.word_start is not None:
            totals["selected_words"] += int((sel & (m.word_start | m.special_tokens_mask)).sum())
        for i, row in enumerate(np.packbits(sel, axis=1)):
            self.seen[i].add(row.tobytes())
        if self.spans and m.word_start is not None:
            self.runs.append(_run_words(sel, m.word_start))

    def summary(self) -> dict[str, Any]:
        """The rates, split and leakage measured, then the raw counts."""
        totals = self.totals
        distinct = np.array([len(s) for s in self.seen])
        sel = max(1, totals["selected"])
        out: dict[str, Any] = {
            "selection_rate": totals["selected"] / max(1, totals["candidates"]),
            "split": {"mask": totals["masked"] / sel, "random": totals["random"] / sel, "keep": totals["kept"] / sel},
            "tokens_per_selected_word": totals["selected"] / max(1, totals["selected_words"]),
            "special_or_pad_selected": totals["special_selected"],
            "special_drawn_as_replacement": totals["special_drawn"],
            "distinct_masks_per_sequence": {"max": int(distinct.max()), "mean": float(distinct.mean())},
            **totals,
        }  # fmt: skip
        if self.runs:
            lengths = np.concatenate(self.runs)
            out["span_length_words"] = {"mean": float(lengths.mean()) if len(lengths) else 0.0,
                                        "histogram": np.bincount(lengths).tolist()}  # fmt: skip
        return out


def _run_words(selected: np.ndarray, word_start: np.ndarray) -> np.ndarray:
    """Lengths, in words, of the maximal runs of selected tokens."""
    b, n = selected.shape
    padded = np.zeros((b, n + 2), dtype=np.int8)
    padded[:, 1:-1] = selected
    edges = np.diff(padded, axis=1)
    starts = np.argwhere(edges == 1)
    ends = np.argwhere(edges == -1)
    words = np.concatenate([np.zeros((b, 1), np.int64), np.cumsum(selected & word_start, axis=1)], axis=1)
    return words[ends[:, 0], ends[:, 1]] - words[starts[:, 0], starts[:, 1]]


