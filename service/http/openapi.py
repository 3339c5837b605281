"""The OpenAPI document, told as the service behaves.

FastAPI derives the document from the routes, but it knows only the success
answers and its own 422: it cannot see that every error is
``application/problem+json``, which routes sit behind the bearer token, which
limits the settings impose or what the batch routes answer. :func:`openapi_schema`
(installed by ``create_app``) takes FastAPI's document once per app and adds that:

* a ``Problem`` schema (RFC 9457 plus the service's extension members) and, per
  operation, one response per status it can answer with the problem ``type``\\ s
  it can carry (:data:`ERRORS`; tests/test_openapi.py checks that table against
  the code and against live answers);
* the ``bearer`` scheme on every operation but the health probes;
* the configured limits, as ``maximum`` where a parameter has one and in the
  request bodies' descriptions;
* both representations of a batch, with their headers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from wire import CONTENT_TYPE

from ..core.config import Settings
from ..core.errors import (
    PROBLEM_JSON, TYPE_BASE, Conflict, CorruptBody, DatasetEmpty, DatasetExists, DatasetNotFound, IngestNotFound, InvalidRequest,
    InvalidTokenizer, JobConflict, JobDatasetGone, JobFinished, JobNotFound, LimitExceeded, MalformedDocument,
    NotAcceptable, NotFound, Overloaded, PayloadTooLarge, RequestTimeout, SequenceOutOfRange, ServiceError, SourcesMismatch,
    StaticMasksMissing, StoreUnavailable, TokenizerFailed, TokenOutOfVocabulary, Unauthorized, UnsupportedMediaType,
    ValidationFailed,
)  # fmt: skip
from ..core.work import is_heavy

Errors = tuple[type[ServiceError], ...]

# Open without the token (as app.Gatekeeper lets them through).
PUBLIC = frozenset({"GET /healthz", "GET /readyz"})

# What an operation takes in brings errors of its own, raised by the framework or the gatekeeper:
_PARAMS: Errors = (ValidationFailed,)  # a constrained parameter or query string
# a JSON body: invalid, undecodable, too large, too slow in coming
_JSON: Errors = (ValidationFailed, InvalidRequest, PayloadTooLarge, RequestTimeout)
# anything that reaches Redis: down, or every pooled connection busy (see app.connect)
_STORE: Errors = (StoreUnavailable, Overloaded)
# ... and the helpers it calls: batching.open_dataset, batching.prepare_batch, the ingest stream
_OPENED: Errors = (DatasetNotFound, DatasetEmpty, Conflict)
_MASKED: Errors = (Conflict, StaticMasksMissing)
_STREAM: Errors = (UnsupportedMediaType, PayloadTooLarge, MalformedDocument, TokenOutOfVocabulary, RequestTimeout)

# The errors each operation can answer besides 500 `internal` (all can) and 401 `unauthorized` (all but the
# health probes, when a token is configured).
ERRORS: dict[str, Errors] = {
    "GET /healthz": (),
    "GET /readyz": _STORE,
    "GET /metrics": (),
    "GET /v1/datasets": _STORE,
    "POST /v1/datasets": (*_JSON, LimitExceeded, InvalidTokenizer, DatasetExists, *_STORE),
    "GET /v1/datasets/{name}": (DatasetNotFound, *_STORE),
    "DELETE /v1/datasets/{name}": (DatasetNotFound, *_STORE),
    "GET /v1/datasets/{name}/tokenizer": (DatasetNotFound, *_STORE),
    "POST /v1/datasets/{name}/documents": (
        *_PARAMS, *_STREAM, CorruptBody, InvalidRequest, DatasetNotFound, Conflict, InvalidTokenizer, TokenizerFailed, *_STORE
    ),  # invalid-tokenizer: the stored tokenizer.json no longer loads (another version of the library)
    "GET /v1/datasets/{name}/ingests/{key}": (*_PARAMS, DatasetNotFound, IngestNotFound, *_STORE),
    "GET /v1/ingests": _STORE,
    "POST /v1/datasets/{name}/ingests/{key}/commit": (
        *_PARAMS, DatasetNotFound, IngestNotFound, Conflict, *_STORE
    ),  # conflict: the staged data expired just before the commit
    "GET /v1/datasets/{name}/batch": (*_PARAMS, LimitExceeded, NotAcceptable, *_OPENED, *_MASKED, *_STORE),
    "POST /v1/datasets/{name}/static-masks": (*_JSON, LimitExceeded, *_OPENED, *_STORE),
    "POST /v1/datasets/{name}/sequences": (
        *_JSON, LimitExceeded, NotAcceptable, SequenceOutOfRange, *_OPENED, *_MASKED, *_STORE
    ),
    "GET /v1/datasets/{name}/static-masks": (DatasetNotFound, *_STORE),
    "DELETE /v1/datasets/{name}/static-masks/{cache}": (*_PARAMS, NotFound, *_STORE),
    "POST /v1/datasets/{name}/masking-report": (*_JSON, LimitExceeded, *_OPENED, *_MASKED, *_STORE),
    "POST /v1/tokenizers/train": (*_PARAMS, *_STREAM, TokenizerFailed),
    "GET /v1/jobs": _STORE,
    "POST /v1/jobs": (
        *_JSON, LimitExceeded, *_OPENED, StaticMasksMissing, SourcesMismatch, JobConflict, JobNotFound, *_STORE
    ),
    "GET /v1/jobs/{name}": (JobNotFound, *_STORE),
    "DELETE /v1/jobs/{name}": (JobNotFound, *_STORE),
    "POST /v1/jobs/{name}/next": (
        *_JSON, LimitExceeded, NotAcceptable, JobNotFound, JobFinished, JobDatasetGone, DatasetNotFound, *_MASKED,
        *_STORE,
    ),  # dataset-not-found: the job's dataset deleted under it; limit-exceeded: more acks than MAX_ACKS
    "POST /v1/jobs/{name}/ack": (*_JSON, LimitExceeded, JobNotFound, *_STORE),
    "POST /v1/jobs/{name}/release": (*_JSON, LimitExceeded, JobNotFound, *_STORE),
    "POST /v1/jobs/{name}/workers/{worker}/evict": (*_PARAMS, JobNotFound, *_STORE),
    "POST /v1/jobs/{name}/cancel": (JobNotFound, *_STORE),
}

_REF = "#/components/schemas/"
_INT = {"type": "integer"}
_ROWS = {"type": "array", "items": {"type": "array", "items": _INT}, "description": "(B, L) or (B, padded width)."}

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; members besides the five standard ones say more about some types.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "pattern": f"^{TYPE_BASE}[a-z-]+$", "description": "Stable; branch on it."},
        "title": {"type": "string", "description": "Short summary of the type."},
        "status": {"type": "integer", "minimum": 400, "maximum": 599, "description": "The HTTP status."},
        "detail": {"type": "string", "description": "What is wrong with this request, for a person."},
        "instance": {"type": "string", "description": "The path of the request."},
        "errors": {
            "type": "array",
            "description": "validation-failed: each failed check.",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "limit": {"type": "integer", "description": "limit-exceeded, payload-too-large: the configured limit."},
        "dataset": {"type": "string", "description": "The dataset concerned."},
        "job": {"type": "string", "description": "The job concerned."},
        "cache": {"type": "string", "description": "The static-mask cache concerned."},
        "line": {"type": "integer", "description": "malformed-document, token-out-of-vocabulary: the body's line."},
        "id": {"type": "integer", "description": "token-out-of-vocabulary, malformed-document: the offending id."},
        "job_status": {"type": "string", "enum": ["done", "cancelled"], "description": "job-finished: why."},
        "acks": {
            "type": "array", "items": {"type": "string"},
            "description": "job-finished: how each ack the request carried went, as /ack answers.",
        },  # fmt: skip
        "conflicts": {
            "type": "array",
            "description": "job-conflict: each config field (`masking.unit` for a masking option) where the existing "
                           "job differs from the request, with the job's value and the requested one.",
            "items": {
                "type": "object",
                "required": ["field", "job", "requested"],
                "properties": {"field": {"type": "string"}, "job": {}, "requested": {}},
            },
        },  # fmt: skip
    },
}

BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A batch as JSON (for debugging; the binary form is the same arrays as safetensors).",
    "required": ["metadata", "input_ids", "attention_mask", "sequence_ids"],
    "properties": {
        "metadata": {"type": "object", "description": "dataset, seed, epoch, index, pad_id (and job, lease)."},
        "input_ids": _ROWS,
        "attention_mask": _ROWS,
        "labels": {**_ROWS, "description": "labels=dense: the id to predict, -100 elsewhere."},
        "special_tokens_mask": {**_ROWS, "description": "special_tokens_mask=true: 1 on special tokens and pads."},
        "masked_positions": {
            "type": "array", "items": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2},
            "description": "labels=sparse: (row, column) of each token to predict.",
        },  # fmt: skip
        "masked_ids": {"type": "array", "items": _INT, "description": "labels=sparse: the id to predict at each."},
        "sequence_ids": {"type": "array", "items": _INT, "description": "The dataset's id of each row."},
    },
}


def _header(schema: dict[str, Any], description: str, required: bool = True) -> dict[str, Any]:
    return {"schema": schema, "description": description, "required": required}


_STR, _FLAG = {"type": "string"}, {"type": "string", "enum": ["0", "1"]}
_ACKS = _header(_STR, "How each ack the request carried went (comma-separated, as /ack answers).")
BATCH_HEADERS = {
    "Maskserve-Dataset": _header(_STR, "The dataset."),
    "Maskserve-Seed": _header(_INT, "The seed (drawn when none was asked for)."),
    "Maskserve-Epoch": _header(_INT, "The mask epoch."),
    "Maskserve-Batch-Index": _header(_INT, "The batch number."),
}
LEASE_HEADERS = {
    "Maskserve-Acks": _ACKS,
    "Maskserve-Job": _header(_STR, "The job."),
    "Maskserve-Dataset": BATCH_HEADERS["Maskserve-Dataset"],
    "Maskserve-Epoch": BATCH_HEADERS["Maskserve-Epoch"],
    "Maskserve-Batch-Index": BATCH_HEADERS["Maskserve-Batch-Index"],
    "Maskserve-Lease": _header(_STR, "Ack the batch by this id once trained on."),
    "Maskserve-Lease-Expires-Ms": _header(_INT, "When the lease runs out (ms since the epoch, server clock)."),
    "Maskserve-Redelivered": _header(_FLAG, "1: handed out before, and its lease expired or was given back."),
    "Maskserve-In-Order": _header(_FLAG, "1: no later request of this worker's stream was granted a batch first."),
}
WAIT_HEADERS = {
    "Maskserve-Acks": _ACKS,
    "Retry-After": _header(_INT, "Seconds to wait before asking again."),
    "Maskserve-Retry-After-Ms": _header(_INT, "The same, in milliseconds."),
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's document: FastAPI's, made truthful (built once, at the first request for it)."""
    if app.openapi_schema is None:
        doc = FastAPI.openapi(app)  # generated, and cached on the app; completed in place
        complete(doc, app.state.settings)
        app.openapi_schema = doc
    return app.openapi_schema


