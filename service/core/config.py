"""Service settings, read from ``MASKSERVE_*`` environment variables.

Precedence (pydantic-settings): arguments passed to ``Settings(...)`` beat
environment variables, which beat a ``.env`` file, which beats the defaults
below. Nothing reads the environment at import time: ``create_app`` builds a
``Settings()`` when it is not handed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: when acks wait for an fsync: where the server can, always (refusing to start otherwise), or never
DurableAcks = Literal["auto", "require", "off"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASKSERVE_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis/Valkey URL. Unset: start an embedded server with its data under data_dir.",
        validation_alias="REDIS_URL",
    )
    redis_cluster: bool = Field(
        default=False,
        description="REDIS_URL names a node of a Redis/Valkey Cluster: datasets spread over its masters "
        "(docs/scaling.md). Needs REDIS_URL.",
    )
    read_from_replicas: bool = Field(
        default=False, description="Cluster mode: chunk reads may go to replicas (job state always goes to masters)."
    )
    chunk_groups: int = Field(
        default=64, ge=1, le=4096,
        description="Slots a new dataset's chunks spread over (fixed per dataset at creation); 1 keeps them in one.",
    )  # fmt: skip
    data_dir: Path = Field(default=Path("maskserve-data"), description="Embedded server's data (AOF) directory.")
    key_prefix: str = Field(default="ms", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every Redis key.")
    auth_token: SecretStr | None = Field(
        default=None, description="Bearer token required on every route but health and the API document's pages."
    )

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> "Settings":
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("MASKSERVE_REDIS_CLUSTER=1 needs REDIS_URL naming a node of the cluster")
        return self

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("an empty bearer token would let anyone in: unset MASKSERVE_AUTH_TOKEN or give a token")
        return v

    max_batch_size: int = Field(default=4096, ge=1, le=1 << 20, description="Largest B a batch request may ask for.")
    max_seq_len: int = Field(default=8192, ge=8, le=65536, description="Largest sequence length L of a dataset.")
    max_body_bytes: int = Field(default=1 << 30, ge=1024, description="Largest ingest request body, sent or decoded.")
    max_tokenizer_bytes: int = Field(default=64 << 20, ge=1024, description="Largest tokenizer.json upload.")
    max_json_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest JSON body of every other route (acks, jobs, masks, reports)."
    )
    max_train_bytes: int = Field(default=256 << 20, ge=1024, description="Largest corpus for tokenizer training.")
    max_acks: int = Field(
        default=1024, ge=1, le=4096,
        description="Most lease ids one request may carry: the acks of a lease request (/next), an /ack or a "
        "/release (their JSON bodies are also bounded by max_json_bytes).",
    )  # fmt: skip

    ingest_batch_bytes: int = Field(default=1 << 20, ge=1024, description="Text handed to the tokenizer per call.")
    max_report_tokens: int = Field(
        default=1 << 25, ge=1024, description="Most tokens a masking report masks (sequences x epochs x L)."
    )
    ingest_batch_docs: int = Field(
        default=8192, ge=1, le=1 << 20, description="Most documents handed to the tokenizer per call."
    )
    mixture_max_positions: int = Field(
        default=1 << 34, ge=1, le=1 << 50,
        description="Most positions (sequences) a mixture job's stream may hold; its acks take a bit each.",
    )  # fmt: skip
    mixture_max_curriculum_blocks: int = Field(
        default=1 << 20, ge=1, le=1 << 26,
        description="Blocks a mixture's linear curriculum may span in all (its quotas are worked out block by "
        "block when a process first serves the job: about 0.4 s per 2^20 blocks of two sources).",
    )  # fmt: skip
    ingest_max_record_batch_bytes: int = Field(
        default=256 << 20, ge=1024,
        description="Largest record batch of an Arrow stream ingest (its buffers, decoded); larger is a 413.",
    )  # fmt: skip
    metrics_max_jobs: int = Field(
        default=100, ge=0, le=10000,
        description="Jobs reported (maskserve_job_* series) per scrape of /metrics: the active ones first, by name. "
        "Each scrape reads their progress from Redis.",
    )  # fmt: skip
    metrics_max_workers: int = Field(
        default=64, ge=0, le=100000,
        description="Workers reported (maskserve_job_worker_* series) per job and scrape of /metrics: those with a "
        "summary, the flagged ones (input-bound, stragglers) first, then by name.",
    )  # fmt: skip
    chunk_bytes: int = Field(default=1 << 20, ge=4096, description="Target size of one stored chunk blob.")
    chunk_max_sequences: int = Field(default=16384, ge=1, description="Most sequences in one chunk blob.")
    stage_ttl_s: int = Field(default=3600, ge=10, description="Lifetime of an unfinished ingest's staged chunks.")
    ingest_progress_interval_s: float = Field(
        default=1.0, ge=0.05, le=60.0,
        description="How often a running ingest refreshes its record in GET /v1/ingests (one small write); a "
        "record not refreshed for 10 intervals (at least 10 s) counts as gone (its process died).",
    )  # fmt: skip
    ingest_idempotency_ttl_s: int = Field(
        default=7 * 86400, ge=1, le=365 * 86400,
        description="How long an ingest's Idempotency-Key is remembered: a retry within it is a no-op, later it "
        "ingests again.",
    )  # fmt: skip
    chunk_cache_bytes: int = Field(
        default=256 << 20, ge=0, le=1 << 40,
        description="Bytes of sequence records and static-mask records a process keeps (those unused for longest out; "
        "each record counts 256 bytes of bookkeeping besides its own). Chunks never change, so a cached row is "
        "never read from Redis again; 0 turns the cache off.",
    )  # fmt: skip
    catalog_max_datasets: int = Field(
        default=256, ge=1, le=1 << 20,
        description="Datasets whose config, tokenizer and chunk tables a process caches; the least recently used "
        "beyond it are dropped (and read again when needed).",
    )  # fmt: skip

    durable_acks: DurableAcks = Field(
        default="auto",
        description="Confirm acks and job transitions only once fsynced (WAITAOF, Redis/Valkey >= 7.2 with the "
        "append-only file on): auto = where the server can, require = refuse to start otherwise, off = never wait.",
    )
    durable_replicas: int = Field(default=0, ge=0, le=16, description="Replicas that must also have fsynced an ack.")
    durable_timeout_ms: int = Field(default=1000, ge=1, le=60000, description="Longest wait for an fsync; then 503.")
    job_worker_idle_s: float = Field(
        default=3600, gt=0, le=30 * 86400, description="A job's worker idle this long folds into the job's totals."
    )
    job_max_workers: int = Field(
        default=1024, ge=1, le=1 << 20, description="Workers tracked per job; the longest idle beyond fold into totals."
    )
    job_input_bound_share: float = Field(
        default=0.1, ge=0, le=1,
        description="A worker whose consumer waits for data more than this share of its time (wait / (wait + step), "
        "from the summaries its client sends) is flagged input-bound in job progress.",
    )  # fmt: skip
    job_straggler_ratio: float = Field(
        default=0.5, ge=0, le=1,
        description="A worker whose batches per second (from its summaries) fall below this share of the median of "
        "the job's reporting workers (two or more) is flagged a straggler in job progress.",
    )  # fmt: skip

    cpu_threads: int = Field(
        default=2, ge=1, le=256, description="Threads per process for CPU work (masking, rendering, tokenizing)."
    )
    max_inflight: int = Field(
        default=32, ge=1, le=65536,
        description="Heavy requests (batches, leases, ingest, reports, builds) a process works on at once; "
        "beyond it they get 503 overloaded with Retry-After.",
    )  # fmt: skip
    max_inflight_bytes: int = Field(
        default=256 << 20, ge=1 << 20,
        description="Response bytes (batch bodies being built or sent) a process holds at once; a heavy request "
        "that would go past it gets 503 overloaded (one body larger than this is still served when it is alone).",
    )  # fmt: skip
    response_piece_bytes: int = Field(
        default=256 << 10, ge=4096, le=64 << 20,
        description="Largest piece of a batch body handed to the server at once; the next goes once it has drained.",
    )  # fmt: skip
    inline_tokens: int = Field(
        default=16384, ge=0, description="Batches of at most this many tokens (B x L) are masked on the event loop."
    )
    overload_retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After of an overloaded 503.")
    overload_retry_ms: int = Field(
        default=200, ge=1, le=3_600_000,
        description="Mean of the Maskserve-Retry-After-Ms hint of an overloaded 503 (drawn within +-50%, so "
        "refused clients do not come back in one wave).",
    )  # fmt: skip
    redis_max_connections: int = Field(default=256, ge=4, le=65536, description="Redis connections per process.")
    redis_pool_timeout_s: float = Field(
        default=5, gt=0, le=600, description="Longest wait for a free pooled connection; then 503 overloaded."
    )
    redis_connect_timeout_s: float = Field(default=5, gt=0, le=600, description="Timeout of a new Redis connection.")
    redis_socket_timeout_s: float = Field(
        default=30, gt=0, le=3600, description="Timeout of one Redis reply; then 503 store-unavailable."
    )
    header_timeout_s: float = Field(
        default=30, gt=0, le=3600, description="A request's headers must arrive within this; else the connection closes."
    )
    body_timeout_s: float = Field(
        default=60, gt=0, le=3600, description="Longest pause between two pieces of a request body; then 408."
    )
    send_timeout_s: float = Field(
        default=120, gt=0, le=3600, description="Longest wait for a client to take the next piece of a response."
    )
    static_build_max_s: float = Field(
        default=300, gt=0, le=86400, description="A static-mask build call stops after this long; the next goes on."
    )
    max_static_copies: int = Field(default=100, ge=1, le=1000, description="Most static masks per sequence (K).")
    max_mask_caches: int = Field(default=16, ge=1, le=4096, description="Most static-mask caches per dataset.")
