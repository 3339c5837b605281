"""Problem details (RFC 9457): the service's one small error tree.

Every error the service returns is ``application/problem+json`` with a stable
``type`` URI. Code raises a :class:`ServiceError` subclass; the handlers in
``service/http/problems.py`` turn it (and request-validation errors, and a lost
Redis connection) into the response. docs/errors.md lists every type.
"""

from __future__ import annotations

from typing import Any, ClassVar

from redis.exceptions import ConnectionError as RedisConnectionError

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:maskserve:problem:"


class ServiceError(Exception):
    """Base of the tree: subclasses set ``type``, ``title`` and ``status``."""

    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out = {"type": TYPE_BASE + self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


class InvalidRequest(ServiceError):
    type, title, status = "invalid-request", "Invalid request", 400


class ValidationFailed(ServiceError):
    type, title, status = "validation-failed", "Request parameters failed validation", 422


class InvalidTokenizer(ServiceError):
    type, title, status = "invalid-tokenizer", "Invalid tokenizer", 400


class TokenizerFailed(ServiceError):
    """The dataset's tokenizer itself failed (a panic inside the library, e.g. a normalizer's regex)."""

    type, title, status = "tokenizer-failed", "The tokenizer failed on this input", 422


class MalformedDocument(ServiceError):
    type, title, status = "malformed-document", "Malformed document", 400


class CorruptBody(ServiceError):
    """A compressed request body that does not decode: cut short, damaged, or not of its Content-Encoding."""

    type, title, status = "corrupt-body", "Request body does not decode", 400


class TokenOutOfVocabulary(ServiceError):
    type, title, status = "token-out-of-vocabulary", "Token id outside the vocabulary", 400


class LimitExceeded(ServiceError):
    type, title, status = "limit-exceeded", "A configured limit was exceeded", 422


class PayloadTooLarge(ServiceError):
    type, title, status = "payload-too-large", "Request body too large", 413


class UnsupportedMediaType(ServiceError):
    type, title, status = "unsupported-media-type", "Unsupported media type", 415


class NotAcceptable(ServiceError):
    type, title, status = "not-acceptable", "No acceptable representation", 406


class Unauthorized(ServiceError):
    type, title, status = "unauthorized", "Missing or wrong bearer token", 401


class NotFound(ServiceError):
    type, title, status = "not-found", "Not found", 404


class DatasetNotFound(NotFound):
    type, title = "dataset-not-found", "Dataset not found"


class DatasetExists(ServiceError):
    type, title, status = "dataset-exists", "Dataset already exists", 409


class DatasetEmpty(ServiceError):
    type, title, status = "dataset-empty", "Dataset has no sequences", 409


class SequenceOutOfRange(ServiceError):
    type, title, status = "sequence-out-of-range", "Sequence id outside the dataset", 422


class JobNotFound(NotFound):
    type, title = "job-not-found", "Job not found"


class IngestNotFound(NotFound):
    type, title = "ingest-not-found", "No staged or committed ingest under this key"


class JobConflict(ServiceError):
    type, title, status = "job-conflict", "Job exists with another config", 409


class JobFinished(ServiceError):
    type, title, status = "job-finished", "Job finished", 410


class JobDatasetGone(ServiceError):
    """The generation of the dataset a job reads was deleted (the name may hold a new one): the job can never
    serve another batch."""

    type, title, status = "job-dataset-gone", "The job's dataset was deleted", 409


class StaticMasksMissing(ServiceError):
    type, title, status = "static-masks-missing", "Static masks not built", 409


class Conflict(ServiceError):
    type, title, status = "conflict", "Conflicting concurrent change", 409


class DatasetReplaced(Conflict):
    """A generation of a dataset (its uid) asked for is no longer the one of its name."""


class StoreUnavailable(ServiceError):
    type, title, status = "store-unavailable", "Redis is unreachable", 503


class Overloaded(ServiceError):
    """The process is at its limit of heavy requests (or Redis connections): retry after ``Retry-After``."""

    type, title, status = "overloaded", "The service is at capacity; retry later", 503

    def __init__(self, detail: str, retry_after_s: int = 1, retry_after_ms: int | None = None, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.headers = {"Retry-After": str(retry_after_s)}
        if retry_after_ms is not None:  # finer than Retry-After's whole seconds: clients come back sooner
            self.headers["Maskserve-Retry-After-Ms"] = str(retry_after_ms)


class RequestTimeout(ServiceError):
    type, title, status = "request-timeout", "The request body arrived too slowly", 408


class PoolExhausted(RedisConnectionError):
    """No pooled Redis connection came free in time: the process is busy, Redis itself may be fine."""
