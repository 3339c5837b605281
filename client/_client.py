"""The thin clients: datasets, ingest, and masked batches with background prefetch, blocking or asyncio.

Every call is written once, as a plan (:mod:`client._plans`) in :class:`Calls`; :class:`Client` carries the
plans out with blocking requests, :class:`AsyncClient` with awaited ones. Each class turns each plan into a
method of the same name and signature (``c.datasets()`` or ``await c.datasets()``), so the two clients send
the same requests, retry and fail over alike, and raise the same errors.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from wire import CONTENT_TYPE, WireFormatError, decode

from ._batch import AsyncBatchStream, Batch, BatchStream
from ._errors import APIError, CorpusError, NotFoundError, ProtocolError, ServiceUnavailableError, TransportError
from ._jobs import AsyncJobStream, JobStream
from ._plans import Plan, Sleep
from ._transport import AsyncTransport, SyncTransport, Transport
from ._types import NDJSON, PLAIN_TEXT, EpochBoundary, Packing, Sources, TextSplit, TokenizerKind
from .corpora import (
    ARROW_STREAM, ARROW_SUFFIXES, PARQUET_SUFFIXES, Column, arrow_body, dataset_batches, hf_files, parquet_units,
    unit_batches, Unit,
)
from ._uploads import Document, FileUpload, Replayable, as_record, ndjson

DEFAULT_URL = "http://127.0.0.1:8000"



def _transport_setting(name: str, doc: str) -> Any:
    """A client attribute that reads and sets the same one of its transport."""
    return property(lambda self: getattr(self._transport, name),
                    lambda self, value: setattr(self._transport, name, value), doc=doc)  # fmt: skip


def plan(fn: Callable[..., Plan[Any]]) -> Callable[..., Plan[Any]]:
    """Mark a :class:`Calls` method as a plan that each client turns into a method of the same name."""
    fn.__maskserve_plan__ = True  # type: ignore[attr-defined]
    return fn


#: the connection pool of either client: enough for a job stream's prefetch and parallel uploads
LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=64)


class Calls:
    """The service's API, each call a plan. A subclass passes ``driver``: it wraps each plan ``fn`` into the
    method the subclass offers under the same name."""

    _transport: Transport

    def __init_subclass__(cls, driver: Callable[[Callable[..., Plan[Any]]], Callable[..., Any]] | None = None,
                          **kw: Any) -> None:  # fmt: skip
        super().__init_subclass__(**kw)
        if driver is None:
            return
        for name, fn in vars(Calls).items():
            if getattr(fn, "__maskserve_plan__", False) and name not in vars(cls):
                method = functools.wraps(fn)(driver(fn))
                method.__qualname__ = f"{cls.__qualname__}.{name}"
                returns = str(fn.__annotations__.get("return", ""))  # 'Plan[T]': the method gives T
                method.__annotations__ = {**fn.__annotations__, "return": returns.removeprefix("Plan[")[:-1]}
                method.__signature__ = inspect.signature(fn).replace(  # type: ignore[attr-defined]
                    return_annotation=method.__annotations__["return"])
                setattr(cls, name, method)

    #: set by each client: its transport class, and the httpx client class that transport drives
    _transport_class: type[SyncTransport] | type[AsyncTransport]
    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        http: httpx.Client | httpx.AsyncClient | None = None,
    ) -> None:
        """``base_url``: the replicas (a list, or one string separated by commas), else ``MASKSERVE_URL``, else
        the default; ``token``: the bearer token, else ``MASKSERVE_TOKEN``. ``transport`` (an httpx transport of
        the client's kind, sync or async) or a ready ``http`` client of that kind lets tests swap the network."""
        urls = base_url or os.environ.get("MASKSERVE_URL") or DEFAULT_URL
        if isinstance(urls, str):
            urls = urls.split(",")
        base_urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not base_urls:
            raise ValueError("no service URL given")
        token = token if token is not None else os.environ.get("MASKSERVE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = http or self._http_class(headers=headers, timeout=timeout, transport=transport, limits=LIMITS)
        self._transport = self._transport_class(base_urls, http, retries=retries, backoff=backoff,  # type: ignore[arg-type]
                                                max_backoff=max_backoff)  # fmt: skip

    @property
    def transport(self) -> Transport:
        """The requests to the service: retries, failover between replicas, errors from its answers."""
        return self._transport

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self._transport.base_url

    base_urls = _transport_setting("base_urls", "The service's replicas, in the order requests fail over.")
    retries = _transport_setting("retries", "Attempts after the first of an idempotent call.")
    backoff = _transport_setting("backoff", "The first wait between attempts (s), doubled each time.")
    max_backoff = _transport_setting("max_backoff", "The longest wait between attempts (s).")

    def _json(self, method: str, path: str, *, idempotent: bool = True, **kw: Any) -> Plan[Any]:
        return self._transport.json(method, path, idempotent=idempotent, **kw)

    # ---- service -----------------------------------------------------------

    @plan
    def health(self) -> Plan[bool]:
        try:
            return (yield from self._json("GET", "/healthz", idempotent=False))["status"] == "ok"
        except (TransportError, APIError):
            return False

    @plan
    def ready(self) -> Plan[bool]:
        try:
            yield from self._json("GET", "/readyz", idempotent=False)
            return True
        except (TransportError, APIError):
            return False

    @plan
    def readiness(self) -> Plan[dict[str, Any]]:
        """``/readyz``'s answer: what the service runs on (Redis, durable acks, ...); raises when it is not ready."""
        return (yield from self._json("GET", "/readyz", idempotent=False))

    @plan
    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> Plan[None]:
        """Wait until ``/readyz`` answers, or raise :class:`ServiceUnavailableError`."""
        deadline = time.monotonic() + timeout
        while not (yield from Calls.ready(self)):
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(503, title="Service Unavailable", detail=f"{self.base_url} not ready after {timeout}s")
            yield Sleep(interval)

    # ---- datasets ----------------------------------------------------------

    @plan
    def train_tokenizer(
        self, texts: Iterable[str], *, kind: TokenizerKind = "bpe", vocab_size: int = 8000, min_frequency: int = 2
    ) -> Plan[dict[str, Any]]:
        """Have the service train a tokenizer on ``texts``; returns tokenizer.json."""
        params = {"kind": kind, "vocab_size": vocab_size, "min_frequency": min_frequency}
        body = ndjson({"text": t} for t in texts)
        return (yield from self._json("POST", "/v1/tokenizers/train", idempotent=False, params=params, content=body,
                                      headers={"Content-Type": NDJSON}))  # fmt: skip

    @plan
    def create_dataset(
        self,
        name: str,
        *,
        tokenizer: Mapping[str, Any] | str | Path,
        seq_len: int,
        packing: Packing = "complete",
        special_tokens: Mapping[str, str] | None = None,
    ) -> Plan[dict[str, Any]]:
        """Create a dataset.

        ``tokenizer``: a tokenizer.json dict, its text, a path to one, or a directory saved by
        ``transformers``' ``save_pretrained`` (its tokenizer.json, else its vocabulary converted, and its
        special tokens; see docs/datasets.md). ``special_tokens`` (``{role: token}``) override the directory's.
        """
        special = dict(special_tokens or {})
        if isinstance(tokenizer, Path) or (isinstance(tokenizer, str) and not tokenizer.lstrip().startswith("{")):
            if Path(tokenizer).is_dir():
                from ._tokenizer_dir import read_tokenizer_dir

                tokenizer, found = read_tokenizer_dir(tokenizer)
                special = {**found, **special}
            else:
                tokenizer = Path(tokenizer).read_text()
        if isinstance(tokenizer, str):
            tokenizer = json.loads(tokenizer)
        body = {"name": name, "seq_len": seq_len, "packing": packing, "tokenizer": tokenizer}
        if special:
            body["special_tokens"] = special
        return (yield from self._json("POST", "/v1/datasets", idempotent=False, json=body))

    @plan
    def datasets(self) -> Plan[list[dict[str, Any]]]:
        return (yield from self._json("GET", "/v1/datasets"))["datasets"]

    @plan
    def dataset(self, name: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("GET", f"/v1/datasets/{name}"))

    @plan
    def tokenizer(self, name: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("GET", f"/v1/datasets/{name}/tokenizer"))

    @plan
    def delete_dataset(self, name: str, *, missing_ok: bool = False) -> Plan[None]:
        try:
            yield from self._json("DELETE", f"/v1/datasets/{name}")
        except NotFoundError:
            if not missing_ok:
                raise

    @plan
    def ingest(
        self,
        name: str,
        docs: Iterable[Document],
        *,
        idempotency_key: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Plan[dict[str, Any]]:
        """Stream documents (texts, ``{"text"|"ids": ...}`` dicts, or id lists) as NDJSON.

        The upload is atomic: all of it is stored, or nothing. When ``docs``
        can be iterated again (a list, not a generator) a failed upload is
        retried under the same Idempotency-Key, so it is stored exactly once.
        ``on_bytes(n)`` is called as body bytes are sent (for progress bars).
        """
        key = idempotency_key or uuid.uuid4().hex
        replayable = iter(docs) is not docs
        return (yield from self._json(
            "POST", f"/v1/datasets/{name}/documents", idempotent=replayable,
            content=Replayable(lambda: ndjson(map(as_record, docs), on_bytes)),
            headers={"Content-Type": NDJSON, "Idempotency-Key": key},
        ))  # fmt: skip

    @plan
    def ingest_file(
        self, name: str, path: str | Path, *, split: TextSplit = "none", idempotency_key: str | None = None,
        on_bytes: Callable[[int], None] | None = None, text_column: str | None = None,
        ids_column: str | None = None, commit: bool = True,
    ) -> Plan[dict[str, Any]]:  # fmt: skip
        """Stream a file: ``.jsonl``/``.ndjson``/``.json`` as NDJSON, Parquet (``.parquet``) and Arrow
        (``.arrow``, ``.feather``) by column (``text_column``, default ``text``, or ``ids_column``), a directory
        as a saved Hugging Face dataset (its ``split``, default train), anything else as plain text (``split``:
        document boundaries). ``commit=False`` stages it under ``idempotency_key`` (see :meth:`commit_ingest`).

        Compressed files go by their inner suffix (``docs.jsonl.gz``, ``c4.json.gz``, ``notes.txt.xz``):
        ``.gz`` and ``.zst`` are sent as they are, for the service to decode (``Content-Encoding``);
        ``.bz2`` and ``.xz`` are decoded here as they are sent. ``on_bytes(n)`` counts the file's bytes read.
        """
        path = Path(path)
        if path.is_dir() or path.suffix in (*PARQUET_SUFFIXES, *ARROW_SUFFIXES):
            files = hf_files(path, None if split == "none" else split) if path.is_dir() else [path]
            units = [u for f in files for u in _units(f)]
            column = Column.of(text_column, ids_column)
            return (yield from self._ingest_arrow(
                name, lambda: (b for u in units for b in unit_batches(u, column)), column,
                idempotency_key=idempotency_key, commit=commit,
            ))  # fmt: skip
        if text_column is not None or ids_column is not None:
            raise CorpusError(f"{path}: text_column and ids_column apply to Parquet, Arrow and dataset files")
        upload = FileUpload.of(path)
        ctype = NDJSON if upload.ndjson else PLAIN_TEXT
        params: dict[str, Any] = {} if ctype != PLAIN_TEXT else {"split": split}
        if not commit:
            params["commit"] = "false"
        headers = {"Content-Type": ctype, "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if upload.encoding:
            headers["Content-Encoding"] = upload.encoding
        return (yield from self._json(
            "POST", f"/v1/datasets/{name}/documents", idempotent=True, params=params,
            content=Replayable(lambda: upload.chunks(on_bytes)), headers=headers,
        ))  # fmt: skip

    @plan
    def ingest_dataset(
        self, name: str, dataset: Any, *, text_column: str | None = "text", ids_column: str | None = None,
        idempotency_key: str | None = None, on_rows: Callable[[int], None] | None = None,
    ) -> Plan[dict[str, Any]]:  # fmt: skip
        """Stream a Hugging Face ``datasets.Dataset`` (its Arrow data, record batch by record batch) or
        ``IterableDataset``: one column, of texts (``text_column``) or of token id lists (``ids_column``).
        Atomic, and retried under one Idempotency-Key (a dataset can be iterated again)."""
        column = Column.of(None if ids_column is not None else text_column, ids_column)
        return (yield from self._ingest_arrow(name, lambda: dataset_batches(dataset, column), column,
                                              idempotency_key=idempotency_key, on_rows=on_rows))  # fmt: skip

    @plan
    def ingest_table(
        self, name: str, batches: Callable[[], Iterable[Any]], *, text_column: str | None = None,
        ids_column: str | None = None, idempotency_key: str | None = None, commit: bool = True,
        on_rows: Callable[[int], None] | None = None,
    ) -> Plan[dict[str, Any]]:  # fmt: skip
        """Stream ``pyarrow`` record batches (``batches()`` returns them; called again on a retry) holding
        the column named by ``text_column`` (default ``text``) or ``ids_column``."""
        column = Column.of(text_column, ids_column)
        return (yield from self._ingest_arrow(name, batches, column, idempotency_key=idempotency_key,
                                              commit=commit, on_rows=on_rows))  # fmt: skip

    def _ingest_arrow(
        self, name: str, batches: Callable[[], Iterable[Any]], column: Column, *, idempotency_key: str | None,
        commit: bool = True, on_rows: Callable[[int], None] | None = None,
    ) -> Plan[dict[str, Any]]:  # fmt: skip
        params: dict[str, Any] = column.params()
        if not commit:
            params["commit"] = "false"
        return (yield from self._json(
            "POST", f"/v1/datasets/{name}/documents", idempotent=True, params=params,
            content=Replayable(lambda: arrow_body(batches(), on_rows)),
            headers={"Content-Type": ARROW_STREAM, "Idempotency-Key": idempotency_key or uuid.uuid4().hex},
        ))  # fmt: skip

    @plan
    def ingest_state(self, name: str, key: str) -> Plan[dict[str, Any] | None]:
        """Where the ingest under Idempotency-Key ``key`` stands: ``{"state": "staged"|"committed", "result":
        ...}``, or None when nothing is staged or committed under it."""
        try:
            return (yield from self._json("GET", f"/v1/datasets/{name}/ingests/{key}"))
        except NotFoundError as exc:
            if exc.type.endswith("ingest-not-found"):
                return None
            raise

    @plan
    def running_ingests(self) -> Plan[list[dict[str, Any]]]:
        """The ingests running now on every process of the service: dataset, Idempotency-Key, body bytes received
        (and ``content_length``, when announced), documents, sequences and tokens so far, chunk bytes staged."""
        return (yield from self._json("GET", "/v1/ingests"))["ingests"]

    @plan
    def commit_ingest(self, name: str, key: str) -> Plan[dict[str, Any]]:
        """Commit an ingest staged with ``commit=False``: its sequences take the next ids. Committing again is
        harmless (``duplicate`` is then true), so this call is retried."""
        return (yield from self._json("POST", f"/v1/datasets/{name}/ingests/{key}/commit"))

    # ---- batches -----------------------------------------------------------

    @plan
    def batch(
        self,
        name: str,
        size: int = 32,
        *,
        seed: int | None = None,
        index: int = 0,
        epoch: int | None = None,
        **options: Any,
    ) -> Plan[Batch]:
        """One masked batch: B sequences drawn by ``(seed, index)``, masked for ``epoch``.

        Batch k holds positions kB .. kB+B-1 of the stream that concatenates
        the seed's per-epoch permutations (a job's order), so consecutive
        batches cover every sequence once per epoch. ``mask_seed=`` seeds the
        masks apart from the order.

        ``options`` are the service's masking and output parameters, e.g.
        ``mlm_probability=0.15, unit="whole_word", count="exact", mode="static",
        copies=10, labels="sparse", special_tokens_mask=True, pad_to_multiple_of=8``.
        """
        params: dict[str, Any] = {"size": size, "index": index}
        params.update({k: _param(v) for k, v in options.items() if v is not None})
        if seed is not None:
            params["seed"] = seed
        if epoch is not None:
            params["epoch"] = epoch
        got = yield from self._transport.receive("GET", f"/v1/datasets/{name}/batch", idempotent=True,
                                                 params=params, headers={"Accept": CONTENT_TYPE})  # fmt: skip
        try:
            arrays, metadata = decode(got.body)
        except WireFormatError as exc:
            raise ProtocolError(f"batch from {self.base_url}: {exc}") from None
        metadata.setdefault("seed", got.headers.get("maskserve-seed", "0"))
        return Batch(arrays, metadata, step=index)

    @plan
    def sequences(
        self, name: str, ids: Sequence[int], *, seed: int = 0, epoch: int = 0, **options: Any
    ) -> Plan[Batch]:
        """The sequences ``ids`` (rows in that order), masked for ``(seed, epoch)``.

        With ``mode="static"`` the cached copy ``epoch mod copies`` of the
        (seed, copies, masking) cache is served. The same call always gives the
        same masks: a fixed evaluation set needs no job. ``options`` are the
        masking and output parameters of :meth:`batch`.
        """
        body: dict[str, Any] = {"ids": [int(i) for i in ids], "seed": seed, "epoch": epoch}
        body.update({k: v for k, v in options.items() if v is not None})
        got = yield from self._transport.receive("POST", f"/v1/datasets/{name}/sequences", idempotent=True,
                                                 json=body, headers={"Accept": CONTENT_TYPE})  # fmt: skip
        try:
            arrays, metadata = decode(got.body)
        except WireFormatError as exc:
            raise ProtocolError(f"sequences from {self.base_url}: {exc}") from None
        return Batch(arrays, metadata)

    # ---- jobs --------------------------------------------------------------------

    @plan
    def create_job(
        self, name: str, dataset: str | None = None, *, batch_size: int = 32, seed: int = 0, shuffle: bool = True,
        epochs: int | None = 1, drop_last: bool = False, lease_timeout_s: float = 60.0,
        epoch_boundary: EpochBoundary = "handout", masking: Mapping[str, Any] | None = None, mask_seed: int | None = None,
        sources: Sources | None = None, num_samples: int | None = None, until: str | None = None,
        curriculum: Sequence[Mapping[str, Any]] | None = None, interpolation: str = "linear",
        mixture_block: int | None = None,
    ) -> Plan[dict[str, Any]]:  # fmt: skip
        """Create a job, or attach to the existing one with the same config (a different one is a ConflictError).

        ``mask_seed`` seeds the masks (and names a static job's cache) apart from the data order's ``seed``.
        ``sources`` makes a mixture of datasets instead of one: ``{"wiki": 3, "books": 1}``, or a list of
        ``{"dataset", "weight", "repeat"}``; it ends after ``num_samples`` sequences, or when source ``until``
        has served ``epochs`` epochs, or when every non-repeating source ran out. ``curriculum``: weights that change,
        ``[{"step": batch, "weights": {"wiki": 9, "books": 1}}, ...]`` (``interpolation`` linear or step).
        """
        body: dict[str, Any] = {"name": name, "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
                                "epochs": epochs, "drop_last": drop_last, "lease_timeout_s": lease_timeout_s,
                                "epoch_boundary": epoch_boundary, "masking": dict(masking or {})}  # fmt: skip
        if dataset is not None:
            body["dataset"] = dataset
        if mask_seed is not None:
            body["mask_seed"] = mask_seed
        if sources is not None:
            body.update(sources=_sources(sources), interpolation=interpolation)
            extra = {"num_samples": num_samples, "until": until, "mixture_block": mixture_block,
                     "curriculum": [dict(p) for p in curriculum] if curriculum is not None else None}  # fmt: skip
            body.update({k: v for k, v in extra.items() if v is not None})
        return (yield from self._json("POST", "/v1/jobs", idempotent=True, json=body))

    @plan
    def jobs(self) -> Plan[list[dict[str, Any]]]:
        return (yield from self._json("GET", "/v1/jobs"))["jobs"]

    @plan
    def job_progress(self, name: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("GET", f"/v1/jobs/{name}"))

    @plan
    def cancel_job(self, name: str) -> Plan[dict[str, Any]]:
        return (yield from self._json("POST", f"/v1/jobs/{name}/cancel"))

    @plan
    def delete_job(self, name: str) -> Plan[None]:
        yield from self._json("DELETE", f"/v1/jobs/{name}")

    @plan
    def evict_worker(self, name: str, worker: str) -> Plan[int]:
        """A worker known to be gone: its leased batches are handed out again now. Returns how many."""
        return (yield from self._json("POST", f"/v1/jobs/{name}/workers/{worker}/evict"))["released"]

    # ---- static masks and the masking report ---------------------------------

    @plan
    def build_static_masks(
        self, name: str, *, seed: int = 0, copies: int = 10, max_chunks: int | None = None, **masking: Any
    ) -> Plan[dict[str, Any]]:
        """Build (or finish) the static-mask cache for this config; idempotent.

        With ``max_chunks``, one call building at most that many chunks (loop until
        ``complete`` to show progress). Without, calls until the cache is complete
        (the service bounds the time of each call and goes on where the last stopped).
        """
        body = {"seed": seed, "copies": copies, **masking}
        if max_chunks is not None:
            body["max_chunks"] = max_chunks
        path = f"/v1/datasets/{name}/static-masks"
        status = yield from self._json("POST", path, json=body)
        while max_chunks is None and not status["complete"]:
            status = yield from self._json("POST", path, json=body)
        return status

    @plan
    def static_masks(self, name: str) -> Plan[list[dict[str, Any]]]:
        return (yield from self._json("GET", f"/v1/datasets/{name}/static-masks"))["caches"]

    @plan
    def drop_static_masks(self, name: str, cache: str) -> Plan[None]:
        yield from self._json("DELETE", f"/v1/datasets/{name}/static-masks/{cache}")

    @plan
    def masking_report(
        self, name: str, *, seed: int = 0, sequences: int = 256, epochs: int | None = None, **masking: Any
    ) -> Plan[dict[str, Any]]:
        """Mask ``sequences`` sequences for ``epochs`` epochs and measure what came out."""
        body = {"seed": seed, "sequences": sequences, **masking}
        if epochs is not None:
            body["epochs"] = epochs
        return (yield from self._json("POST", f"/v1/datasets/{name}/masking-report", json=body))


def _blocking(fn: Callable[..., Plan[Any]]) -> Callable[..., Any]:
    def call(self: Client, *args: Any, **kw: Any) -> Any:
        return self._transport.run(fn(self, *args, **kw))

    return call


def _awaited(fn: Callable[..., Plan[Any]]) -> Callable[..., Any]:
    async def call(self: AsyncClient, *args: Any, **kw: Any) -> Any:
        return await self._transport.run(fn(self, *args, **kw))

    return call


class Client(Calls, driver=_blocking):
    """Synchronous client for one maskserve service (or several replicas of it).

    >>> with Client("http://127.0.0.1:8000") as c:          # doctest: +SKIP
    ...     for batch in c.batches("wiki", batch_size=64, steps=100):
    ...         loss = model(**batch.torch("cuda"))

    ``base_url`` may name several replicas (a list, or one string separated
    by commas): a request that cannot reach one, or gets 502/503/504 from it,
    moves on to the next. ``transport`` (or a ready ``http`` client) lets
    tests swap the network. Idempotent calls are retried ``retries`` times on
    transport errors and 502/503/504, with exponential backoff from
    ``backoff`` seconds up to ``max_backoff`` (or the service's
    ``Retry-After``); ingests carry an Idempotency-Key so a retried upload is
    stored once.
    """

    _transport: SyncTransport
    _transport_class = SyncTransport
    _http_class = httpx.Client

    @property
    def _http(self) -> httpx.Client:
        return self._transport.http

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def job(
        self, name: str, *, worker: str | None = None, prefetch: int = 2, auto_ack: bool = True,
        create: Mapping[str, Any] | None = None, max_outage: float = 300.0, ack_every: int = 1,
        ack_delay: float = 2.0, stats_every: float | None = 5.0, **output: Any,
    ) -> JobStream:  # fmt: skip
        """Attach to job ``name`` (creating it from ``create`` if given) and iterate its batches.

        Batches come in (epoch, index) order. Each is acked when the next one
        is asked for (or explicitly with ``stream.ack(batch)`` when
        ``auto_ack=False``); ``close()`` acks the last one handed out and
        gives back the rest. Lease requests ride out an unreachable or
        overloaded service (failing over between replicas) for up to
        ``max_outage`` seconds. A cancelled job raises :class:`JobCancelled`.
        ``ack_every=N`` sends acks in groups of N (or after ``ack_delay`` seconds):
        fewer fsyncs on a service with durable acks, at the price of up to N-1
        batches trained again should this worker die.
        Every ``stats_every`` seconds (None: never) a lease request carries a summary of the consumer since
        the last one: batches, seconds it waited for them, seconds between them (its steps); job progress
        then shows each worker's data-wait share and flags input-bound workers and stragglers.
        Batches carry ``metadata["epoch"|"index"|"lease"]``.
        """
        if create is not None:
            self.create_job(name, **create)
        return JobStream(self, name, worker=worker, prefetch=prefetch, auto_ack=auto_ack, max_outage=max_outage,
                         ack_every=ack_every, ack_delay=ack_delay, stats_every=stats_every, **output)  # fmt: skip

    def batches(
        self,
        name: str,
        batch_size: int = 32,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int | None = None,
        prefetch: int = 4,
        **masking: Any,
    ) -> BatchStream:
        """Batches ``start, start+1, ...`` (``steps`` of them, or forever).

        Batch k is a pure function of ``(seed, k)``, so resuming at ``start=k``
        replays the same stream. ``prefetch`` requests stay in flight.
        """
        def fetch(k: int) -> Batch:
            return self.batch(name, batch_size, seed=seed, index=k, **masking)

        return BatchStream(fetch, start, steps, prefetch)


class AsyncClient(Calls, driver=_awaited):
    """The :class:`Client` for asyncio programs, on ``httpx.AsyncClient``: the same calls, each awaited, and the
    same streams, iterated with ``async for``.

    >>> async with AsyncClient("http://127.0.0.1:8000") as c:          # doctest: +SKIP
    ...     async for batch in c.batches("wiki", batch_size=64, steps=100):
    ...         loss = model(**batch.torch("cuda"))

    Both clients carry out the same plans (:mod:`client._plans`): replicas, retries, backoff, Idempotency-Keys,
    errors and a job stream's ack bookkeeping are the same. Upload bodies (documents, files, tables) are
    produced on worker threads, so reading and encoding a corpus never holds up the event loop. ``transport``
    takes an ``httpx.AsyncBaseTransport``.
    """

    _transport: AsyncTransport
    _transport_class = AsyncTransport
    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def job(
        self, name: str, *, worker: str | None = None, prefetch: int = 2, auto_ack: bool = True,
        create: Mapping[str, Any] | None = None, max_outage: float = 300.0, ack_every: int = 1,
        ack_delay: float = 2.0, stats_every: float | None = 5.0, **output: Any,
    ) -> AsyncJobStream:  # fmt: skip
        """Attach to job ``name`` and iterate its batches with ``async for``, as :meth:`Client.job` does; the
        job is created from ``create`` (if given) before the first lease is asked for. Close the stream with
        ``await stream.aclose()`` or ``async with``; ``await stream.ack(batch)`` with ``auto_ack=False``."""
        return AsyncJobStream(self, name, worker=worker, prefetch=prefetch, auto_ack=auto_ack, create=create,
                              max_outage=max_outage, ack_every=ack_every, ack_delay=ack_delay,
                              stats_every=stats_every, **output)  # fmt: skip

    def batches(
        self, name: str, batch_size: int = 32, *, seed: int = 0, start: int = 0, steps: int | None = None,
        prefetch: int = 4, **masking: Any,
    ) -> AsyncBatchStream:  # fmt: skip
        """Batches ``start, start+1, ...`` as :meth:`Client.batches` gives them, with ``prefetch`` requests in
        flight as tasks; iterate with ``async for``."""

        def fetch(k: int) -> Any:
            return self.batch(name, batch_size, seed=seed, index=k, **masking)

        return AsyncBatchStream(fetch, start, steps, prefetch)


def _sources(sources: Sources) -> list[dict[str, Any]]:
    """A mixture's sources as the service takes them: ``{"dataset", "weight", "repeat"}`` each."""
    if isinstance(sources, Mapping):
        return [{"dataset": str(d), "weight": float(w)} for d, w in sources.items()]
    return [dict(s) for s in sources]


def _units(path: Path) -> list[Unit]:
    return parquet_units(path) if path.suffix in PARQUET_SUFFIXES else [Unit(path, "arrow")]


def _param(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value