def complete(doc: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add to FastAPI's ``doc`` what it cannot know (see the module's docstring)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _restore_exact_bounds(schemas)
    _integral_bounds(doc["paths"])
    schemas["Problem"] = copy.deepcopy(PROBLEM_SCHEMA)  # each document its own: a caller may change it
    schemas["Batch"] = copy.deepcopy(BATCH_SCHEMA)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    doc["components"]["securitySchemes"] = {"bearer": _bearer(settings)}
    doc["info"]["description"] = _overview(settings)
    for key, op in operations(doc):
        op["security"] = [] if key in PUBLIC else [{"bearer": []}]
        if settings.auth_token is None and key not in PUBLIC:
            op["security"].append({})  # no token configured: the scheme is accepted, not required
        responses = op["responses"]
        responses.pop("422", None)  # FastAPI's {"detail"} body: replaced by the problems below
        errors = ERRORS.get(key, _STORE) + (ServiceError,)
        method, path = key.split(" ", 1)
        if is_heavy(method, path) and Overloaded not in errors:  # refused at the admission limit (work.py)
            errors += (Overloaded,)
        if key not in PUBLIC and settings.auth_token is not None:
            errors += (Unauthorized,)
        responses.update(problem_responses(errors))
    _declare_limits(doc, settings)
    _declare_representations(doc)
    return doc


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("METHOD /path", operation) for every operation of ``doc``."""
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                yield f"{method.upper()} {path}", op


def problem_responses(errors: Iterable[type[ServiceError]]) -> dict[str, dict[str, Any]]:
    """One problem+json response per status, its ``type`` limited to those ``errors`` carry."""
    by_status: dict[int, dict[str, type[ServiceError]]] = {}
    for err in errors:
        by_status.setdefault(err.status, {})[err.type] = err
    out = {}
    for status, kinds in sorted(by_status.items()):
        schema = {
            "allOf": [{"$ref": _REF + "Problem"}],
            "properties": {"status": {"const": status}, "type": {"enum": [TYPE_BASE + t for t in sorted(kinds)]}},
        }
        described = "; ".join(f"`{t}`: {kinds[t].title}" for t in sorted(kinds))
        response: dict[str, Any] = {"description": described, "content": {PROBLEM_JSON: {"schema": schema}}}
        if status == 401:
            response["headers"] = {"WWW-Authenticate": _header(_STR, "Bearer")}
        out[str(status)] = response
    return out


def _bearer(settings: Settings) -> dict[str, Any]:
    state = ("This service has a token configured: it is required." if settings.auth_token is not None
             else "This service has no token configured: requests need none.")  # fmt: skip
    return {
        "type": "http",
        "scheme": "bearer",
        "description": "The token of MASKSERVE_AUTH_TOKEN, on every route but /healthz, /readyz and this "
        f"document (/openapi.json, with its pages /docs and /redoc); the metrics need it too. {state}",
    }


def _overview(settings: Settings) -> str:
    return (
        "Every error is `application/problem+json` (RFC 9457) with a stable `type` "
        f"(`{TYPE_BASE}<name>`); each operation lists the types it can answer, per status. "
        f"Limits of this service: batches of at most {settings.max_batch_size} sequences, sequence length at most "
        f"{settings.max_seq_len}, ingest bodies of at most {settings.max_body_bytes} bytes, tokenizer.json uploads "
        f"of at most {settings.max_tokenizer_bytes} bytes, training corpora of at most {settings.max_train_bytes} "
        f"bytes, other JSON bodies of at most {settings.max_json_bytes} bytes (whatever their framing), and masking "
        f"reports of at most {settings.max_report_tokens} tokens, at most {settings.max_acks} lease ids per "
        "request (the acks of /next, /ack, /release). A request past a body limit gets 413 "
        "`payload-too-large`; past any other, 422 `limit-exceeded`. Before any of that, the HTTP server refuses "
        "a request line past its parser's limit (64 KiB with uvicorn's httptools) with a plain-text 400, and a "
        "proxy in front refuses far shorter ones (nginx: 8 KiB): a lease request carries its acks in its body, "
        "not in its query."
    )


def _declare_limits(doc: dict[str, Any], settings: Settings) -> None:
    """The settings' limits, where the document can say them."""
    paths = doc["paths"]
    _parameter(paths["/v1/datasets/{name}/batch"]["get"], "size")["maximum"] = settings.max_batch_size
    doc["components"]["schemas"]["JobCreate"]["properties"]["batch_size"]["maximum"] = settings.max_batch_size
    create = paths["/v1/datasets"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    create["properties"]["seq_len"]["maximum"] = settings.max_seq_len
    bodies = {
        "POST /v1/datasets": (settings.max_tokenizer_bytes, "MASKSERVE_MAX_TOKENIZER_BYTES"),
        "POST /v1/datasets/{name}/documents": (settings.max_body_bytes, "MASKSERVE_MAX_BODY_BYTES"),
        "POST /v1/tokenizers/train": (settings.max_train_bytes, "MASKSERVE_MAX_TRAIN_BYTES"),
    }
    for key, op in operations(doc):
        if "requestBody" in op:
            limit, name = bodies.get(key, (settings.max_json_bytes, "MASKSERVE_MAX_JSON_BYTES"))
            op["requestBody"] = copy.deepcopy(op["requestBody"])  # a route's openapi_extra is shared by every app
            op["requestBody"]["description"] = f"At most {limit} bytes ({name}), however it is framed."
    schemas = doc["components"]["schemas"]
    schemas["Leases"]["properties"]["leases"]["maxItems"] = settings.max_acks
    acks = paths["/v1/jobs/{name}/next"]["post"]["requestBody"]
    acks["content"]["application/json"]["schema"]["properties"]["acks"]["maxItems"] = settings.max_acks
    for path in ("/v1/jobs/{name}/next", "/v1/jobs/{name}/ack", "/v1/jobs/{name}/release"):
        body = paths[path]["post"]["requestBody"]
        body["description"] += f" At most {settings.max_acks} lease ids (MASKSERVE_MAX_ACKS)."
    report = paths["/v1/datasets/{name}/masking-report"]["post"]
    report["description"] = (
        f"The work, sequences x epochs x L, may be at most {settings.max_report_tokens} tokens "
        "(MASKSERVE_MAX_REPORT_TOKENS)."
    )


def _declare_representations(doc: dict[str, Any]) -> None:
    """What the routes answer that their return types do not show: batch media types and headers,
    Location on creation, the metrics' text format."""
    paths = doc["paths"]
    binary = {"schema": {"type": "string", "contentMediaType": CONTENT_TYPE}}
    batch = {CONTENT_TYPE: binary, "application/json": {"schema": {"$ref": _REF + "Batch"}}}
    described = f"The batch: {CONTENT_TYPE} (safetensors), or JSON when the Accept header or `format` asks for it."
    get_batch = paths["/v1/datasets/{name}/batch"]["get"]["responses"]
    get_batch["200"] = {"description": described, "content": batch, "headers": copy.deepcopy(BATCH_HEADERS)}
    by_id = paths["/v1/datasets/{name}/sequences"]["post"]["responses"]
    by_id["200"] = {"description": described, "content": copy.deepcopy(batch),
                    "headers": {k: v for k, v in copy.deepcopy(BATCH_HEADERS).items() if k != "Maskserve-Batch-Index"}}
    lease = paths["/v1/jobs/{name}/next"]["post"]["responses"]
    lease["200"] = {"description": described, "content": copy.deepcopy(batch), "headers": copy.deepcopy(LEASE_HEADERS)}
    lease["204"] = {
        "description": "Nothing to hand out now (all leased); ask again later.", "headers": copy.deepcopy(WAIT_HEADERS)
    }

    location = {"Location": _header(_STR, "The resource's path.")}
    paths["/v1/datasets"]["post"]["responses"]["201"]["headers"] = location
    jobs = paths["/v1/jobs"]["post"]["responses"]
    jobs["201"] = {**jobs["201"], "description": "Created.", "headers": location}
    jobs["200"] = {**jobs["201"], "description": "A job of that name and config existed: attached to it."}

    metrics = paths["/metrics"]["get"]["responses"]["200"]
    metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
    metrics["description"] = "Prometheus text exposition format."


def _parameter(op: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p["schema"] for p in op["parameters"] if p["name"] == name)


def _restore_exact_bounds(schemas: dict[str, Any]) -> None:
    """FastAPI passes component schemas through float-typed fields, turning integer bounds into floats
    (2**64 - 1 becomes 1.8446744073709552e19, which admits 2**64): put back the models' own values."""
    for name, model in _service_models().items():
        if name in schemas:
            exact = model.model_json_schema(ref_template=_REF + "{model}")
            for nested, sub in exact.pop("$defs", {}).items():
                if nested in schemas:
                    _copy_bounds(schemas[nested], sub)
            _copy_bounds(schemas[name], exact)


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integral_bounds(node: Any) -> None:
    """The bounds of integer schemas written inline in operations (FastAPI makes them floats, 8 -> 8.0) as
    integers again, where the float is exact (the large bounds sit in component schemas, restored above)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in _BOUNDS:
                value = node.get(key)
                if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                    node[key] = int(value)
        for value in node.values():
            _integral_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integral_bounds(value)


def _copy_bounds(generated: Any, exact: Any) -> None:
    """Walk two parallel schemas; where ``generated`` has a float bound that ``exact`` gives as an int, take the int."""
    if isinstance(generated, dict) and isinstance(exact, dict):
        for key, value in generated.items():
            if key in _BOUNDS and isinstance(exact.get(key), int) and float(exact[key]) == value:
                generated[key] = exact[key]
            elif key in exact:
                _copy_bounds(value, exact[key])
    elif isinstance(generated, list) and isinstance(exact, list) and len(generated) == len(exact):
        for g, e in zip(generated, exact):
            _copy_bounds(g, e)


def _service_models() -> dict[str, type[BaseModel]]:
    """The service's pydantic models by class name (the names FastAPI gives their components)."""
    out: dict[str, type[BaseModel]] = {}
    stack = list(BaseModel.__subclasses__())
    while stack:
        model = stack.pop()
        stack.extend(model.__subclasses__())
        if model.__module__.startswith("service."):
            out[model.__name__] = model
    return out
