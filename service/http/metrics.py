"""Prometheus metrics, one registry per app (so several apps can share a process).

Under ``maskserve serve --workers N`` the process manager sets
``PROMETHEUS_MULTIPROC_DIR`` before starting the workers: each worker's
values then live in files there, and ``/metrics``, whichever worker answers
it, reports the sum over all of them (:func:`exposition`).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
            "maskserve_overloaded_total", "Heavy requests refused at the admission limit", registry=self.registry
        )
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
