"""Prometheus metrics, one registry per app (so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "maskserve_inflight_heavy_requests", "Heavy requests this process is working on", registry=self.registry
        )
        self.tokens_ingested = Counter(
            "maskserve_tokens_ingested_total", "Tokens stored by ingest", ["dataset"], registry=self.registry
        )
        self.documents_ingested = Counter(
            "maskserve_documents_ingested_total", "Documents stored by ingest", ["dataset"], registry=self.registry
        )
