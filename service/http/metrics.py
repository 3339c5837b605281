"""Prometheus metrics, one registry per app (so several apps can share a process).

Under ``maskserve serve --workers N`` the process manager sets
``PROMETHEUS_MULTIPROC_DIR`` before starting the workers: each worker's
values then live in files there, and ``/metrics``, whichever worker answers
it, reports the sum over all of them (:func:`exposition`).
"""

from __future__ import annotations

import os

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format of ``registry``, or of every worker's files when the workers share a directory."""
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


def process_exited() -> None:
    """A worker shuts down: its live gauges no longer count."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(os.getpid())


class Metrics:
    def observe_stage(self, stage: str, seconds: float) -> None:
        """A batch spent ``seconds`` in ``stage`` (fetch, mask, encode)."""
        self.batch_stage.labels(stage).observe(seconds)

    def observe_row_cache(self, hits: int, misses: int, size: int) -> None:
        """A batch looked its records up in the row cache: ``hits`` found, ``misses`` not; it holds ``size`` bytes."""
        if hits:
            self.row_cache_hits.inc(hits)
        if misses:
            self.row_cache_misses.inc(misses)
        self.row_cache_bytes.set(size)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maskserve_requests_total", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "maskserve_request_seconds", "Request latency by route", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
        )  # fmt: skip
        self.sequences_served = Counter(
            "maskserve_sequences_served_total", "Masked sequences served", ["dataset"], registry=self.registry
        )
        self.overloaded = Counter(
            "maskserve_overloaded_total", "Requests refused with 503 overloaded, by the limit they met: 'requests' "
            "(MASKSERVE_MAX_INFLIGHT heavy requests), 'bytes' (MASKSERVE_MAX_INFLIGHT_BYTES), 'redis-connections' "
            "(every Redis connection of the process busy)", ["reason"], registry=self.registry,
        )  # fmt: skip
        for reason in ("requests", "bytes", "redis-connections"):  # exported as 0 until one is refused
            self.overloaded.labels(reason)
        self.inflight = Gauge(
            "maskserve_inflight_heavy_requests", "Heavy requests being worked on", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.tokens_ingested = Counter(
            "maskserve_tokens_ingested_total", "Tokens stored by ingest", ["dataset"], registry=self.registry
        )
        self.documents_ingested = Counter(
            "maskserve_documents_ingested_total", "Documents stored by ingest", ["dataset"], registry=self.registry
        )
        self.batch_stage = Histogram(
            "maskserve_batch_stage_seconds", "Time a batch spends in each stage: fetch (the Redis round trip for its "
            "rows), mask (assembling and masking them), encode (the output options and the wire format)", ["stage"],
            registry=self.registry, buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5),
        )  # fmt: skip
        self.ingests_running = Gauge(
            "maskserve_ingests_running", "Ingests running now (GET /v1/ingests has each one's progress)", ["dataset"],
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.ingest_bytes_received = Counter(
            "maskserve_ingest_bytes_received_total", "Ingest body bytes received, as sent (compressed, if it is), "
            "counted as they arrive", ["dataset"], registry=self.registry,
        )  # fmt: skip
        self.bytes_stored = Counter(
            "maskserve_bytes_stored_total", "Chunk bytes stored by ingest", ["dataset"], registry=self.registry
        )
        self.row_cache_hits = Counter(
            "maskserve_chunk_cache_hits_total", "Records (a sequence, or one copy of its static masks) a batch found "
            "in its process's chunk cache", registry=self.registry,
        )  # fmt: skip
        self.row_cache_misses = Counter(
            "maskserve_chunk_cache_misses_total", "Records a batch read from Redis (and kept in the chunk cache)",
            registry=self.registry,
        )  # fmt: skip
        self.row_cache_bytes = Gauge(
            "maskserve_chunk_cache_bytes", "Bytes the chunk cache holds (records and their bookkeeping), summed over "
            "the processes; each is bounded by MASKSERVE_CHUNK_CACHE_BYTES", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.mask_chunks_built = Counter(
            "maskserve_static_mask_chunks_built_total", "Chunks whose static masks a build stored", ["dataset"],
            registry=self.registry,
        )  # fmt: skip


#: per-job series: name, help, how to read it off a job's progress
JOB_SERIES: tuple[tuple[str, str, Any], ...] = (
    ("maskserve_job_active", "1 while the job hands out batches, 0 once done or cancelled",
     lambda p: 1.0 if p["status"] == "active" else 0.0),
    ("maskserve_job_epoch", "The epoch the job hands out", lambda p: p["epoch"]),
    ("maskserve_job_next_batch", "Index of the next batch in the epoch", lambda p: p["next_batch"]),
    ("maskserve_job_batches_per_epoch", "Batches in one epoch", lambda p: p["batches_per_epoch"]),
    ("maskserve_job_acked_batches", "Batches acked, all epochs", lambda p: p["acked"]),
    ("maskserve_job_leased_batches", "Batches leased and not yet acked", lambda p: p["leased"]),
    ("maskserve_job_redelivered_batches", "Batches handed out again (expired, released or evicted leases)",
     lambda p: p["redelivered"]),
    ("maskserve_job_late_acks", "Acks that came after their lease was handed to another worker",
     lambda p: p["late_acks"]),
    ("maskserve_job_workers", "Workers with counters in the job", lambda p: len(p["workers"])),
    ("maskserve_job_sequences_per_second", "Acked sequences per second since the job was created",
     lambda p: p["sequences_per_s"]),
    ("maskserve_job_input_bound_workers", "Workers whose consumers wait for data more than "
     "MASKSERVE_JOB_INPUT_BOUND_SHARE of their time (from their summaries)",
     lambda p: len(p.get("input_bound_workers", []))),
    ("maskserve_job_stragglers", "Workers under MASKSERVE_JOB_STRAGGLER_RATIO of the median batches/s of the "
     "job's reporting workers", lambda p: len(p.get("stragglers", []))),
)  # fmt: skip


#: per-worker series, from the summaries a worker's client sends (workers without one have none)
WORKER_SERIES: tuple[tuple[str, str, Any], ...] = (
    ("maskserve_job_worker_data_wait_share", "Share of its time the worker's consumer waited for data",
     lambda w: w["data_wait_share"]),
    ("maskserve_job_worker_batches_per_second", "Batches per second the worker's consumer took",
     lambda w: w.get("reported_batches_per_s", 0.0)),
    ("maskserve_job_worker_step_seconds", "Seconds the worker's consumer spent per batch (its step)",
     lambda w: w["step_s"]),
    ("maskserve_job_worker_lease_rtt_seconds", "Seconds a lease request of the worker took, sent to answered",
     lambda w: w.get("lease_rtt_s")),
    ("maskserve_job_worker_input_bound", "1 when the worker is flagged input-bound", lambda w: float(w["input_bound"])),
    ("maskserve_job_worker_straggler", "1 when the worker is flagged a straggler", lambda w: float(w["straggler"])),
)  # fmt: skip


def job_exposition(progress: list[dict[str, Any]], limit: int, worker_limit: int = 64) -> bytes:
    """The ``maskserve_job_*`` series of at most ``limit`` jobs (active ones first, then by name), labelled by job
    and the dataset it reads; ``maskserve_job_worker_*`` of at most ``worker_limit`` reporting workers of each
    (the flagged ones first, then by name); and ``maskserve_jobs`` (every job by status). Job state lives in
    Redis, so any process answers the same; these are built per scrape, not kept per process."""
    chosen = sorted(progress, key=lambda p: (p["status"] != "active", p["name"]))[:limit]
    families = []
    for name, text, read in JOB_SERIES:
        g = GaugeMetricFamily(name, text, labels=["job", "dataset"])
        for p in chosen:
            g.add_metric([p["name"], p["dataset"]], float(read(p)))
        families.append(g)
    shown = []
    for p in chosen:
        reporting = [(w, e) for w, e in p["workers"].items() if "data_wait_share" in e]
        reporting.sort(key=lambda we: (not (we[1]["input_bound"] or we[1]["straggler"]), we[0]))
        shown += [((p["name"], p["dataset"], w), e) for w, e in reporting[:worker_limit]]
    for name, text, read in WORKER_SERIES:
        g = GaugeMetricFamily(name, text, labels=["job", "dataset", "worker"])
        for labels, entry in shown:
            value = read(entry)
            if value is not None:
                g.add_metric(list(labels), float(value))
        families.append(g)
    total = GaugeMetricFamily("maskserve_jobs", "Jobs by status", labels=["status"])
    for status in ("active", "done", "cancelled"):
        total.add_metric([status], float(sum(p["status"] == status for p in progress)))
    families.append(total)

    class _Once:
        def collect(self):  # noqa: ANN202
            return families

    registry = CollectorRegistry()
    registry.register(_Once())
    return generate_latest(registry)
